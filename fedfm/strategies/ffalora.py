"""FFA-LoRA: every client keeps LoRA's A frozen at the shared initialization and trains only B, so
averaging B is exact: mean(B)·A = mean(B·A).

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024,
https://arxiv.org/abs/2403.12313
"""

from __future__ import annotations

from typing import Any

from fedfm.strategies.fedavg import FedAvg


class FFALoRA(FedAvg):
    """:meth:`configure` sets ``lora.freeze_a`` for every client, whose updates then carry B (and any
    task head) but no A — half the LoRA traffic; the server averages them as FedAvg does and the
    global A never changes."""

    name = "ffalora"

    def configure(self, round_index: int, client: str) -> dict[str, Any]:
        return {"lora.freeze_a": True}

"""FedSA-LoRA: share and average only LoRA's A matrices; each client keeps its B as its personalization.

Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025,
https://arxiv.org/abs/2410.01463
"""

from __future__ import annotations

from typing import Any

from fedfm.strategies.fedavg import FedAvg


class FedSALoRA(FedAvg):
    """:meth:`configure` sets ``lora.keep_b_local`` for every client: it starts each round from the
    global A with its own B from its last round, sends the change to A (and any task head), and keeps
    its new B at its state location (``state_uri``), which never leaves it. The server averages what
    is sent as FedAvg does; the global B stays at its initialization. Each tenant is evaluated with
    its own B: the model it uses.
    """

    name = "fedsalora"

    def configure(self, round_index: int, client: str) -> dict[str, Any]:
        return {"lora.keep_b_local": True}

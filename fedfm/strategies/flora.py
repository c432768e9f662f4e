"""FLoRA: stack the clients' LoRA factors instead of averaging them, so the aggregate is exactly the
weighted sum of their products, whatever their ranks.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024, https://arxiv.org/abs/2409.05976
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from fedfm import lora
from fedfm.adapters import Adapter, Tensors
from fedfm.errors import FedFMError
from fedfm.strategies.base import Aggregate, ServerState, Strategy


class FLoRA(Strategy):
    """Each round every client folds the global adapter into its base weights and trains a fresh LoRA
    of its own rank on top (:meth:`configure` sets ``lora.restart``); its update is those factors.
    The server stacks them, ``A ← [A; A₁; …; A_K]`` and ``B ← [B, p₁B₁, …, p_KB_K]`` with
    ``pₖ = nₖ / Σn``, so ``B·A`` grows by exactly ``Σ pₖ·Bₖ·Aₖ``: no cross terms, no padding.
    Components whose B column is zero in every layer (the initial adapter's) are dropped.

    The cost is the paper's: the global rank grows by the clients' summed rank each round, and the
    rule holds every update's factors until it stacks them. Tensors outside LoRA are FedAvg'd.
    """

    name = "flora"
    mixed_ranks = True

    def configure(self, round_index: int, client: str) -> dict[str, Any]:
        return {"lora.restart": True}

    def aggregate(self, global_tensors: Tensors, updates: Iterable[Adapter], state: ServerState) -> Aggregate:
        layers = lora.layers(global_tensors)
        factors = {name for pair in layers.values() for name in pair}
        others = {name: torch.zeros_like(value) for name, value in global_tensors.items() if name not in factors}
        stacks: dict[str, list[torch.Tensor]] = {name: [] for name in factors}
        weights, clients = [], []
        for update in updates:
            for name in factors:
                stacks[name].append(update.tensors[name])
            for name in others:
                others[name].add_(update.tensors[name], alpha=update.meta.samples)
            weights.append(update.meta.samples)
            clients.append(update.meta.client or f"update {len(clients)}")
        if not clients:
            raise FedFMError(f"{self.name}: no client updates to aggregate")
        total = sum(weights)
        live = torch.zeros(lora.rank_of(global_tensors), dtype=torch.bool)
        for _, b in layers.values():
            live |= global_tensors[b].abs().sum(dim=0) > 0
        tensors = {name: global_tensors[name] + value / total for name, value in others.items()}
        for a, b in layers.values():
            tensors[a] = torch.cat([global_tensors[a][live], *stacks[a]], dim=0)
            tensors[b] = torch.cat([global_tensors[b][:, live], *(w / total * block for w, block in
                                                                  zip(weights, stacks[b]))], dim=1)
        return Aggregate(tensors=tensors, state=state, clients=clients, samples=total)

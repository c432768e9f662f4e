"""FlexLoRA: average the clients' full LoRA products ΔW = B·A, then hand each client the truncated SVD
of the average at its own rank.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources", NeurIPS 2024, https://arxiv.org/abs/2402.11505
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedfm import lora
from fedfm.adapters import Adapter, Tensors
from fedfm.errors import FedFMError
from fedfm.strategies.base import Aggregate, ServerState, Strategy


class FlexLoRA(Strategy):
    """``W̄ = Σ nₖ·Bₖ·Aₖ / Σ nₖ`` per LoRA layer over the clients' local factors, then
    ``W̄ = U·S·Vᵀ`` and the global adapter is ``B = U·S``, ``A = Vᵀ`` at the global rank R, its
    components in decreasing singular value. A client of rank r takes the first r of them, which is
    W̄'s best rank-r approximation. Tensors outside LoRA (a task head) are FedAvg'd.

    Where the average has rank ≤ R the global product equals it exactly (so one client, or clients
    whose products share a rank-R space, reproduce plain averaging of ΔW). Streams the updates but
    holds one dense out × in accumulator per LoRA layer (the cost of averaging products), and runs one
    SVD per layer.
    """

    name = "flexlora"
    mixed_ranks = True

    def aggregate(self, global_tensors: Tensors, updates: Iterable[Adapter], state: ServerState) -> Aggregate:
        layers = lora.layers(global_tensors)
        factors = {name for pair in layers.values() for name in pair}
        products = {layer: torch.zeros(global_tensors[b].shape[0], global_tensors[a].shape[1])
                    for layer, (a, b) in layers.items()}
        others = {name: torch.zeros_like(value) for name, value in global_tensors.items() if name not in factors}
        total, clients = 0, []
        for update in updates:
            samples = update.meta.samples
            local = lora.truncate(global_tensors, lora.rank_of(update.tensors))
            for name, delta in update.tensors.items():
                local[name] += delta
            for layer, (a, b) in layers.items():
                products[layer].addmm_(local[b], local[a], alpha=samples)
            for name in others:
                others[name].add_(update.tensors[name], alpha=samples)
            total += samples
            clients.append(update.meta.client or f"update {len(clients)}")
        if not clients:
            raise FedFMError(f"{self.name}: no client updates to aggregate")
        rank = lora.rank_of(global_tensors)
        tensors = {name: global_tensors[name] + value / total for name, value in others.items()}
        for layer, (a, b) in layers.items():
            u, s, vh = torch.linalg.svd(products[layer].double() / total, full_matrices=False)
            tensors[b] = (u[:, :rank] * s[:rank]).float()
            tensors[a] = vh[:rank].float()
        return Aggregate(tensors=tensors, state=state, clients=clients, samples=total)

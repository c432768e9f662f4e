"""HetLoRA: clients train LoRA at different ranks; the server zero-pads them to the largest and
averages, weighting each client by the size of its LoRA product (sparsity-weighted aggregation).

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models", EMNLP 2024,
https://arxiv.org/abs/2401.06432
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from fedfm import lora
from fedfm.adapters import Adapter, Tensors
from fedfm.errors import FedFMError
from fedfm.strategies.base import Aggregate, ServerState, Strategy


class HetLoRA(Strategy):
    """A client of rank r trains the first r components of the global adapter (truncation). The new
    global is ``Σ pₖ · pad(localₖ)`` over the clients' *local* LoRA factors zero-padded to the global
    rank, as the paper aggregates: components above a client's rank count as zeros for it, so they
    shrink where few clients train them. ``pₖ ∝ ‖Bₖ·Aₖ‖_F`` (summed over layers) with
    ``sparsity_weighted`` (the paper's rule), else ``∝`` samples. Tensors outside LoRA (a task head)
    are sample-weighted. With every client at the global rank and ``sparsity_weighted=False`` this
    is FedAvg. Streams: one accumulator the size of the adapter.
    """

    name = "hetlora"
    mixed_ranks = True

    def __init__(self, sparsity_weighted: bool = True):
        self.sparsity_weighted = sparsity_weighted

    def aggregate(self, global_tensors: Tensors, updates: Iterable[Adapter], state: ServerState) -> Aggregate:
        layers = lora.layers(global_tensors)
        factors = {name for pair in layers.values() for name in pair}
        weighted = {name: torch.zeros_like(value) for name, value in global_tensors.items()}
        lora_total, sample_total, clients = 0.0, 0, []
        for update in updates:
            rank = lora.rank_of(update.tensors)
            local = lora.truncate(global_tensors, rank)
            for name, delta in update.tensors.items():
                local[name] += delta
            samples = update.meta.samples
            weight = _product_norm(local, layers) if self.sparsity_weighted else float(samples)
            for name, value in local.items():
                lora.pad_into(weighted[name], value).add_(value, alpha=weight if name in factors else samples)
            lora_total += weight
            sample_total += samples
            clients.append(update.meta.client or f"update {len(clients)}")
        if not clients:
            raise FedFMError(f"{self.name}: no client updates to aggregate")
        if lora_total == 0:  # every client's product is zero (B = 0): nothing to weight by
            raise FedFMError(f"{self.name}: every client's LoRA product B·A is zero; nothing to aggregate")
        tensors = {name: value / (lora_total if name in factors else sample_total) for name, value in weighted.items()}
        return Aggregate(tensors=tensors, state=state, clients=clients, samples=sample_total)


def _product_norm(tensors: Tensors, layers: dict[str, tuple[str, str]]) -> float:
    """``√Σ‖B·A‖²_F`` over the adapter's LoRA layers."""
    return math.sqrt(sum(float(torch.linalg.matrix_norm(tensors[b] @ tensors[a]) ** 2) for a, b in layers.values()))

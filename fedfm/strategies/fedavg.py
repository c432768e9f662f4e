"""FedAvg: the sample-weighted mean of client updates.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017, https://arxiv.org/abs/1602.05629
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from fedfm.adapters import Adapter, Tensors
from fedfm.errors import FedFMError
from fedfm.strategies.base import Aggregate, Strategy


class FedAvg(Strategy):
    """``global + Σ nᵢ·Δᵢ / Σ nᵢ``, with nᵢ the client's sample count.

    Streams: one float64 accumulator the size of the adapter plus the update being read, whatever the
    number of clients. Accumulating in float64 keeps the mean exact to float32 precision for any N.
    """

    name = "fedavg"

    def aggregate(self, global_tensors: Tensors, updates: Iterable[Adapter], state: dict[str, Any]) -> Aggregate:
        weighted_sum = {name: torch.zeros(value.shape, dtype=torch.float64) for name, value in global_tensors.items()}
        clients: list[str] = []
        total = 0
        for update in updates:
            weight = update.meta.samples
            for name, delta in update.tensors.items():
                weighted_sum[name].add_(delta.to(torch.float64), alpha=weight)
            total += weight
            clients.append(update.meta.client or f"update {len(clients)}")
        if not clients:
            raise FedFMError("fedavg: no client updates to aggregate")
        tensors = {
            name: (global_tensors[name].to(torch.float64) + weighted_sum[name] / total).to(torch.float32)
            for name in global_tensors
        }
        return Aggregate(tensors=tensors, state=state, clients=clients, samples=total)

"""FedMedian: the coordinate-wise median of the client updates.

Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018,
https://arxiv.org/abs/1803.01498
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fedfm.adapters import Adapter, Tensors
from fedfm.strategies._stack import apply, collect
from fedfm.strategies.base import Aggregate, Strategy


class FedMedian(Strategy):
    """Each coordinate of the new adapter moves by the median of the clients' changes to it; sample
    counts do not weigh. With an even number of clients the median is the mean of the two middle
    values (as numpy's, and Flower's). Holds every update in memory."""

    name = "fedmedian"

    def aggregate(self, global_tensors: Tensors, updates: Iterable[Adapter], state: dict[str, Any]) -> Aggregate:
        clients, samples, stacked = collect(updates, self.name)
        middle = len(clients) // 2
        delta = {}
        for name, values in stacked.items():
            ordered = values.sort(dim=0).values
            delta[name] = ordered[middle] if len(clients) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        return Aggregate(apply(global_tensors, delta), state, clients, sum(samples))

"""FedTrimmedAvg: the coordinate-wise trimmed mean of the client updates.

Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018,
https://arxiv.org/abs/1803.01498
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fedfm.adapters import Adapter, Tensors
from fedfm.errors import ConfigError
from fedfm.strategies._stack import apply, collect
from fedfm.strategies.base import Aggregate, Strategy


class FedTrimmedAvg(Strategy):
    """Per coordinate, drop the ``beta`` fraction of smallest and of largest client values, average the
    rest (unweighted). ``int(beta · n)`` values go from each end, as in scipy's ``trim_mean``."""

    name = "fedtrimmedavg"

    def __init__(self, beta: float = 0.2):
        if not 0.0 <= beta < 0.5:
            raise ConfigError(f"fedtrimmedavg: beta {beta} must be in [0, 0.5)")
        self.beta = beta

    def aggregate(self, global_tensors: Tensors, updates: Iterable[Adapter], state: dict[str, Any]) -> Aggregate:
        clients, samples, stacked = collect(updates, self.name)
        cut = int(self.beta * len(clients))
        delta = {name: values.sort(dim=0).values[cut:len(clients) - cut].mean(dim=0)
                 for name, values in stacked.items()}
        return Aggregate(apply(global_tensors, delta), state, clients, sum(samples))

"""Krum and Multi-Krum: keep the updates closest to their neighbours, as Byzantine-robust aggregation.

Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017,
https://arxiv.org/abs/1703.02757 (Krum, and Multi-Krum in its Section 5)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from fedfm.adapters import Adapter, Tensors
from fedfm.errors import ConfigError
from fedfm.strategies._stack import apply, collect
from fedfm.strategies.base import Aggregate, Strategy


class Krum(Strategy):
    """Score each update by the summed squared distances to its ``n − f − 2`` nearest other updates
    (``f`` = ``num_malicious``; at least 1 neighbour) and take the update with the lowest score.

    Multi-Krum (``to_keep`` > 0) averages the ``to_keep`` lowest-scoring updates instead, weighted by
    their sample counts as Flower does; the paper's Multi-Krum averages them unweighted, which
    ``weighted=False`` gives. Holds every update in memory, plus the n × n distance matrix.
    """

    name = "krum"

    def __init__(self, num_malicious: int = 0, to_keep: int = 0, weighted: bool = True):
        if num_malicious < 0 or to_keep < 0:
            raise ConfigError(f"{self.name}: num_malicious and to_keep must be ≥ 0")
        self.num_malicious, self.to_keep, self.weighted = num_malicious, to_keep, weighted

    def aggregate(self, global_tensors: Tensors, updates: Iterable[Adapter], state: dict[str, Any]) -> Aggregate:
        clients, samples, stacked = collect(updates, self.name)
        count = len(clients)
        flat = torch.cat([values.reshape(count, -1) for _, values in sorted(stacked.items())], dim=1)
        # exact pairwise distances (the matrix-multiply shortcut loses digits on near-equal updates)
        distances = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
        neighbours = max(1, count - self.num_malicious - 2)
        # each row's own zero distance sorts first; the score sums the next `neighbours` distances
        scores = distances.sort(dim=1).values[:, 1:neighbours + 1].sum(dim=1)
        keep = self._keep(count)
        chosen = torch.argsort(scores, stable=True)[:keep]
        weights = (torch.tensor([float(samples[i]) for i in chosen.tolist()], dtype=torch.float64) if self.weighted
                   else torch.ones(len(chosen), dtype=torch.float64))
        weights = weights / weights.sum()
        delta = {name: torch.tensordot(weights, values[chosen], dims=1) for name, values in stacked.items()}
        return Aggregate(apply(global_tensors, delta), state, [clients[i] for i in chosen.tolist()],
                         sum(samples[i] for i in chosen.tolist()))

    def _keep(self, count: int) -> int:
        """How many of ``count`` updates to average: 1 for Krum."""
        return min(self.to_keep, count) if self.to_keep else 1


class MultiKrum(Krum):
    """Krum that averages the ``to_keep`` best updates (default: all but ``num_malicious``)."""

    name = "multikrum"

    def __init__(self, num_malicious: int = 0, to_keep: int = 0, weighted: bool = True):
        super().__init__(num_malicious, to_keep, weighted)

    def _keep(self, count: int) -> int:
        return min(self.to_keep, count) if self.to_keep else max(1, count - self.num_malicious)

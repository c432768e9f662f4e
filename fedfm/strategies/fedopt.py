"""The FedOpt family's shared server step: adaptive optimizers applied to the mean client update.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021, https://arxiv.org/abs/2003.00295
(Algorithm 2). The three members (``fedadam``, ``fedyogi``, ``fedadagrad``) differ only in how the
second moment is updated; each lives in its own file.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable

import torch

from fedfm.adapters import Adapter, Tensors
from fedfm.errors import ConfigError
from fedfm.strategies.base import Aggregate, ServerState, Strategy
from fedfm.strategies.fedavg import weighted_mean


class FedOpt(Strategy):
    """``Δ̄`` = FedAvg's mean update; ``m ← β₁·m + (1−β₁)·Δ̄``; ``v`` ← the rule's second moment;
    ``global ← global + η·m / (√v + τ)``. ``m`` and ``v`` start at zero and are the server state.

    Defaults: η = 1e-2 and τ = 1e-3, the scale of a LoRA adapter's entries moved by a round of local
    Adam steps (Flower's FedAdam and FedAdagrad default to η = 0.1, τ = 1e-9, which on adapters
    jumps each coordinate by ±0.1 in round 1).
    """

    from_mean = True

    def __init__(self, eta: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3):
        if eta <= 0 or tau <= 0 or not 0 <= beta_1 < 1 or not 0 <= beta_2 < 1:
            raise ConfigError(f"{self.name}: eta and tau must be > 0, beta_1 and beta_2 in [0, 1)")
        self.eta, self.beta_1, self.beta_2, self.tau = eta, beta_1, beta_2, tau

    @abstractmethod
    def second_moment(self, previous: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
        """The new ``v`` (a new tensor) from the previous one (None, meaning zeros, in round 1) and this
        round's mean update."""

    def step_size(self, step: int) -> float:
        """η for the ``step``-th aggregation (1-based)."""
        return self.eta

    def aggregate(self, global_tensors: Tensors, updates: Iterable[Adapter], state: ServerState) -> Aggregate:
        mean, clients, total = weighted_mean(global_tensors, updates, self.name)
        step = int(state.get("step", 0)) + 1
        eta = self.step_size(step)
        new_state: ServerState = {"step": step}
        tensors = {}
        # In place where it can be (never on the inputs): one tensor at a time holds the mean, the new m
        # and v, and the result, which reuses the mean's buffer once m and v are taken from it.
        for name, delta in mean.items():
            previous = state.get(f"m.{name}")
            m = delta.mul(1 - self.beta_1) if previous is None else (
                previous.mul(self.beta_1).add_(delta, alpha=1 - self.beta_1))
            v = self.second_moment(state.get(f"v.{name}"), delta)
            new_state[f"m.{name}"], new_state[f"v.{name}"] = m, v
            step = torch.sqrt(v, out=delta).add_(self.tau).reciprocal_().mul_(m).mul_(eta)  # η·m / (√v + τ)
            tensors[name] = step.add_(global_tensors[name])
        return Aggregate(tensors=tensors, state=new_state, clients=clients, samples=total)

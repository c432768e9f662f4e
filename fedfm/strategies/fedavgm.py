"""FedAvgM: FedAvg with server momentum.

Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification", 2019, https://arxiv.org/abs/1909.06335
"""

from __future__ import annotations

from collections.abc import Iterable

from fedfm.adapters import Adapter, Tensors
from fedfm.errors import ConfigError
from fedfm.strategies.base import Aggregate, ServerState, Strategy
from fedfm.strategies.fedavg import weighted_mean


class FedAvgM(Strategy):
    """``v ← β·v + Δ̄``, ``global ← global + η·v``, with Δ̄ the FedAvg mean update, β
    ``server_momentum`` and η ``server_learning_rate``. ``v`` starts at zero and is the server state.

    Written on updates rather than Flower's pseudo-gradient (``global − mean``), the same arithmetic
    with the sign flipped; ``server_momentum=0, server_learning_rate=1`` is FedAvg.
    """

    name = "fedavgm"
    from_mean = True

    def __init__(self, server_learning_rate: float = 1.0, server_momentum: float = 0.9):
        if server_learning_rate <= 0 or not 0 <= server_momentum < 1:
            raise ConfigError(f"{self.name}: server_learning_rate must be > 0 and server_momentum in [0, 1)")
        self.server_learning_rate, self.server_momentum = server_learning_rate, server_momentum

    def aggregate(self, global_tensors: Tensors, updates: Iterable[Adapter], state: ServerState) -> Aggregate:
        mean, clients, total = weighted_mean(global_tensors, updates, self.name)
        new_state: ServerState = {"step": int(state.get("step", 0)) + 1}
        tensors = {}
        for name, delta in mean.items():
            previous = state.get(f"momentum.{name}")
            momentum = delta if previous is None else previous.mul(self.server_momentum).add_(delta)
            new_state[f"momentum.{name}"] = momentum
            tensors[name] = global_tensors[name] + self.server_learning_rate * momentum
        return Aggregate(tensors=tensors, state=new_state, clients=clients, samples=total)

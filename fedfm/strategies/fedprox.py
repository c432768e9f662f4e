"""FedProx: local training with a proximal term that keeps each client near the global adapter.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, https://arxiv.org/abs/1812.06127
"""

from __future__ import annotations

from typing import Any

from fedfm.errors import ConfigError
from fedfm.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    """The server side is FedAvg; :meth:`configure` asks every client to add ``μ/2·‖w − w_global‖²``
    over its trainable adapter weights to the training loss (``training.proximal_mu``)."""

    name = "fedprox"

    def __init__(self, mu: float = 0.01):
        if mu <= 0:
            raise ConfigError(f"{self.name}: mu must be > 0 (mu = 0 is fedavg)")
        self.mu = mu

    def configure(self, round_index: int, client: str) -> dict[str, Any]:
        return {"training.proximal_mu": self.mu}

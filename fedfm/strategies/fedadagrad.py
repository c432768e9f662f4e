"""FedAdagrad: Adagrad on the server, over the mean client update.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021, https://arxiv.org/abs/2003.00295
"""

from __future__ import annotations

import torch

from fedfm.strategies.fedopt import FedOpt


class FedAdagrad(FedOpt):
    """``v ← v + Δ̄²``. ``beta_1`` defaults to 0 (no first-moment momentum), as in Flower."""

    name = "fedadagrad"

    def __init__(self, eta: float = 1e-2, beta_1: float = 0.0, tau: float = 1e-3):
        super().__init__(eta=eta, beta_1=beta_1, tau=tau)

    def second_moment(self, previous: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
        return delta.square() if previous is None else previous.addcmul(delta, delta)

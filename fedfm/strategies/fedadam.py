"""FedAdam: Adam on the server, over the mean client update.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021, https://arxiv.org/abs/2003.00295
"""

from __future__ import annotations

import math

import torch

from fedfm.strategies.fedopt import FedOpt


class FedAdam(FedOpt):
    """``v ← β₂·v + (1−β₂)·Δ̄²``.

    Where Flower and the paper differ: the paper's Algorithm 2 has no bias correction; Flower scales η
    by ``√(1−β₂^(t+1)) / (1−β₁^(t+1))`` in round t (Adam's correction, one step ahead). We follow
    Flower by default so results match it; ``bias_correction=False`` is the paper's rule.
    """

    name = "fedadam"

    def __init__(self, eta: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3,
                 bias_correction: bool = True):
        super().__init__(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)
        self.bias_correction = bias_correction

    def second_moment(self, previous: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
        if previous is None:
            return delta.square().mul_(1 - self.beta_2)
        return previous.mul(self.beta_2).addcmul_(delta, delta, value=1 - self.beta_2)

    def step_size(self, step: int) -> float:
        if not self.bias_correction:
            return self.eta
        return self.eta * math.sqrt(1 - self.beta_2 ** (step + 1)) / (1 - self.beta_1 ** (step + 1))

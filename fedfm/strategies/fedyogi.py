"""FedYogi: Yogi on the server, over the mean client update.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021, https://arxiv.org/abs/2003.00295
"""

from __future__ import annotations

import torch

from fedfm.strategies.fedopt import FedOpt


class FedYogi(FedOpt):
    """``v ← v − (1−β₂)·Δ̄²·sign(v − Δ̄²)``: v moves towards Δ̄² by an additive step, not a decay.

    ``v`` starts at zero, as in Flower; the paper allows any start ``v₋₁ ≥ τ²``, which with τ added
    to √v changes only the first steps.
    """

    name = "fedyogi"

    def second_moment(self, previous: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
        squared = delta.square()
        if previous is None:  # v = 0: sign(0 − Δ̄²) = −1 wherever Δ̄² > 0
            return squared.mul_(1 - self.beta_2)
        # v − (1−β₂)·Δ̄²·sign(v − Δ̄²), built in the sign's buffer
        return torch.sub(previous, squared).sign_().mul_(squared).mul_(-(1 - self.beta_2)).add_(previous)

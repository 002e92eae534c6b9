"""`mixture`: the Bregman divergence of h = w h_prob_l2 + (1 - w) h_neg_entropy.

Bregman divergences are linear in the potential, so D = w D_prob_l2 + (1 - w) D_neg_entropy,
convex for any w in [0, 1]. It is the divergence of the 2-dim `mixture` search space (which also
searches lambda), registered here so a found mixture trains from a config like any other.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Divergence, PotentialMixin
from .builtin import NegEntropy, ProbL2


class MixtureDivergence(Divergence, PotentialMixin):
    """Bregman divergence of h = w * h_prob_l2 + (1 - w) * h_neg_entropy (convex for w in [0, 1]).

    Both parts are separable Bregman divergences, so `full` (the base class's vocabulary sum of
    `terms`) is exact too.
    """

    name = "mixture"

    def __init__(self, weight: float = 0.5) -> None:
        if not 0.0 <= float(weight) <= 1.0:
            raise ValueError(f"mixture weight must be in [0, 1], got {weight}")
        self.weight = float(weight)
        self._a = ProbL2()
        self._b = NegEntropy()

    def params(self) -> dict[str, Any]:
        """JSON-able parameters recorded per run."""
        return {"weight": self.weight}

    def terms(self, logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
        """Per-token D: w * D_prob_l2 + (1 - w) * D_neg_entropy."""
        w = self.weight
        return w * self._a.terms(logp, ref_logp) + (1.0 - w) * self._b.terms(logp, ref_logp)

    def h(self, y: torch.Tensor) -> torch.Tensor:
        """The potential."""
        return self.weight * self._a.h(y) + (1.0 - self.weight) * self._b.h(y)

    def phi_inv(self, y: torch.Tensor) -> torch.Tensor:
        """The mirror map h'."""
        return self.weight * self._a.phi_inv(y) + (1.0 - self.weight) * self._b.phi_inv(y)

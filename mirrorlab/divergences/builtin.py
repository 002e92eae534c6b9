"""Built-in divergences: the KL estimators k1/k2/k3 and the closed-form Bregman divergences.

Per-token formulas (y = pi(token), y0 = pi_ref(token), L = log y - log y0):
  kl_k1        L
  kl_k2        L^2 / 2
  kl_k3        y0/y - log(y0/y) - 1          (TRL/GRPO default)
  prob_l2      (y - y0)^2 / 2                (Bregman of h = y^2/2)
  neg_entropy  y log(y/y0) - y + y0          (Bregman of h = y log y - y)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Divergence, PotentialMixin, compute_dtype, k3_terms, kl_bregman, log_ratio_terms


def _log_ratio(logp: Tensor, ref_logp: Tensor) -> Tensor:
    dt = compute_dtype(logp, ref_logp)
    return logp.to(dt).clamp_min(-1e30) - ref_logp.to(dt).clamp_min(-1e30)


class KLK1(Divergence, PotentialMixin):
    """k1 = log(y/y0): unbiased but signed KL estimator. `full` = exact KL(pi || pi_ref).

    As a potential it is shown with neg-entropy (h = y log y - y), whose Bregman divergence
    summed over the vocabulary is the KL that k1 estimates.
    """

    name = "kl_k1"
    full_mode = "expectation"

    def terms(self, logp: Tensor, ref_logp: Tensor) -> Tensor:
        return _log_ratio(logp, ref_logp)

    def phi_inv(self, y: Tensor) -> Tensor:
        """log y (neg-entropy mirror map)."""
        return torch.log(y)

    def h(self, y: Tensor) -> Tensor:
        """y log y - y."""
        return torch.special.xlogy(y, y) - y


class KLK2(Divergence):
    """k2 = (log y - log y0)^2 / 2 ("log-space L2"). `full` = E_pi[k2] = sum_a pi(a) L_a^2 / 2.

    Note E_pi[k2] is not KL (it is its second-order approximation); it is the exact
    expectation of this estimator. k2 has no potential in probability space.
    """

    name = "kl_k2"
    full_mode = "expectation"

    def terms(self, logp: Tensor, ref_logp: Tensor) -> Tensor:
        L = _log_ratio(logp, ref_logp)
        return 0.5 * L * L


class KLK3(KLK1):
    """k3 = y0/y - log(y0/y) - 1 >= 0 (Schulman's estimator, TRL default). `full` = E_pi[k3].

    E_pi[k3] = KL(pi || pi_ref) exactly; it is summed as sum_a [pi log(pi/ref) - pi + ref],
    a sum of non-negative terms (equal to `neg_entropy`'s `full`). Computed as L^2 e2(-L)
    for |L| < 0.1 so it is accurate and >= 0 when y is close to y0.
    """

    name = "kl_k3"
    full_mode = "expectation"

    def terms(self, logp: Tensor, ref_logp: Tensor) -> Tensor:
        return k3_terms(_log_ratio(logp, ref_logp))


class ProbL2(Divergence, PotentialMixin):
    """ProbL2: (y - y0)^2 / 2, the Bregman divergence of h(y) = y^2 / 2.

    The paper's released code omits the factor 1/2 (it uses (y - y0)^2); with this library
    use a coefficient twice as large to reproduce its numbers. y - y0 = y0 * expm1(L).
    """

    name = "prob_l2"

    def terms(self, logp: Tensor, ref_logp: Tensor) -> Tensor:
        _, _, _, delta = log_ratio_terms(logp, ref_logp)
        return 0.5 * delta * delta

    def phi_inv(self, y: Tensor) -> Tensor:
        """h'(y) = y."""
        return y.clone()

    def h(self, y: Tensor) -> Tensor:
        """h(y) = y^2 / 2."""
        return 0.5 * y * y


class NegEntropy(Divergence, PotentialMixin):
    """Negative entropy: D = y log(y/y0) - y + y0, Bregman of h(y) = y log y - y.

    Computed as y * L^2 * e2(-L) near L = 0 (no cancellation when y ~ y0). Its `full` is KL(pi || pi_ref).
    """

    name = "neg_entropy"

    def terms(self, logp: Tensor, ref_logp: Tensor) -> Tensor:
        L, y, _, delta = log_ratio_terms(logp, ref_logp)
        return kl_bregman(L, y, delta)

    def phi_inv(self, y: Tensor) -> Tensor:
        """h'(y) = log y."""
        return torch.log(y)

    def h(self, y: Tensor) -> Tensor:
        """h(y) = y log y - y."""
        return torch.special.xlogy(y, y) - y

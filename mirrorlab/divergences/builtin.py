"""Built-in divergences: the KL estimators k1/k2/k3 and the closed-form Bregman divergences.

Per-token formulas (y = pi(token), y0 = pi_ref(token), L = log y - log y0):
  kl_k1        L
  kl_k2        L^2 / 2
  kl_k3        y0/y - log(y0/y) - 1          (TRL/GRPO default)
  kl_k1+       value of k1, gradient of k2   (straight-through: k1.detach() + k2 - k2.detach())
  kl_k3+       value of k3, gradient of k2   (verl's "k3+")
  prob_l2      (y - y0)^2 / 2                (Bregman of h = y^2/2)
  neg_entropy  y log(y/y0) - y + y0          (Bregman of h = y log y - y)

What each estimator is worth on-policy (a ~ pi, the sample held fixed, s = grad log pi(a); the
derivations and the sequence-level picture are in docs/estimators.md, checked by exact enumeration
in tests/test_baselines.py):

  estimator  E_pi[value]   E_pi[grad], in the loss   x rho (reg_times_ratio)   in the reward: E_pi[s value]
  kl_k1      KL            0                         g(KL)                     g(KL)
  kl_k2      E_pi[L^2]/2   g(KL)                     g(E_pi[L^2/2])            g(E_pi[L^2/2]) - g(KL)
  kl_k3      KL            g(KLf)                    g(KL)                     g(KL) - g(KLf)
  kl_k1+     KL            g(KL)                     2 g(KL)                   as kl_k1
  kl_k3+     KL            g(KL)                     2 g(KL) - g(KLf)          as kl_k3

(KL = KL(pi || ref), the reverse KL; KLf = KL(ref || pi), the forward KL; g = the gradient.)

So the unbiased reverse-KL gradient on-policy comes from k2 (or k1+ / k3+) in the loss, from k1 in
the reward, or from k1 / k3 in the loss times the ratio (TRL's use_bias_correction_kl); k3 in the
loss (GRPO's and TRL's form) follows the forward KL's gradient instead, and k1 in the loss does
nothing in expectation. The Bregman divergences' sampled estimator is in `base.Divergence`.
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

    On-policy: E_pi[k1] = KL(pi || ref); its gradient is the score s = grad log pi(a), and
    E_pi[s] = sum_a grad pi(a) = 0, so k1 in the loss contributes nothing in expectation (only
    variance). In the reward (detached, multiplying the score) it gives E_pi[s L] = grad KL(pi || ref),
    the unbiased reverse-KL gradient (PPO's classic form; arXiv 2510.01555, 2512.21852).

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

    On-policy its gradient is L s, and E_pi[L s] = sum_a L_a grad pi(a) = grad KL(pi || ref)
    (the second term of grad sum_a pi L, sum_a pi grad log pi, is 0): k2 in the loss gives the
    exact reverse-KL gradient (arXiv 2510.01555), although its value is not KL.
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

    On-policy its gradient is (1 - y0/y) s, and E_pi[(1 - ref/pi) s] = -sum_a ref(a) grad log pi(a)
    = grad KL(ref || pi): k3 in the loss follows the *forward* KL's gradient, a biased (first-order
    in L) stand-in for the reverse KL's (arXiv 2510.01555). Times the ratio rho
    (`train.reg_times_ratio`, TRL's use_bias_correction_kl) it becomes grad KL(pi || ref).
    """

    name = "kl_k3"
    full_mode = "expectation"

    def terms(self, logp: Tensor, ref_logp: Tensor) -> Tensor:
        return k3_terms(_log_ratio(logp, ref_logp))


class StraightThrough(Divergence):
    """An estimator whose value is one estimator's and whose gradient is another's:
    per token `value.detach() + (gradient - gradient.detach())` (verl's "+" estimators, e.g. k3+).

    The forward value is exactly `value`'s (x - x = 0 for finite x), the backward exactly
    `gradient`'s. `full` is the value estimator's exact `full` (for the KL ones: KL(pi || ref), whose
    exact gradient is the one the k2 gradient estimates on-policy). Do not combine with
    `train.reg_times_ratio` (the ratio's gradient adds the value's score term a second time).
    """

    full_mode = "expectation"

    def __init__(self, value: Divergence, gradient: Divergence, name: str) -> None:
        self.value, self.gradient, self.name = value, gradient, name

    def terms(self, logp: Tensor, ref_logp: Tensor) -> Tensor:
        v = self.value.terms(logp, ref_logp)
        g = self.gradient.terms(logp, ref_logp)
        return v.detach() + (g - g.detach())

    def full(self, logits: Tensor, ref_logits: Tensor, chunk_size: int = 8192) -> Tensor:
        """The value estimator's exact `full` (value and gradient)."""
        return self.value.full(logits, ref_logits, chunk_size=chunk_size)


class KLK1Plus(StraightThrough):
    """`kl_k1+`: k1's value (signed, unbiased for KL) with k2's gradient (unbiased for grad KL on-policy)."""

    def __init__(self) -> None:
        super().__init__(KLK1(), KLK2(), "kl_k1+")


class KLK3Plus(StraightThrough):
    """`kl_k3+`: k3's value (>= 0, unbiased for KL, low variance) with k2's gradient (unbiased for
    grad KL(pi || ref) on-policy): verl's `kl_loss_type: k3+`."""

    def __init__(self) -> None:
        super().__init__(KLK3(), KLK2(), "kl_k3+")


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

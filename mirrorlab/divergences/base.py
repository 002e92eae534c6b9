"""Base class and small numerically careful helpers shared by every divergence.

All maths runs in float32, or float64 when an input is float64 (bf16/fp16 inputs are upcast),
with no host synchronisation, so a divergence can sit inside a loss on any device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor

# Below these |x| the closed forms cancel; a short Taylor series is used instead.
_E2_SERIES_MAX = 0.1
_G2_SERIES_MAX = 0.1
_NEG_LARGE = -1e30  # stands in for log(0) = -inf so that 0 * log(0) terms stay finite


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (the dtype all divergence maths uses)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _horner(x: Tensor, coeffs: tuple[float, ...]) -> Tensor:
    """Evaluate sum_k coeffs[k] x^k by Horner's rule (coeffs in increasing order, len >= 2)."""
    r = x * coeffs[-1] + coeffs[-2]
    for c in reversed(coeffs[:-2]):
        r = r * x + c
    return r


_E2_COEFFS = tuple(1.0 / f for f in (2.0, 6.0, 24.0, 120.0, 720.0, 5040.0))
_G2_COEFFS = tuple((-1.0) ** n / ((n + 2) * (n + 1)) for n in range(8))


def e2_series(x: Tensor) -> Tensor:
    """Taylor series of (expm1(x) - x) / x^2 = 1/2 + x/6 + ...; relative error < 1e-10 for |x| < 0.1."""
    return _horner(x, _E2_COEFFS)


def e2(x: Tensor) -> Tensor:
    """(expm1(x) - x) / x^2, accurate for all x (series near 0, where the closed form cancels).

    Both branches are evaluated on "safe" inputs so neither produces inf/NaN gradients.
    """
    small = x.abs() < _E2_SERIES_MAX
    xc = torch.where(small, 1.0, x)
    closed = (torch.expm1(xc) - xc) / (xc * xc)
    return torch.where(small, e2_series(torch.where(small, x, 0.0)), closed)


def g2(x: Tensor) -> Tensor:
    """((1 + x) log1p(x) - x) / x^2 for x > -1, accurate near 0 (Bregman of p log p - p, scaled)."""
    small = x.abs() < _G2_SERIES_MAX
    xc = torch.where(small, 1.0, x)
    closed = ((1.0 + xc) * torch.log1p(xc) - xc) / (xc * xc)
    return torch.where(small, _horner(torch.where(small, x, 0.0), _G2_COEFFS), closed)


def kl_bregman(L: Tensor, y: Tensor, delta: Tensor) -> Tensor:
    """y0 (L e^L - expm1(L)) = y log(y/y0) - y + y0 >= 0: series y L^2 e2(-L) for |L| < 0.1,
    else y L - (y - y0) (at most ~20x cancellation, finite as y -> 0)."""
    small = L.abs() < _E2_SERIES_MAX
    Ls = torch.where(small, L, 0.0)
    return torch.where(small, y * (Ls * Ls) * e2_series(-Ls), y * L - delta)


def k3_terms(L: Tensor) -> Tensor:
    """e^{-L} + L - 1 >= 0 (Schulman's k3): series L^2 e2(-L) for |L| < 0.1, else expm1(-L) + L."""
    small = L.abs() < _E2_SERIES_MAX
    Ls = torch.where(small, L, 0.0)
    return torch.where(small, (Ls * Ls) * e2_series(-Ls), torch.expm1(-L) + L)


def log_ratio_terms(logp: Tensor, ref_logp: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Upcast and return (L, y, y0, delta): L = logp - ref_logp, y = e^logp, y0 = e^ref, y - y0.

    delta is computed as y0 * expm1(L), which is accurate when y is close to y0.
    """
    dt = compute_dtype(logp, ref_logp)
    lp = logp.to(dt).clamp_min(_NEG_LARGE)
    rp = ref_logp.to(dt).clamp_min(_NEG_LARGE)
    L = lp - rp
    y0 = torch.exp(rp)
    return L, torch.exp(lp), y0, y0 * torch.expm1(L)


def chunked_logsumexp(logits: Tensor, chunk_size: int, dtype: torch.dtype) -> Tensor:
    """logsumexp over the last dim in `dtype`, upcasting one vocabulary chunk at a time."""
    v = logits.shape[-1]
    if v <= chunk_size:
        return torch.logsumexp(logits.to(dtype), dim=-1)
    parts = [
        torch.logsumexp(logits[..., s : s + chunk_size].to(dtype), dim=-1) for s in range(0, v, chunk_size)
    ]
    return torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)


class Divergence:
    """A per-token regulariser D(pi || pi_ref) on log-probabilities, with two estimators.

    `sampled(logp, ref_logp)` compares the sampled token's probabilities y = e^logp and
    y0 = e^ref_logp (the paper's estimator). `full(logits, ref_logits)` is exact over the
    vocabulary: for a Bregman divergence sum_a D(pi(a), pi_ref(a)); for the KL estimators the
    expectation under pi of the sampled estimator (see each class).

    What the Bregman family's sampled estimator `terms(logp, ref_logp)` = D_h(y, y0) = h(y) - h(y0)
    - h'(y0)(y - y0) is worth on-policy (a ~ pi, the sample fixed, s = grad log pi(a); derivations
    in docs/estimators.md, checked in tests/test_baselines.py):
    - value: E_pi[D_h] = sum_a pi(a) D_h(pi(a), ref(a)), a pi-weighted version of `full`
      (sum_a D_h(pi(a), ref(a))), not `full` itself;
    - in the loss: grad D_h(y, y0) = (h'(y) - h'(y0)) grad y, so E_pi[grad] = sum_a pi(a) (h'(pi(a))
      - h'(ref(a))) grad pi(a), the gradient of `full` with each vocabulary entry weighted by pi(a)
      (held fixed); pulled toward the reference, but not the gradient of any one divergence;
    - times the ratio rho (`train.reg_times_ratio`): grad of E_pi[D_h] (the value above);
    - in the reward (detached, times the score): sum_a D_h(pi(a), ref(a)) grad pi(a).
    """

    name: str = "divergence"
    #: "sum": full = sum_a terms(a); "expectation": full = sum_a pi(a) * terms(a)
    full_mode: str = "sum"
    #: vocabulary entries processed together = chunk_size // full_chunk_divisor (memory bound)
    full_chunk_divisor: int = 1
    #: checkpoint each vocabulary chunk when gradients are needed (bounded backward memory)
    full_checkpoint: bool = True

    def params(self) -> dict[str, Any]:
        """JSON-able parameters recorded with every run."""
        return {}

    # ----------------------------------------------------------------- estimators
    def terms(self, logp: Tensor, ref_logp: Tensor) -> Tensor:
        """Per-token D in the compute dtype (subclasses implement); inputs already broadcastable."""
        raise NotImplementedError

    def sampled(self, logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None) -> Tensor:
        """Per-token D of the sampled tokens, same shape as the inputs, float32 (float64 if given).

        `mask` (optional, bool or 0/1) zeroes padded positions; their inputs are replaced by 0
        before the maths so garbage there cannot produce NaN values or gradients.
        """
        if mask is not None:
            keep = mask.to(torch.bool)
            logp = torch.where(keep, logp, torch.zeros_like(logp))
            ref_logp = torch.where(keep, ref_logp, torch.zeros_like(ref_logp))
            d = self._sampled_fn()(logp, ref_logp)
            return torch.where(keep, d, torch.zeros_like(d))
        return self._sampled_fn()(logp, ref_logp)

    __call__ = sampled

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without compiled functions or device caches (rebuilt lazily; call compile() again)."""
        state = self.__dict__.copy()
        state.pop("_compiled_terms", None)
        if "_cache" in state:
            state["_cache"] = {}
        return state

    def _sampled_fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        return getattr(self, "_compiled_terms", None) or self.terms

    @property
    def compiled(self) -> bool:
        """Whether `compile()` was applied (configs: `divergence.compile`)."""
        return getattr(self, "_compiled_terms", None) is not None

    def compile(self, **kwargs: Any) -> Divergence:
        """Opt-in: run `sampled` through `torch.compile(self.terms, dynamic=True, **kwargs)`.

        Fuses the many small element-wise kernels of `neural` (about a hundred per call; see
        benchmarks/divergence_overhead.py) into a few, which matters on GPUs where per-kernel
        launch cost dominates small batches. Returns self.
        """
        self._compiled_terms = torch.compile(self.terms, dynamic=True, **kwargs)
        return self

    def _chunk_sum(self, logits: Tensor, ref_logits: Tensor, lse: Tensor, ref_lse: Tensor) -> Tensor:
        """Sum over one vocabulary chunk of the per-entry terms (weighted by pi for "expectation")."""
        dt = lse.dtype
        lp = logits.to(dt) - lse
        rp = ref_logits.to(dt) - ref_lse
        if self.full_mode == "expectation":
            # entries with pi(a) = 0 contribute 0; evaluate them at L = 0 so no inf/NaN leaks
            p = torch.exp(lp)
            t = self.terms(torch.where(p > 0, lp, rp), rp)
            t = torch.where(p > 0, p * t, torch.zeros_like(t))
        else:
            t = self.terms(lp, rp)
        return t.sum(dim=-1)

    def full(self, logits: Tensor, ref_logits: Tensor, chunk_size: int = 8192) -> Tensor:
        """Exact D(pi || pi_ref) over the vocabulary (last dim); shape `logits.shape[:-1]`.

        Works in vocabulary chunks of `chunk_size` entries (`neural`: chunk_size // 32, as each
        entry fans out to 126 units). Peak extra memory per token in the forward pass is
        independent of the vocabulary size and linear in chunk_size (measured per divergence in
        benchmarks/divergence_overhead.py; figures in benchmarks/README.md).
        With gradients, each chunk is checkpointed (recomputed in backward), so autograd keeps
        only views of the logits plus the log-normalisers, not the chunk's intermediates.
        """
        if logits.shape != ref_logits.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        dt = compute_dtype(logits, ref_logits)
        lse = chunked_logsumexp(logits, chunk_size, dt).unsqueeze(-1)
        ref_lse = chunked_logsumexp(ref_logits, chunk_size, dt).unsqueeze(-1)
        step = max(1, chunk_size // self.full_chunk_divisor)
        v = logits.shape[-1]
        ckpt = (
            self.full_checkpoint
            and torch.is_grad_enabled()
            and (logits.requires_grad or ref_logits.requires_grad)
        )
        out = torch.zeros(logits.shape[:-1], dtype=dt, device=logits.device)
        for s in range(0, v, step):
            args = (logits[..., s : s + step], ref_logits[..., s : s + step], lse, ref_lse)
            if ckpt:
                part = torch.utils.checkpoint.checkpoint(self._chunk_sum, *args, use_reentrant=False)
            else:
                part = self._chunk_sum(*args)
            out = out + part
        return out

    def __repr__(self) -> str:
        ps = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({ps})"


class PotentialMixin:
    """Marks divergences that are Bregman divergences of a potential h with h' = phi_inv."""

    def phi_inv(self, y: Tensor) -> Tensor:  # pragma: no cover - interface
        """The mirror map h'(y)."""
        raise NotImplementedError

    def h(self, y: Tensor) -> Tensor:  # pragma: no cover - interface
        """The potential h(y) (up to an additive constant)."""
        raise NotImplementedError

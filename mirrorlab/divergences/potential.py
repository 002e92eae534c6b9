"""Custom Bregman divergences from any convex potential h given as a torch function.

`PotentialDivergence(h)` derives phi_inv = h' by autograd and
D(y, y0) = h(y) - h(y0) - h'(y0) (y - y0), evaluated in float64 (output float32, or float64
for float64 inputs). Limits: h must be elementwise, convex and differentiable on (0, 1] and
accept float64 tensors; D is a difference of primitives, so its absolute error is about
1e-16 * max(|h(y)|, |h(y0)|, |h'(y0) y0|) (negative round-off is clamped to 0). That is ample for
a float32 loss, but D values below ~1e-12 of the potential's scale are noise: for a
learned or extreme potential write a closed form instead (as `neural` does).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .base import Divergence, PotentialMixin, compute_dtype, log_ratio_terms

PotentialFn = Callable[[Tensor], Tensor]


def _resolve(h: PotentialFn | str) -> PotentialFn:
    """Accept a callable or an import path 'package.module:function' (usable from YAML)."""
    if callable(h):
        return h
    if isinstance(h, str) and ":" in h:
        mod, _, attr = h.partition(":")
        fn = getattr(importlib.import_module(mod), attr)
        if not callable(fn):
            raise TypeError(f"custom potential {h!r} is not callable")
        return fn
    raise TypeError(f"custom potential h must be a callable or 'module:function', got {h!r}")


class PotentialDivergence(Divergence, PotentialMixin):
    """Bregman divergence of a user potential h (convex torch function); h' by autograd."""

    name = "custom"
    full_checkpoint = False  # terms() calls autograd.grad itself

    def __init__(self, h: PotentialFn | str, name: str | None = None) -> None:
        self._h_spec = h
        self._h = _resolve(h)
        if name is not None:
            self.name = name

    def params(self) -> dict[str, Any]:
        """{"potential": "module:qualname"} (a lambda records as '<lambda>': register a named one)."""
        if isinstance(self._h_spec, str):
            return {"potential": self._h_spec}
        qual = getattr(self._h, "__qualname__", type(self._h).__name__)
        return {"potential": f"{getattr(self._h, '__module__', '?')}:{qual}"}

    def h(self, y: Tensor) -> Tensor:
        """The user's potential, evaluated in the compute dtype."""
        return self._h(y.to(compute_dtype(y)))

    def phi_inv(self, y: Tensor) -> Tensor:
        """h'(y) by autograd (no graph is kept)."""
        with torch.enable_grad():
            yl = y.detach().to(compute_dtype(y)).requires_grad_(True)
            (g,) = torch.autograd.grad(self._h(yl).sum(), yl)
        return g

    def terms(self, logp: Tensor, ref_logp: Tensor) -> Tensor:
        out_dt = compute_dtype(logp, ref_logp)
        logp, ref_logp = torch.broadcast_tensors(logp, ref_logp)
        _, y, y0, delta = log_ratio_terms(logp.to(torch.float64), ref_logp.to(torch.float64))
        with torch.enable_grad():
            track = y0.requires_grad
            y0_in = y0 if track else y0.detach().requires_grad_(True)
            h0 = self._h(y0_in)
            (g0,) = torch.autograd.grad(h0.sum(), y0_in, create_graph=track)
        if not track:
            h0 = h0.detach()
        d = self._h(y) - h0 - g0 * delta
        return d.clamp_min(0.0).to(out_dt)

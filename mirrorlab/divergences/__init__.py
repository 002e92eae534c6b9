"""The divergence library of GBMPO (DESIGN section 4): KL estimators, Bregman divergences of
hand-designed, neural (learned) and user potentials, each with a `sampled` and a `full` estimator.

    from mirrorlab.divergences import get, NeuralMirrorMap
    d = get("kl_k3"); d.sampled(logp, ref_logp); d.full(logits, ref_logits)
    m = get("neural", seed=0, scale=0.01)      # or theta=..., raw=..., path=...
    register_potential("quartic", lambda y: y**4)  # usable as divergence.name: quartic

Turning a `DivergenceConfig` (names, saved maps, `models:/` URIs) into a divergence is
`mirrorlab.maps.build_divergence`, one layer up: this package imports no MLflow or config code.
"""

from __future__ import annotations

from typing import Any

from mirrorlab.registry import Registry

from .base import Divergence, PotentialMixin, compute_dtype
from .builtin import KLK1, KLK2, KLK3, KLK1Plus, KLK3Plus, NegEntropy, ProbL2, StraightThrough
from .mixture import MixtureDivergence
from .neural import DIM, N_UNITS, NeuralMirrorMap, make_neural, theta_sha
from .plot import plot_maps
from .potential import PotentialDivergence, PotentialFn

registry: Registry[Divergence] = Registry("divergence")
registry.register("kl_k1", KLK1)
registry.register("kl_k2", KLK2)
registry.register("kl_k3", KLK3)
registry.register("kl_k1+", KLK1Plus)
registry.register("kl_k3+", KLK3Plus)
registry.register("prob_l2", ProbL2)
registry.register("neg_entropy", NegEntropy)
registry.register("neural", make_neural)
registry.register("custom", PotentialDivergence)
registry.register("mixture", MixtureDivergence)


def get(name: str, **params: Any) -> Divergence:
    """Build the divergence registered as `name` (unknown names list the allowed ones)."""
    return registry.get(name, **params)


def register(name: str, factory: Any = None, *, overwrite: bool = False) -> Any:
    """Register a divergence factory (class or function returning a Divergence); decorator form ok."""
    return registry.register(name, factory, overwrite=overwrite)


def names() -> list[str]:
    """Registered divergence names, sorted."""
    return registry.names()


def register_potential(name: str, h: PotentialFn | str, *, overwrite: bool = False) -> None:
    """Register the Bregman divergence of a convex torch potential `h` under `name`."""

    def factory() -> PotentialDivergence:
        return PotentialDivergence(h, name=name)

    registry.register(name, factory, overwrite=overwrite)


__all__ = [
    "DIM",
    "KLK1",
    "KLK2",
    "KLK3",
    "KLK1Plus",
    "KLK3Plus",
    "N_UNITS",
    "Divergence",
    "NegEntropy",
    "NeuralMirrorMap",
    "PotentialDivergence",
    "PotentialMixin",
    "ProbL2",
    "StraightThrough",
    "MixtureDivergence",
    "compute_dtype",
    "get",
    "names",
    "plot_maps",
    "register",
    "register_potential",
    "registry",
    "theta_sha",
]

"""Plots of mirror maps: phi_inv(y) and h(y) on (0, 1] for several maps, side by side (PNG)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .builtin import NegEntropy, ProbL2


def plot_maps(
    maps: Mapping[str, Any],
    path: str | Path,
    y_min: float = 1e-3,
    points: int = 400,
    log_x: bool = False,
    normalize: bool = False,
    title: str | None = None,
    baselines: bool = False,
) -> Path:
    """Draw phi_inv (left) and h (right) on [y_min, 1] for each {label: divergence or map}.

    With `baselines`, KL's potential (negative entropy) and ProbL2's are drawn first, so a map
    is always seen beside the two hand-designed ones.

    Every value must expose `phi_inv(y)` and `h(y)` (all potential-based divergences do;
    `kl_k1`/`kl_k3` are drawn with the neg-entropy potential; `kl_k2` has none). With
    `normalize`, each curve is affinely rescaled to [0, 1] so maps of very different scale
    (a random-init neural map is ~1e-2) can be compared by shape. Uses the Agg canvas only.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not maps:
        raise ValueError("plot_maps needs at least one map")
    if baselines:
        maps = {"KL (neg. entropy)": NegEntropy(), "ProbL2": ProbL2(), **maps}
    for label, m in maps.items():
        if not (hasattr(m, "phi_inv") and hasattr(m, "h")):
            raise TypeError(f"{label!r} ({type(m).__name__}) has no potential (phi_inv and h) to plot")
    y = (
        torch.logspace(math.log10(y_min), 0.0, points, dtype=torch.float64)
        if log_x
        else torch.linspace(y_min, 1.0, points, dtype=torch.float64)
    )
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for label, m in maps.items():
        for ax, fn in zip(axes, (m.phi_inv, m.h), strict=True):
            with torch.no_grad():
                v = fn(y).to(torch.float64)
            if normalize:
                lo, hi = v.min(), v.max()
                v = (v - lo) / (hi - lo) if hi > lo else v - lo
            ax.plot(y.numpy(), v.numpy(), label=str(label))
    for ax, name in zip(axes, ("phi_inv(y) = h'(y)", "h(y)"), strict=True):
        ax.set_xlabel("y (probability)")
        ax.set_title(name + (" (normalised)" if normalize else ""))
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=110, format="png")
    return path

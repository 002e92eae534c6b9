"""Small value helpers every layer shares: finiteness, number formatting and JSON-able copies.

One definition each, so "finite", "how a number prints" and "what goes into a JSON file" mean
the same thing in the search, the comparison, the plots and the strategies' checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def is_finite(x: Any) -> bool:
    """True for a real number (Python or numpy) that is neither NaN nor infinite."""
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool) \
        and math.isfinite(float(x))


def fmt(x: Any, digits: int = 3, missing: str = "-") -> str:
    """`x` with `digits` decimals, or `missing` for None, NaN, infinities and non-numbers."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return missing
    return f"{v:.{digits}f}" if math.isfinite(v) else missing


def jsonable(obj: Any, strict: bool = False) -> Any:
    """A copy of `obj` with numpy arrays and scalars as Python lists and numbers (tuples become
    lists). With `strict`, non-finite floats become None so the file is strict JSON; without it
    they stay (Python's json writes NaN, and a checkpoint must round-trip exactly)."""
    if isinstance(obj, dict):
        return {k: jsonable(v, strict) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v, strict) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist(), strict)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        obj = float(obj)
    if strict and isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj

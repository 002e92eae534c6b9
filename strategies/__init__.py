"""Search strategies over mirror-map parameters (installed as `mirrorlab.strategies`).

One ask/tell interface (`Strategy`, `Candidate`) for maximisation with exact checkpointing.
Built in: `openai_es`, `gbmpo_es`, `random`, `nevergrad` (any nevergrad optimiser by name).
Build one with `get(name, dim, population, seed, x0=None, **params)`; register your own with
`register(name, factory)` where `factory(dim=, population=, seed=, x0=, **params) -> Strategy`.
A strategy's own mutable state is one dataclass (`strategy.state`), checkpointed by the generic
`encode_state` / `decode_state`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from mirrorlab.registry import Registry

from .base import PICKLED, Candidate, Strategy, centered_ranks, decode_state, encode_state
from .es import GBMPOES, OpenAIES
from .random_search import RandomInit

registry: Registry[Strategy] = Registry("strategy")
registry.register("openai_es", OpenAIES)
registry.register("gbmpo_es", GBMPOES)
registry.register("random", RandomInit)


registry.register("nevergrad", "mirrorlab.strategies.ng:NevergradStrategy")  # nevergrad imports slowly


def get(name: str, dim: int, population: int, seed: int, x0: Any = None, **params: Any) -> Strategy:
    """Build the strategy registered under `name` (unknown name -> error listing allowed ones)."""
    return registry.get(name, dim=dim, population=population, seed=seed, x0=x0, **params)


def register(name: str, factory: Callable[..., Strategy] | None = None, *, overwrite: bool = False) -> Any:
    """Register a strategy factory (usable as a decorator)."""
    return registry.register(name, factory, overwrite=overwrite)


def names() -> list[str]:
    """Registered strategy names."""
    return registry.names()


def param_names(name: str) -> set[str] | None:
    """Keyword parameters the strategy `name` accepts beyond dim/population/seed/x0/generations
    (those come from the search config itself); None when the factory takes **kwargs."""
    f = registry.factory(name)
    try:
        sig = inspect.signature(f)
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return set(sig.parameters) - {"self", "dim", "population", "seed", "x0", "generations"}


def check_params(name: str, params: dict[str, Any]) -> None:
    """Raise ValueError for keys `name` does not accept (config-time typo check), then run the
    factory's own `check_params(params)` if it has one (nevergrad: an unknown optimiser name)."""
    allowed = param_names(name)
    if allowed is not None:
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ValueError(
                f"strategy {name!r} has no parameter(s) {unknown}; allowed: {', '.join(sorted(allowed))}"
            )
    own_check = getattr(registry.factory(name), "check_params", None)
    if callable(own_check):
        own_check(params)


__all__ = [
    "Candidate", "Strategy", "centered_ranks", "registry", "get", "register", "names", "param_names",
    "check_params", "OpenAIES", "GBMPOES", "RandomInit", "encode_state", "decode_state", "PICKLED",
]

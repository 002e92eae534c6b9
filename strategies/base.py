"""The ask/tell interface shared by every search strategy, and small pure helpers.

A `Strategy` proposes `Candidate`s (float64 parameter vectors with a lineage pointer), is told
their fitness (maximised), tracks the best candidate seen, and can be checkpointed with
`state_dict()` / `load_state_dict()` so that a resumed search asks exactly what an uninterrupted
one would. Every built-in `state_dict()` is JSON-serialisable (arrays as lists, RNG states as
dicts, nevergrad optimisers as base64 pickles).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mirrorlab.values import jsonable

STATE_VERSION = 1


@dataclass(frozen=True, eq=False)
class Candidate:
    """One proposed point: `theta` (float64, shape [dim]), a stable `id` ("g3-5": generation 3,
    slot 5; unique within a search and identical after a resume), the ids of the points it
    derives from (`parent_ids`, structured lineage: other candidates' ids, or a strategy point that
    is never evaluated itself such as the ES search mean `mean@g3`; empty for a fresh draw) and a
    human-readable `note` on how it was made ("mean@g3+eps[5]", "elite", ...)."""

    theta: np.ndarray
    id: str
    parent_ids: tuple[str, ...] = ()
    note: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("Candidate.id is required (e.g. Strategy._cid(slot))")
        object.__setattr__(self, "parent_ids", tuple(str(p) for p in self.parent_ids))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (used for pending candidates in state dicts)."""
        return {"theta": self.theta.tolist(), "id": self.id, "parent_ids": list(self.parent_ids),
                "note": self.note}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        """Inverse of `to_dict`."""
        return cls(theta=np.asarray(d["theta"], dtype=np.float64), id=d["id"],
                   parent_ids=tuple(d.get("parent_ids", ())), note=d.get("note", ""))


# --------------------------------------------------------------------------- pure helpers
def centered_ranks(x: np.ndarray) -> np.ndarray:
    """Centred-rank fitness shaping: ranks mapped linearly to [-0.5, 0.5], ties share their mean
    rank (so many candidates at the failure value get one utility); sums to zero."""
    x = np.asarray(x, dtype=np.float64).ravel()
    n = x.size
    if n <= 1:
        return np.zeros(n)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(n)
    ranks[order] = np.arange(n, dtype=np.float64)
    _, inv = np.unique(x, return_inverse=True)
    ranks = (np.bincount(inv, weights=ranks) / np.bincount(inv))[inv]
    return ranks / (n - 1) - 0.5


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """JSON-able state of a numpy Generator (its bit generator's state dict)."""
    return jsonable(rng.bit_generator.state)


def rng_from_state(state: dict[str, Any]) -> np.random.Generator:
    """A numpy Generator restored from `rng_state` output (any bit generator numpy knows)."""
    bg = getattr(np.random, state["bit_generator"])()
    bg.state = state
    return np.random.Generator(bg)


def as_vector(x: Any, dim: int, what: str = "x0") -> np.ndarray:
    """`x` as a finite float64 vector of length `dim` (a copy), or a ValueError saying why not."""
    arr = np.array(x, dtype=np.float64).reshape(-1) if not hasattr(x, "detach") else (
        np.array(x.detach().cpu().double().numpy()).reshape(-1)
    )
    if arr.shape != (dim,):
        raise ValueError(f"{what} has {arr.size} entries, expected dim={dim}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains non-finite values")
    return arr


def _float_or_none(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


# --------------------------------------------------------------------------- base class
class Strategy(ABC):
    """Base of all strategies: batch ask/tell for maximisation, best tracking, checkpointing.

    Subclasses implement `_ask() -> list[Candidate]`, `_tell(candidates, fitnesses)` and
    `_state()` / `_load_state(d)` for their own fields; this class validates every `tell`
    (exactly the pending batch, in any order, one finite fitness each), numbers generations and
    keeps `best`. `ask()` returns `population` candidates unless a subclass documents otherwise.
    """

    name: ClassVar[str] = "base"

    def __init__(
        self, dim: int, population: int, seed: int, x0: Any = None, generations: int | None = None
    ) -> None:
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if int(population) < 1:
            raise ValueError(f"population must be >= 1, got {population}")
        if generations is not None and int(generations) < 1:
            raise ValueError(f"generations must be >= 1 or None, got {generations}")
        self.dim = int(dim)
        self.population = int(population)
        self.seed = int(seed)
        self.generations = None if generations is None else int(generations)
        self.x0 = np.zeros(self.dim) if x0 is None else as_vector(x0, self.dim)
        self._generation = 0
        self._pending: list[Candidate] | None = None
        self._best_theta: np.ndarray | None = None
        self._best_fitness = -math.inf
        self._best_id: str | None = None

    # ------------------------------------------------------------------ public API
    @property
    def generation(self) -> int:
        """Number of completed ask/tell rounds (the next ask belongs to this generation)."""
        return self._generation

    @property
    def pending(self) -> list[Candidate] | None:
        """The batch asked and not yet told, if any."""
        return None if self._pending is None else list(self._pending)

    def ask(self) -> list[Candidate]:
        """Propose the next batch of candidates; `tell` must follow before the next `ask`."""
        if self._pending is not None:
            raise RuntimeError(
                f"{self.name}: ask() called again before tell() of generation {self._generation}"
            )
        cands = self._ask()
        for c in cands:
            if c.theta.dtype != np.float64 or c.theta.shape != (self.dim,):
                raise AssertionError(f"{self.name} produced a bad theta {c.theta.dtype} {c.theta.shape}")
        self._pending = list(cands)
        return list(cands)

    def tell(self, candidates: Sequence[Candidate], fitnesses: Sequence[float] | np.ndarray) -> None:
        """Report fitnesses (maximised) for exactly the pending batch, in any order.

        NaN or infinite fitness is rejected: the search replaces failed candidates' fitness by
        the configured failure value before calling tell.
        """
        if self._pending is None:
            raise RuntimeError(f"{self.name}: tell() without a pending ask()")
        cands = list(candidates)
        fits = np.asarray(fitnesses, dtype=np.float64).reshape(-1)
        if len(cands) != fits.size:
            raise ValueError(
                f"{self.name}: tell() got {fits.size} fitnesses for {len(cands)} candidates"
            )
        if len(cands) != len(self._pending):
            raise ValueError(
                f"{self.name}: tell() got {len(cands)} candidates but {len(self._pending)} are pending "
                f"(tell the whole batch from the last ask)"
            )
        slot = {c.id: i for i, c in enumerate(self._pending)}
        aligned = np.empty(len(cands))
        seen = set()
        for c, f in zip(cands, fits, strict=True):
            if c.id not in slot or c.id in seen:
                raise ValueError(
                    f"{self.name}: candidate {c.id!r} is not (or twice) in the pending batch "
                    f"{sorted(slot)}"
                )
            if not math.isfinite(f):
                raise ValueError(
                    f"{self.name}: fitness of candidate {c.id!r} is {f}; replace NaN/inf fitness by "
                    f"the configured failure value before tell()"
                )
            seen.add(c.id)
            aligned[slot[c.id]] = f
        pending = self._pending
        self._tell(pending, aligned)
        i = int(np.argmax(aligned))
        if aligned[i] > self._best_fitness:
            self._best_fitness = float(aligned[i])
            self._best_theta = pending[i].theta.copy()
            self._best_id = pending[i].id
        self._pending = None
        self._generation += 1

    @property
    def best(self) -> tuple[np.ndarray, float]:
        """(theta, fitness) of the best candidate told so far (a copy)."""
        if self._best_theta is None:
            raise RuntimeError(f"{self.name}: no candidate has been told yet")
        return self._best_theta.copy(), self._best_fitness

    @property
    def best_id(self) -> str | None:
        """Id of the best candidate told so far."""
        return self._best_id

    def recommendation(self) -> np.ndarray:
        """The strategy's current point estimate (ES: the mean; default: the best told theta)."""
        return self.best[0]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (RNG states included); JSON-serialisable."""
        return {
            "strategy": self.name,
            "version": STATE_VERSION,
            "dim": self.dim,
            "population": self.population,
            "seed": self.seed,
            "generations": self.generations,
            "generation": self._generation,
            "x0": self.x0.tolist(),
            "pending": None if self._pending is None else [c.to_dict() for c in self._pending],
            "best_theta": None if self._best_theta is None else self._best_theta.tolist(),
            "best_fitness": _float_or_none(self._best_fitness),
            "best_id": self._best_id,
            "own": self._state(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore a `state_dict()`; the strategy must be built with the same name, dim, population."""
        for key, mine in (("strategy", self.name), ("dim", self.dim), ("population", self.population)):
            if d.get(key) != mine:
                raise ValueError(f"state_dict is for {key}={d.get(key)!r}, this strategy has {mine!r}")
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported strategy state version {d.get('version')!r}")
        self.seed = int(d["seed"])
        self.generations = d["generations"]
        self._generation = int(d["generation"])
        self.x0 = np.asarray(d["x0"], dtype=np.float64)
        self._pending = None if d["pending"] is None else [Candidate.from_dict(c) for c in d["pending"]]
        self._best_theta = None if d["best_theta"] is None else np.asarray(d["best_theta"], np.float64)
        self._best_fitness = -math.inf if d["best_fitness"] is None else float(d["best_fitness"])
        self._best_id = d["best_id"]
        self._load_state(d["own"])

    # ------------------------------------------------------------------ for subclasses
    def _cid(self, slot: int) -> str:
        return f"g{self._generation}-{slot}"

    @abstractmethod
    def _ask(self) -> list[Candidate]: ...

    @abstractmethod
    def _tell(self, candidates: list[Candidate], fitnesses: np.ndarray) -> None: ...

    @abstractmethod
    def _state(self) -> dict[str, Any]: ...

    @abstractmethod
    def _load_state(self, d: dict[str, Any]) -> None: ...

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self.dim}, population={self.population}, seed={self.seed}, "
            f"generation={self._generation})"
        )

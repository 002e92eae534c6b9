"""The ask/tell interface shared by every search strategy, and small pure helpers.

A `Strategy` proposes `Candidate`s (float64 parameter vectors with a lineage pointer), is told
their fitness (maximised), tracks the best candidate seen, and can be checkpointed with
`state_dict()` / `load_state_dict()` so that a resumed search asks exactly what an uninterrupted
one would. A strategy keeps all its own mutable state in one dataclass, `self.state`, which one
generic codec (`encode_state` / `decode_state`) turns into JSON-able data and back, field by field
from the type annotations; every built-in `state_dict()` is JSON-serialisable.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import math
import pickle
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar

import numpy as np

from mirrorlab.values import jsonable

# 2: the subclass state ("own") is written by `encode_state`; 1 (hand-written `_state`) is still read
STATE_VERSION = 2


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


# --------------------------------------------------------------------------- state codec
class _Pickled:
    """Type of the `PICKLED` marker."""

    def __repr__(self) -> str:
        return "PICKLED"


PICKLED = _Pickled()
"""Annotate a state field `Annotated[T, PICKLED]` to store it as one base64 pickle: for objects
that cannot be described field by field (a nevergrad optimiser)."""

T = TypeVar("T")
_SUPPORTED = ("np.ndarray (bool/int/uint/float), np.random.Generator, int, float, bool, str, bytes, None, "
              "X | None, list[X], tuple[X, ...], tuple[X, Y], dict[str, X], a dataclass, "
              "Annotated[X, PICKLED]")


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


# leaf type -> (accepts value, converts it); the same both ways (JSON gives the plain Python types)
_LEAVES: dict[Any, tuple[Callable[[Any], bool], Callable[[Any], Any]]] = {
    type(None): (lambda v: v is None, lambda v: None),
    bool: (lambda v: isinstance(v, bool | np.bool_), bool),
    int: (_is_int, int),
    float: (lambda v: _is_int(v) or isinstance(v, float | np.floating), float),  # inf/nan: json keeps them
    str: (lambda v: isinstance(v, str), str),
}


def _pickled(args: tuple[Any, ...]) -> bool:
    return any(m is PICKLED for m in args[1:])


def _items(tp: Any, args: tuple[Any, ...], n: int) -> tuple[Any, ...]:
    """Item annotations of a list / tuple annotation for `n` items."""
    if typing.get_origin(tp) is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        return args
    return (args[0],) * n


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, Any, bool], ...]:
    """(name, resolved annotation, init) per field of dataclass `cls`, every type checked up front."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = tuple((f.name, hints[f.name], f.init) for f in dataclasses.fields(cls))
    for name, tp, _ in out:
        _check_type(tp, f"{cls.__name__}.{name}")
    return out


def _check_type(tp: Any, path: str) -> None:
    """TypeError naming field `path` when the codec cannot handle annotation `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return None if _pickled(args) else _check_type(args[0], path)
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return _check_type(next(a for a in args if a is not type(None)), path)
    if origin in (list, tuple) and args:
        for i, a in enumerate(_items(tp, args, 1)):
            _check_type(a, f"{path}[{i}]")
        return None
    if origin is dict and args and args[0] is str:
        return _check_type(args[1], f"{path}[]")
    if tp in _LEAVES or tp in (np.ndarray, np.random.Generator, bytes) or origin is np.ndarray:
        return None
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        _fields(tp)
        return None
    raise TypeError(f"state field {path}: type {tp!r} is not supported by the state codec "
                    f"(supported: {_SUPPORTED})")


def _fail(path: str, want: str, value: Any) -> ValueError:
    return ValueError(f"state field {path}: expected {want}, got {type(value).__name__} {value!r:.60}")


def _walk(v: Any, tp: Any, path: str, enc: bool) -> Any:
    """`v` (annotated `tp`, already checked) encoded to JSON-able data (`enc`) or decoded from it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        if not _pickled(args):
            return _walk(v, args[0], path, enc)
        if enc:
            return base64.b64encode(pickle.dumps(v)).decode("ascii")
        if not isinstance(v, str):
            raise _fail(path, "a base64 pickle", v)
        return pickle.loads(base64.b64decode(v))
    if origin in (typing.Union, types.UnionType):
        return None if v is None else _walk(v, next(a for a in args if a is not type(None)), path, enc)
    if origin in (list, tuple):
        if not isinstance(v, list | tuple):
            raise _fail(path, "a list", v)
        items = _items(tp, args, len(v))
        if len(items) != len(v):
            raise _fail(path, f"{len(items)} items", v)
        out = [_walk(x, a, f"{path}[{i}]", enc) for i, (x, a) in enumerate(zip(v, items, strict=True))]
        return out if enc or origin is list else tuple(out)
    if origin is dict:
        if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
            raise _fail(path, "a dict with str keys", v)
        return {k: _walk(x, args[1], f"{path}[{k!r}]", enc) for k, x in v.items()}
    if tp is np.ndarray or origin is np.ndarray:
        return _encode_array(v, path) if enc else _decode_array(v, path)
    if tp is np.random.Generator:
        if enc and isinstance(v, np.random.Generator):
            return rng_state(v)
        if not enc and isinstance(v, dict) and "bit_generator" in v:
            return rng_from_state(v)
        raise _fail(path, "a numpy Generator" if enc else "a Generator state dict", v)
    if tp is bytes:
        if not isinstance(v, bytes if enc else str):
            raise _fail(path, "bytes" if enc else "a base64 str", v)
        return base64.b64encode(v).decode("ascii") if enc else base64.b64decode(v)
    if tp in _LEAVES:
        accepts, convert = _LEAVES[tp]
        if not accepts(v):
            raise _fail(path, tp.__name__, v)
        return convert(v)
    fields = _fields(tp)  # a dataclass
    if enc:
        if not isinstance(v, tp):
            raise _fail(path, tp.__name__, v)
        return {name: _walk(getattr(v, name), ftp, f"{path}.{name}", True) for name, ftp, _ in fields}
    if not isinstance(v, dict):
        raise _fail(path, f"a dict of {tp.__name__}'s fields", v)
    missing, unknown = sorted({f[0] for f in fields} - set(v)), sorted(set(v) - {f[0] for f in fields})
    if missing or unknown:
        raise ValueError(f"state {path}: missing field(s) {missing}, unknown field(s) {unknown}")
    values = {name: _walk(v[name], ftp, f"{path}.{name}", False) for name, ftp, _ in fields}
    obj = tp(**{name: values[name] for name, _, init in fields if init})
    for name, _, init in fields:
        if not init:
            object.__setattr__(obj, name, values[name])
    return obj


def _encode_array(a: Any, path: str) -> dict[str, Any]:
    """dtype, shape and the flat values (`.tolist()`: exact for bool, integer and float dtypes)."""
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "biuf":
        raise _fail(path, "a numpy array of bool, int, uint or float dtype", a)
    return {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.ravel().tolist()}


def _decode_array(d: Any, path: str) -> np.ndarray:
    """Inverse of `_encode_array`; a bare (nested) list, as version-1 state dicts wrote, is read as
    numpy reads it (float64 for floats, int64 for integers)."""
    if isinstance(d, dict):
        try:
            return np.array(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"state field {path}: not an encoded array ({e})") from None
    if isinstance(d, list | int | float) and not isinstance(d, bool):
        return np.array(d)
    raise _fail(path, "an encoded array", d)


def encode_state(obj: Any) -> dict[str, Any]:
    """JSON-able dict of the dataclass instance `obj`, walked field by field by type annotation
    (`_SUPPORTED`): arrays keep dtype and shape (float64 exactly), floats may be inf/nan."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"encode_state needs a dataclass instance, got {type(obj).__name__}")
    return _walk(obj, type(obj), type(obj).__name__, True)


def decode_state(cls: type[T], d: dict[str, Any]) -> T:
    """A fresh `cls` instance from `encode_state` output (or a JSON / pickle round trip of it);
    ValueError naming the field when `d` does not fit `cls`."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"decode_state needs a dataclass type, got {cls!r}")
    return _walk(d, cls, cls.__name__, False)


# --------------------------------------------------------------------------- base class
class Strategy(ABC):
    """Base of all strategies: batch ask/tell for maximisation, best tracking, checkpointing.

    Subclasses implement `_ask() -> list[Candidate]` and `_tell(candidates, fitnesses)` and keep
    all their own mutable state in one dataclass instance, `self.state` (None: no state), which
    `state_dict()` writes with `encode_state`; this class validates every `tell` (exactly the
    pending batch, in any order, one finite fitness each), numbers generations and keeps `best`.
    `ask()` returns `population` candidates unless a subclass documents otherwise. A subclass
    written before state dataclasses may still define `_state() -> dict` / `_load_state(d)`
    instead; `state_dict()` / `load_state_dict()` then call those.
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
        self.state: Any = None  # the subclass's state dataclass, set by its __init__

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
            "own": self._state() if self._legacy_state else (
                {} if self.state is None else encode_state(self.state)),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore a `state_dict()` of this version or version 1 (checkpoints written before the state
        codec); the strategy must be built with the same name, dim, population."""
        for key, mine in (("strategy", self.name), ("dim", self.dim), ("population", self.population)):
            if d.get(key) != mine:
                raise ValueError(f"state_dict is for {key}={d.get(key)!r}, this strategy has {mine!r}")
        version = d.get("version")
        if version not in (1, STATE_VERSION):
            raise ValueError(f"unsupported strategy state version {version!r}")
        own = None
        if not self._legacy_state and self.state is not None:  # decode first: a bad state changes nothing
            raw = d["own"] if version == STATE_VERSION else self._upgrade_state(d["own"], version)
            own = decode_state(type(self.state), raw)
        self.seed = int(d["seed"])
        self.generations = d["generations"]
        self._generation = int(d["generation"])
        self.x0 = np.asarray(d["x0"], dtype=np.float64)
        self._pending = None if d["pending"] is None else [Candidate.from_dict(c) for c in d["pending"]]
        self._best_theta = None if d["best_theta"] is None else np.asarray(d["best_theta"], np.float64)
        self._best_fitness = -math.inf if d["best_fitness"] is None else float(d["best_fitness"])
        self._best_id = d["best_id"]
        if self._legacy_state:
            self._load_state(d["own"])
        elif own is not None:
            self.state = own

    # ------------------------------------------------------------------ for subclasses
    def _cid(self, slot: int) -> str:
        return f"g{self._generation}-{slot}"

    @abstractmethod
    def _ask(self) -> list[Candidate]: ...

    @abstractmethod
    def _tell(self, candidates: list[Candidate], fitnesses: np.ndarray) -> None: ...

    @classmethod
    def _upgrade_state(cls, own: dict[str, Any], version: int) -> dict[str, Any]:
        """`own` of an older state `version` in this version's layout. Version 1 wrote arrays as bare
        lists, which the codec still reads; override where a field's form changed."""
        return own

    @property
    def _legacy_state(self) -> bool:
        """True for a subclass that hand-writes `_state()` / `_load_state(d)` (pre-codec plugins)."""
        return callable(getattr(self, "_state", None)) and callable(getattr(self, "_load_state", None))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self.dim}, population={self.population}, seed={self.seed}, "
            f"generation={self._generation})"
        )

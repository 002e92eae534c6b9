"""`nevergrad`: any registered nevergrad optimiser (CMA, TBPSA, NGOpt, OnePlusOne, DE, ...) behind
the mirrorlab ask/tell interface, with exact (pickled) checkpoints."""

from __future__ import annotations

import base64
import contextlib
import difflib
import pickle
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np

from .base import PICKLED, Candidate, Strategy

_SUGGESTED = ("CMA", "TBPSA", "NGOpt", "OnePlusOne", "DE", "TwoPointsDE", "PSO", "RandomSearch")


def resolve_optimizer(name: str) -> Any:
    """The nevergrad optimiser class/config registered as `name`, or ValueError listing some."""
    import nevergrad as ng

    reg = ng.optimizers.registry
    if isinstance(name, str) and name in reg:
        return reg[name]
    close = difflib.get_close_matches(str(name), list(reg), n=5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"unknown nevergrad optimizer {name!r}{hint} Allowed include: {', '.join(_SUGGESTED)} "
        f"({len(reg)} registered; see nevergrad.optimizers.registry)"
    )


@contextlib.contextmanager
def _private_global_rngs(states: dict[str, Any]) -> Iterator[None]:
    """Run with the strategy's own copies of numpy's and Python's global RNGs (some nevergrad
    optimisers draw from them), then put the caller's back: determinism whatever else runs."""
    outer_np, outer_py = np.random.get_state(), random.getstate()
    np.random.set_state(states["np"])
    random.setstate(states["py"])
    try:
        yield
    finally:
        states["np"], states["py"] = np.random.get_state(), random.getstate()
        np.random.set_state(outer_np)
        random.setstate(outer_py)


@dataclass
class NevergradObjects:
    """The live nevergrad objects: the optimiser, the pending batch's nevergrad candidates by our id,
    nevergrad uid -> our id (for lineage) and the private global-RNG states (`np`, `py`)."""

    opt: Any
    pending: dict[str, Any]
    uid_to_id: dict[str, str]
    rngs: dict[str, Any]


@dataclass
class NevergradState:
    """`nevergrad` state. The optimiser cannot be described field by field, so `live` is stored as
    one base64 pickle (one, so the candidates it shares with the optimiser stay shared);
    `optimizer` names the optimiser so that its state is never loaded into another one."""

    optimizer: str
    live: Annotated[NevergradObjects, PICKLED]


class NevergradStrategy(Strategy):
    """A nevergrad optimiser over R^dim: `optimizer` (a name in `nevergrad.optimizers.registry`,
    default "NGOpt"), budget = population * generations (required: NGOpt and others choose by
    budget), num_workers = population, parametrisation `ng.p.Array(init=x0)` with mutation `sigma`
    (the initial step size; CMA's sigma0). nevergrad minimises, so it is told -fitness.

    A candidate's `parent_ids` name the earlier candidate whose nevergrad lineage (heritage) it
    continues, when there is one; its note reads "ng:<optimizer>@g<k>". Seeded through the
    parametrisation's random_state plus private copies of the global numpy/Python RNGs (some
    optimisers draw from those); `state_dict` pickles the optimiser with its pending candidates
    (base64, see `NevergradState`), so a resume asks exactly the same points.
    """

    name = "nevergrad"
    state: NevergradState

    @staticmethod
    def check_params(params: dict[str, Any]) -> None:
        """Config-time check: the optimiser name must exist in nevergrad's registry."""
        if "optimizer" in params:
            resolve_optimizer(params["optimizer"])

    def __init__(self, dim: int, population: int, seed: int, x0: Any = None,
                 generations: int | None = None, optimizer: str = "NGOpt", sigma: float = 1.0) -> None:
        super().__init__(dim, population, seed, x0, generations)
        if self.generations is None:
            raise ValueError("nevergrad needs generations (budget = population x generations)")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        import nevergrad as ng

        cls = resolve_optimizer(optimizer)
        self.optimizer_name, self.sigma = optimizer, float(sigma)
        rs = np.random.RandomState(self.seed % 2**32)
        rngs = {"np": rs.get_state(), "py": random.Random(self.seed).getstate()}
        self.state = NevergradState(optimizer, NevergradObjects(None, {}, {}, rngs))
        param = ng.p.Array(init=self.x0.copy()).set_mutation(sigma=self.sigma)
        param.random_state = np.random.RandomState((self.seed + 1) % 2**32)
        budget = self.population * self.generations
        with self._ctx():
            self.state.live.opt = cls(parametrization=param, budget=budget, num_workers=self.population)

    @contextlib.contextmanager
    def _ctx(self) -> Iterator[None]:
        with _private_global_rngs(self.state.live.rngs), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # budget / num_workers advisories
            yield

    def _ask(self) -> list[Candidate]:
        out, live = [], self.state.live
        with self._ctx():
            for i in range(self.population):
                c = live.opt.ask()
                cid = self._cid(i)
                lineage = c.heritage.get("lineage")
                parents = ((live.uid_to_id[lineage],)
                           if lineage in live.uid_to_id and lineage != c.uid else ())
                live.uid_to_id[c.uid] = cid
                live.pending[cid] = c
                out.append(Candidate(np.array(c.value, dtype=np.float64).reshape(-1), cid, parent_ids=parents,
                                     note=f"ng:{self.optimizer_name}@g{self._generation}"))
        return out

    def _tell(self, candidates: list[Candidate], fitnesses: np.ndarray) -> None:
        live = self.state.live
        with self._ctx():
            for c, f in zip(candidates, fitnesses, strict=True):
                live.opt.tell(live.pending.pop(c.id), -float(f))
        live.pending.clear()

    def recommendation(self) -> np.ndarray:
        """nevergrad's recommendation, computed on a copy so the live optimiser is untouched."""
        opt, _ = pickle.loads(pickle.dumps((self.state.live.opt, None)))
        with _private_global_rngs(dict(self.state.live.rngs)):
            return np.array(opt.provide_recommendation().value, dtype=np.float64).reshape(-1)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """`Strategy.load_state_dict`, refusing the state of another nevergrad optimiser."""
        own = d.get("own")
        theirs = own.get("optimizer", self.optimizer_name) if isinstance(own, dict) else self.optimizer_name
        if theirs != self.optimizer_name:
            raise ValueError(f"state is for optimizer {theirs!r}, not {self.optimizer_name!r}")
        super().load_state_dict(d)

    @classmethod
    def _upgrade_state(cls, own: dict[str, Any], version: int) -> dict[str, Any]:
        """Version 1 pickled a bare (optimiser, pending, uid map, RNG states) tuple, next to sigma."""
        live = NevergradObjects(*pickle.loads(base64.b64decode(own["pickle"])))
        return {"optimizer": own["optimizer"], "live": base64.b64encode(pickle.dumps(live)).decode("ascii")}

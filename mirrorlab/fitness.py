"""Noise-aware fitness of a search candidate (DESIGN section 5), pure functions: a candidate's
`Score` from its per-seed outcomes (paired with the baseline's on the same seeds), its standard
error, the racing rungs over seeds, the values told to the strategy and the incumbent rule.
`mirrorlab.search` runs the loop; `mirrorlab.journal` keeps its records."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mirrorlab.records import FAILED, FINISHED, Outcome, merge_samples


@dataclass(frozen=True)
class Score:
    """A candidate's fitness aggregated over the inner seeds it ran (paired if a baseline is set)."""

    status: str
    fitness: float | None
    stderr: float | None
    values: tuple[float, ...]  # per seed (paired differences with a baseline)
    seeds: tuple[int, ...]
    metric: float | None = None  # mean raw metric (unpaired)
    mean_length: float | None = None
    error: str | None = None
    rung: int = 0
    workers: tuple[str, ...] = ()
    curves: tuple[dict[str, float], ...] = ()  # inner training curves, mean over seeds per step
    samples: dict[str, list[dict[str, Any]]] | None = None  # completion tables, rows of every seed
    timings: tuple[tuple[str, float], ...] = ()  # summed over seeds
    steps: int = 0  # inner steps this candidate trained (all seeds, all racing rungs)
    started_at: float | None = None  # the first seed's job start, the last one's end (unix s)
    ended_at: float | None = None

    @property
    def ok(self) -> bool:
        """True when every seed finished."""
        return self.status == FINISHED


def paired_stderr(values: list[float], a: Outcome, b: Outcome | None) -> float | None:
    """Standard error of a mean fitness: the spread of >= 2 per-seed values, else (one seed) the
    per-problem paired differences with the baseline `b`, else the run's own sampling error."""
    if len(values) >= 2:
        return float(np.std(values, ddof=1) / math.sqrt(len(values)))
    if b is not None and len(a.scores) == len(b.scores) >= 2:
        d = np.asarray(a.scores) - np.asarray(b.scores)
        d = d[~np.isnan(d)]  # problems either run's task could not judge are left out of the pairs
        if d.size >= 2:
            return float(np.std(d, ddof=1) / math.sqrt(d.size))
    return a.stderr


def aggregate(outs: list[Outcome], seeds: list[int], baselines: list[Outcome] | None = None,
              rung: int = 0) -> Score:
    """The Score of one candidate from its per-seed outcomes (and, paired, the baseline's on the
    same seeds). Any failed seed fails the candidate, with that seed's error."""
    workers = tuple(sorted({o.worker for o in outs if o.worker}))
    timings: dict[str, float] = {}
    for o in outs:
        for k, v in o.timings.items():
            timings[k] = timings.get(k, 0.0) + float(v)
    starts = [o.started_at for o in outs if o.started_at is not None]
    ends = [o.ended_at for o in outs if o.ended_at is not None]
    common = {"rung": rung, "workers": workers, "timings": tuple(sorted(timings.items())),
              "started_at": min(starts, default=None), "ended_at": max(ends, default=None)}
    for o, s in zip(outs, seeds, strict=True):
        if o.status != FINISHED:
            return Score(FAILED, None, None, (), tuple(seeds), error=f"seed {s}: {o.error}", **common)
    if baselines is not None:
        for b, s in zip(baselines, seeds, strict=True):
            if b.status != FINISHED:
                return Score(FAILED, None, None, (), tuple(seeds),
                             error=f"paired baseline failed on seed {s}: {b.error}", **common)
    base = [b.fitness for b in baselines] if baselines is not None else [0.0] * len(outs)
    values = [float(o.fitness) - float(bf) for o, bf in zip(outs, base, strict=True)]
    se = paired_stderr(values, outs[0], baselines[0] if baselines is not None else None)
    lengths = [o.mean_length for o in outs if o.mean_length is not None]
    return Score(FINISHED, float(np.mean(values)), se, tuple(values), tuple(seeds),
                 metric=float(np.mean([o.metric if o.metric is not None else o.fitness for o in outs])),
                 mean_length=float(np.mean(lengths)) if lengths else None,
                 curves=mean_curves([o.curves for o in outs]), samples=merge_samples(outs, seeds),
                 **common)


def mean_curves(curves: list[list[dict[str, float]]]) -> tuple[dict[str, float], ...]:
    """Per step, the mean over seeds of each metric the seeds' curves share."""
    n = min((len(c) for c in curves), default=0)
    out = []
    for i in range(n):
        rows = [c[i] for c in curves]
        keys = set(rows[0]).intersection(*rows[1:])
        out.append({k: float(np.mean([r[k] for r in rows])) for k in sorted(keys)})
    return tuple(out)


def racing_rungs(seeds: int, min_seeds: int, eta: int) -> list[int]:
    """Cumulative seeds per rung of successive halving: min_seeds, x eta, ..., up to `seeds`."""
    out, n = [], max(1, min(int(min_seeds), int(seeds)))
    while n < seeds:
        out.append(n)
        n *= int(eta)
    return out + [int(seeds)]


def full_length(scores: list[Score], ec: Any) -> list[bool]:
    """Per score, whether it was measured at the full inner-run length (always, except candidates
    dropped at a short rung of multi-fidelity racing, `racing.steps`)."""
    if not (ec.racing.enabled and ec.racing.steps):
        return [True] * len(scores)
    last = len(ec.racing.steps) - 1
    return [s.rung == last for s in scores]


def tell_values(scores: list[Score], full: list[bool], failure_value: float) -> list[float]:
    """What the strategy is told: the fitness; a failure's configured value; a candidate dropped at a
    short racing rung, whose short-run fitness is another quantity, no more than the worst
    full-length fitness of its generation (so every survivor ranks above every dropped one)."""
    finals = [s.fitness for s, f in zip(scores, full, strict=True) if s.ok and f]
    floor = min(finals) if finals else None
    out = []
    for s, f in zip(scores, full, strict=True):
        if not s.ok:
            out.append(failure_value)
        elif f or floor is None:
            out.append(float(s.fitness))
        else:
            out.append(min(float(s.fitness), floor))
    return out


def criterion(fitness: float, stderr: float | None, rule: str, z: float) -> float:
    """The incumbent rule: the mean, or its lower confidence bound mean - z * stderr."""
    if rule == "lcb":
        return float(fitness) - float(z) * float(stderr or 0.0)
    return float(fitness)


@dataclass(frozen=True)
class Entry:
    """A finished candidate the search keeps: the incumbent, or a member of the confirmation pool
    (its theta, id, generation, per-seed fitness values, mean fitness and standard error)."""

    theta: np.ndarray
    id: str
    generation: int
    values: tuple[float, ...]
    fitness: float
    stderr: float | None

    def rank(self, rule: str, z: float) -> float:
        """Its value under the incumbent rule (`criterion`)."""
        return criterion(self.fitness, self.stderr, rule, z)

    def with_values(self, values: list[float]) -> Entry:
        """The entry after re-evaluation: the mean of all its values and their standard error."""
        stderr = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else self.stderr
        return replace(self, values=tuple(values), fitness=float(np.mean(values)), stderr=stderr)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (the checkpoint's form)."""
        return {"theta": np.asarray(self.theta).tolist(), "id": self.id, "generation": self.generation,
                "values": list(self.values), "fitness": self.fitness, "stderr": self.stderr}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Entry:
        """Inverse of `to_dict`."""
        return cls(np.asarray(d["theta"], dtype=np.float64), str(d["id"]), int(d["generation"]),
                   tuple(float(v) for v in d["values"]), float(d["fitness"]), d["stderr"])


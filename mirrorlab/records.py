"""Plain records shared by the executors, the evaluators, the tracker and the search (bottom layer).

`Job` is one inner run the search asks for; `Outcome` is what comes back (plain data, picklable,
JSON-able for the resume journal). Nothing here imports another mirrorlab module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FINISHED = "FINISHED"
FAILED = "FAILED"
ROLES = ("candidate", "incumbent", "baseline", "confirm")


class CandidateTimeout(TimeoutError):
    """Raised inside an evaluation when its deadline has passed."""


@dataclass
class Job:
    """One evaluation: a theta, where it sits in the search, its common-random-numbers seed.

    `index` is the job's position in its batch; `candidate` the candidate's slot in its generation
    (one candidate has one job per inner seed); `role` what is trained: the candidate's map
    (`candidate`, `incumbent` re-evaluation, `confirm` stage) or the paired `baseline`.
    """

    generation: int
    index: int
    theta: np.ndarray
    seed: int
    timeout_s: float | None = None
    role: str = "candidate"
    candidate: int = -1
    eval_size: int | None = None  # validation problems (a seeded subset); None = the whole split
    # extra measurements beyond the fitness (the probe's): see `mirrorlab.inner.MEASURES`
    measure: dict[str, Any] = field(default_factory=dict)
    inner_steps: int | None = None  # this job's inner steps (None: search.evaluator.inner_steps)
    deadline: float | None = None  # set by the executor when the job starts (time.monotonic)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Job.role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.candidate < 0:
            self.candidate = self.index


@dataclass
class Outcome:
    """What an evaluation returns to the search (plain data, picklable, JSON-able)."""

    generation: int
    index: int
    status: str
    fitness: float | None = None
    stderr: float | None = None
    metric: float | None = None
    mean_length: float | None = None
    n_eval: int | None = None
    reward_errors: int | None = None  # evaluation completions the task could not judge (left out of n_eval)
    error: str | None = None
    curves: list[dict[str, float]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    worker: str = ""
    label: str = ""  # the job's role
    scores: list[float] = field(default_factory=list)  # per validation problem (paired errors)
    # completion samples by table name (`step_0001`, `eval_val`: lists of row dicts, bounded by
    # train.log_completions); logged on the candidate's MLflow run, kept out of `to_dict`
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # what `Job.measure` asked for: per-problem lists by name (fitness proxies, test scores, scores
    # at shorter horizons) and their cost in seconds (`cost_s`)
    extra: dict[str, Any] = field(default_factory=dict)
    # wall-clock start and end of the job in the worker that ran it (unix seconds): the MLflow
    # run of a candidate is created after the job, with these times, not its own
    started_at: float | None = None
    ended_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (used by the resume journal and the baseline cache), without `samples`:
        the journal stays small, and a job reused from it after a resume has none."""
        d = dict(self.__dict__)
        d.pop("samples", None)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Outcome:
        """Inverse of `to_dict`."""
        return cls(**d)


def merge_samples(outs: list[Outcome], seeds: list[int]) -> dict[str, list[dict[str, Any]]]:
    """The completion samples of one candidate's per-seed outcomes, table by table, each row
    tagged with its seed (what the candidate's child run logs)."""
    merged: dict[str, list[dict[str, Any]]] = {}
    for o, s in zip(outs, seeds, strict=True):
        for name, rows in (o.samples or {}).items():
            merged.setdefault(name, []).extend({"seed": int(s), **r} for r in rows)
    return merged


def check_deadline(job: Job) -> None:
    """Raise CandidateTimeout when `job`'s deadline has passed (for cooperative timeouts)."""
    if job.deadline is not None and time.monotonic() > job.deadline:
        raise CandidateTimeout(f"candidate exceeded its time limit of {job.timeout_s} s")

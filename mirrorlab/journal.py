"""What a search writes and resumes from: the generation records and the result, the atomic
checkpoint with its sha256, the per-generation journal of finished jobs, and `SearchRecorder`,
which alone writes them (and the MLflow child runs, through the tracker) in order on one thread.
`mirrorlab.search` runs the loop; `mirrorlab.fitness` scores the candidates."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mirrorlab.config import Config
from mirrorlab.records import Job, Outcome

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.json"
CHECKPOINT_VERSION = 3  # 3: a sha256 of the content; journal lines carry their own


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class GenerationRecord:
    """One generation, written once: per candidate its id, lineage, hash, aggregate fitness, seeds
    used and budget (inner steps), plus the incumbent after it and how many jobs were reused."""

    generation: int
    ids: list[str]
    parent_ids: list[list[str]]
    notes: list[str]
    shas: list[str]
    status: list[str]
    fitness: list[float | None]
    stderr: list[float | None]
    n_seeds: list[int]
    budget_steps: list[int]
    errors: list[str | None]
    best_fitness: float | None
    mean_fitness: float | None
    incumbent_id: str | None
    incumbent_fitness: float | None
    incumbent_reevaluation: float | None  # this generation's re-evaluated fitness of the incumbent
    seeds: list[int]
    reused_jobs: int
    wall_s: float
    compute_s: float

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationRecord:
        """Inverse of `dataclasses.asdict` (checkpoint loading)."""
        return cls(**d)


@dataclass
class SearchResult:
    """The outcome of a search: the answer (confirmed when the stage ran, else the incumbent)."""

    best_theta: np.ndarray
    best_fitness: float
    best_stderr: float | None
    best_id: str | None
    best_run_id: str | None
    history: list[GenerationRecord]
    parent_run_id: str | None
    registered_uri: str | None
    wall_s: float
    timings: dict[str, float] = field(default_factory=dict)
    confirmation: dict[str, Any] | None = None  # the confirm stage's table, when it ran
    inner_steps_spent: int = 0  # all inner GBMPO steps the search trained (baselines included)
    best_map: str | None = None  # the answer saved as a map directory (when the search has a report_dir)
    report_files: list[str] = field(default_factory=list)  # plots written and logged on the parent run

    def fitness_history(self) -> list[list[float | None]]:
        """Per generation, the candidates' fitness (None for FAILED)."""
        return [list(g.fitness) for g in self.history]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        d = asdict(self)
        d["best_theta"] = np.asarray(self.best_theta).tolist()
        return d


def lineage_records(history: list[GenerationRecord]) -> list[dict[str, Any]]:
    """Candidates of a search history as plain dicts for `plots.plot_lineage` (the first of each
    candidate's structured `parent_ids`: another candidate, or a strategy point like `mean@g3`)."""
    return [{"id": cid, "generation": g.generation, "fitness": fit, "parent": pids[0] if pids else None,
             "status": st}
            for g in history
            for cid, pids, st, fit in zip(g.ids, g.parent_ids, g.status, g.fitness, strict=True)]


# --------------------------------------------------------------------------- checkpoints
def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON to `path` so a crash leaves either the old or the new file, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - platforms without directory fsync
        pass


class CheckpointError(ValueError):
    """A checkpoint or journal that cannot be trusted (truncated, edited, another version); the
    message names the file and what to do. Nothing of it is loaded."""


def _digest(data: Any) -> str:
    """sha256 of the canonical JSON of `data` (sorted keys): what the checkpoint and journal carry."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically with the sha256 of its content (checked on load)."""
    atomic_write_json(path, {**state, "sha256": _digest(state)})


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by `write_checkpoint`, or CheckpointError: not JSON (truncated), another
    version, missing fields, or content that does not match its sha256 (edited)."""
    try:
        ck = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({e}); it may be truncated. Move it away "
                              "to start the search anew") from None
    if not isinstance(ck, dict) or ck.get("version") != CHECKPOINT_VERSION:
        v = ck.get("version") if isinstance(ck, dict) else None
        raise CheckpointError(f"{path}: checkpoint version {v} cannot be resumed by this mirrorlab (version "
                              f"{CHECKPOINT_VERSION}); start anew")
    want = ck.pop("sha256", None)
    if want != _digest(ck):
        raise CheckpointError(f"{path}: content does not match its sha256 (edited or corrupt); refusing to "
                              "resume from it. Move it away to start anew")
    missing = sorted(set(_CHECKPOINT_KEYS) - set(ck))
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}; start anew")
    return ck


_CHECKPOINT_KEYS = ("version", "completed_generations", "strategy", "history", "incumbent", "pool",
                    "baselines", "confirmation", "steps_spent", "parent_run_id", "config", "seed", "run_ids")


def journal_path(ckpt_dir: Path, generation: int) -> Path:
    """The journal of finished jobs of `generation` (the confirmation stage uses generations)."""
    return ckpt_dir / f"generation_{generation:04d}.journal.jsonl"


def read_journal(path: Path) -> dict[str, dict[str, Any]]:
    """Entries of a generation journal by job key. A torn last line (a kill during the append:
    no newline at the end of the file) is dropped; any other line that is not JSON or does not
    match its sha256 raises CheckpointError (the journal was edited or corrupted)."""
    out: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return out
    text = path.read_text()
    lines = text.split("\n")
    torn = lines.pop()  # "" when the file ends with a newline
    for i, line in enumerate(lines, 1):
        try:
            e = json.loads(line)
            want = e.pop("sha256")
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
            raise CheckpointError(f"{path}, line {i}: not a journal entry; the journal is corrupt. Delete it "
                                  "to re-run that generation's jobs") from None
        if want != _digest(e):
            raise CheckpointError(f"{path}, line {i}: entry does not match its sha256 (edited); delete the "
                                  "journal to re-run that generation's jobs")
        out[str(e["key"])] = e
    if torn:
        log.warning("%s: dropped a torn last line (%d bytes) left by an interrupted write", path, len(torn))
    return out


def append_journal(path: Path, entry: dict[str, Any]) -> None:
    """Append one entry (with its own sha256) to a journal and fsync it (`read_journal` reads it)."""
    with open(path, "a") as f:
        f.write(json.dumps({**entry, "sha256": _digest(entry)}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def job_key(role: str, slot: int, seed: int, fidelity: str = "") -> str:
    """Journal key of a job: what is trained (role and candidate slot) on which seed, and for how
    many inner steps when that is not `search.evaluator.inner_steps` (`fidelity` = "@T")."""
    return f"baseline:{seed}{fidelity}" if role == "baseline" else f"{role}:{slot}:{seed}{fidelity}"


def step_rungs(steps: list[int], inner_steps: int) -> list[int | None]:
    """The inner-step rungs of multi-fidelity racing: the configured ones, the last being the full
    `inner_steps` (None: the evaluator's default length)."""
    return [None if t == inner_steps else int(t) for t in steps]


def run_key(role: str, candidate_id: str) -> str:
    """Key of a child run in the recorder's map: the candidate id, or `confirm:<id>`."""
    return candidate_id if role == "candidate" else f"{role}:{candidate_id}"


# --------------------------------------------------------------------------- the recorder
@dataclass(frozen=True)
class ChildLog:
    """One child run to log: the candidate, its aggregate outcome and its lineage."""

    job: Job
    outcome: Outcome
    candidate_id: str
    parent_ids: tuple[str, ...]
    note: str
    sha: str
    extra: dict[str, float]
    seeds: list[int]


class SearchRecorder:
    """Everything a search writes, in one place: the journal of finished jobs (synchronously, in
    the search thread), and on one background thread, in order, the child runs of each finished
    generation, its summary metrics, the new incumbent's plot and then the checkpoint. It alone
    owns the candidate id -> run id map, so no record is changed after it is made."""

    def __init__(self, cfg: Config, tracker: Any, checkpoint_dir: Path, timings: dict[str, float]) -> None:
        self.cfg, self.tracker, self.dir, self.timings = cfg, tracker, checkpoint_dir, timings
        self.run_ids: dict[str, str] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mirrorlab-tracking")
        self._last: Future[None] | None = None
        self.dir.mkdir(parents=True, exist_ok=True)

    # -- journal (search thread)
    def journal(self, generation: int, key: str, sha: str, outcome: Outcome) -> None:
        """Append one finished job to its generation's journal (fsynced)."""
        append_journal(journal_path(self.dir, generation),
                        {"key": key, "sha": sha, "outcome": outcome.to_dict()})

    def journalled(self, generation: int) -> dict[str, dict[str, Any]]:
        """Jobs of `generation` finished before an interruption."""
        return read_journal(journal_path(self.dir, generation))

    # -- background writes
    def submit(self, generation: int, children: list[ChildLog], summary: dict[str, float] | None,
               plot: tuple[str, np.ndarray] | None, checkpoint: dict[str, Any]) -> None:
        """Queue a finished generation (or the confirmation stage): children, summary, plot, checkpoint."""
        self.wait()  # the previous generation's (long done, normally): its errors surface here
        self._last = self._pool.submit(self._write, generation, children, summary, plot, checkpoint)

    def _write(self, generation: int, children: list[ChildLog], summary: dict[str, float] | None,
               plot: tuple[str, np.ndarray] | None, checkpoint: dict[str, Any]) -> None:
        t0 = time.monotonic()
        for c in children:
            if c.job.role == "baseline":
                self.tracker.log_baseline(c.job, c.outcome, candidate_id=c.candidate_id)
                continue
            parent_run = self.run_ids.get(c.parent_ids[0]) if c.parent_ids else None
            rid = self.tracker.log_candidate(
                c.job, c.outcome, candidate_id=c.candidate_id, parent_ids=c.parent_ids, note=c.note,
                parent_run=parent_run, sha=c.sha, extra=c.extra, seeds=c.seeds)
            if rid is not None:
                self.run_ids[run_key(c.job.role, c.candidate_id)] = rid
        if summary is not None:
            self.tracker.log_generation(generation, summary)
        if plot is not None and self.cfg.tracking.plot_scope == "incumbents":
            self.tracker.log_plot(self.run_ids.get(plot[0]), plot[1])
        self.timings["tracking_bg_s"] += time.monotonic() - t0
        t = time.monotonic()
        write_checkpoint(self.dir / CHECKPOINT, {**checkpoint, "run_ids": dict(self.run_ids)})
        journal_path(self.dir, generation).unlink(missing_ok=True)
        self.timings["checkpoint_s"] += time.monotonic() - t

    def wait(self) -> None:
        """Wait for the queued writes; re-raise their error."""
        if self._last is not None:
            f, self._last = self._last, None
            f.result()

    def close(self) -> None:
        """Finish the queued writes and stop the thread."""
        self._pool.shutdown(wait=True)

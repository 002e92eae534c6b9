"""The search (outer loop, DESIGN section 5): ask, evaluate, tell, record, then confirm.

`Search(cfg).run()` proposes mirror-map parameter vectors with a strategy, scores each through an
executor (`local`, `process`, `ray`: the loop does not know which) and an evaluator (by default a
short inner GBMPO run), and hands every result to one `SearchRecorder`, which owns what is written:
the resume journal, the MLflow child runs and the checkpoint. One generation reads straight:

    candidates = strategy.ask()
    scores     = score(candidates, seeds)        # k seeds each, paired, raced; journal reused
    strategy.tell(candidates, fitness)
    incumbent  = re-evaluated / chosen by mean or lower confidence bound
    recorder.generation(record)                  # an immutable GenerationRecord

Noise-aware fitness (`search.evaluator`):
- `seeds`: k inner seeds per candidate, the same k for every candidate of a generation (common
  random numbers; `resample_each_generation: false` fixes them for the whole search); fitness is
  the mean over seeds, its standard error the spread of the k values (which holds both seed and
  validation-sampling noise) or, for k = 1, the sampling error alone.
- `baseline`: paired fitness. A baseline divergence (e.g. KL) is trained once per seed (cached,
  checkpointed) and each candidate's fitness is its metric minus the baseline's on the same seed
  and validation subset, so fitness is comparable across generations and its noise is the paired
  noise (for k = 1 the per-problem paired differences give the standard error).
- `racing`: successive halving over seeds; budget spent per candidate goes to MLflow.
- `incumbent`: `mean` or `lcb` (mean - z stderr); optional re-evaluation on each generation's seeds.
- `confirm`: after the last generation the top-k candidates are re-scored on fresh seeds the search
  never used; the best confirmed one is the answer, registered with its confirmed fitness.

Resume: the checkpoint (JSON, atomic) holds the strategy state, the history, the incumbent, the
confirmation pool, the baseline cache and the run ids. While a generation runs every finished job
is appended to that generation's journal; a resumed search asks the interrupted generation again
(the strategy state is exact), reuses journalled jobs with the same theta hash, deletes child runs
of the interrupted generation (they are logged only once a generation is complete) and goes on.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mirrorlab import divergences, plots, strategies
from mirrorlab.config import Config, dump_config
from mirrorlab.evaluators import build_evaluator, confirmation_seeds, generation_seeds
from mirrorlab.executors import Executor, make_executor
from mirrorlab.records import FAILED, FINISHED, Job, Outcome, merge_samples
from mirrorlab.spaces import NeuralSpace, SearchSpace, make_space
from mirrorlab.strategies import Candidate
from mirrorlab.tracking import make_tracker

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.json"
CHECKPOINT_VERSION = 3  # 3: a sha256 of the content; journal lines carry their own


# --------------------------------------------------------------------------- fitness (pure)
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


# --------------------------------------------------------------------------- the search
class Search:
    """The outer loop, built from a validated `Config` (space, strategy, evaluator, executor, tracker)."""

    def __init__(self, cfg: Config, evaluator: Any = None, report_dir: str | Path | None = None) -> None:
        self.cfg = cfg
        self.report_dir = Path(report_dir) if report_dir is not None else None
        sc = cfg.search
        self.space: SearchSpace = make_space(sc.space, cfg.divergence.coef)
        self.evaluator = evaluator if evaluator is not None else build_evaluator(cfg)
        params = dict(sc.strategy.params)
        if "sampler" in (strategies.param_names(sc.strategy.name) or ()) and "sampler" not in params:
            params["sampler"] = self.space.initial  # `random`: draw from the space's own init
        self._new_strategy = lambda: strategies.get(
            sc.strategy.name, dim=self.space.dim, population=sc.strategy.population, seed=cfg.seed,
            x0=self.space.initial(cfg.seed), generations=sc.strategy.generations, **params,
        )
        self.strategy = self._new_strategy()
        self.checkpoint_dir = Path(sc.checkpoint_dir or Path(cfg.output_dir) / cfg.name / "search")
        self.executor: Executor | None = None
        self.tracker: Any = None
        self.recorder: SearchRecorder | None = None
        self.history: list[GenerationRecord] = []
        # the incumbent: theta, id, generation, values (per-seed fitness), fitness, stderr
        self.incumbent: dict[str, Any] | None = None
        self.pool: list[dict[str, Any]] = []  # the top-k candidates for the confirmation stage
        self.baselines: dict[str, dict[str, Any]] = {}  # "seed:val_size" -> baseline Outcome dict
        self.confirmation: dict[str, Any] | None = None
        self.steps_spent = 0
        self.parent_run: str | None = None
        # optional progress display (e.g. mirrorlab.progress.SearchProgress): any of
        # on_search_start(generations, population, start_generation), on_generation_start(g, n),
        # on_candidate_end(g, id, fitness, status), on_generation_end(g, best, mean, failures),
        # on_search_end(result)
        self.progress: Any = None
        self.timings = dict.fromkeys(
            ("setup_s", "tracking_s", "tracking_bg_s", "checkpoint_s", "strategy_s", "compute_s",
             "reset_s", "train_s", "eval_s", "job_s"), 0.0)
        self._resumed_at: int | None = None
        self._failed_baselines: dict[str, dict[str, Any]] = {}  # this generation's, never cached
        self._jobs_reused = 0
        self._compute = 0.0

    # ------------------------------------------------------------------ checkpoint
    @property
    def checkpoint_path(self) -> Path:
        """Where the checkpoint of the last complete generation lives."""
        return self.checkpoint_dir / CHECKPOINT

    def _checkpoint(self, completed: int) -> dict[str, Any]:
        """A JSON-able snapshot of the search state after `completed` generations (run ids are
        added by the recorder when it writes it)."""
        def theta_free(d: dict[str, Any] | None) -> dict[str, Any] | None:
            return None if d is None else {**d, "theta": np.asarray(d["theta"]).tolist()}

        return {
            "version": CHECKPOINT_VERSION, "completed_generations": completed,
            "strategy": copy.deepcopy(self.strategy.state_dict()),
            "history": [asdict(g) for g in self.history],
            "incumbent": theta_free(self.incumbent), "pool": [theta_free(p) for p in self.pool],
            "baselines": copy.deepcopy(self.baselines), "confirmation": copy.deepcopy(self.confirmation),
            "steps_spent": self.steps_spent, "parent_run_id": self.parent_run,
            "config": dump_config(self.cfg), "seed": self.cfg.seed,
        }

    def _load_checkpoint(self) -> dict[str, Any] | None:
        """Restore from the checkpoint, all or nothing: every part is parsed (and the strategy state
        loaded into a fresh strategy) before any of this search's state changes."""
        if not self.checkpoint_path.is_file():
            return None
        ck = read_checkpoint(self.checkpoint_path)
        if ck["config"] != dump_config(self.cfg):
            log.warning("resuming %s with a config differing from the checkpointed one", self.checkpoint_path)

        def with_theta(d: dict[str, Any] | None) -> dict[str, Any] | None:
            return None if d is None else {**d, "theta": np.asarray(d["theta"], dtype=np.float64)}

        try:
            strategy = self._new_strategy()
            strategy.load_state_dict(ck["strategy"])
            history = [GenerationRecord.from_dict(g) for g in ck["history"]]
            incumbent, pool = with_theta(ck["incumbent"]), [with_theta(p) for p in ck["pool"]]
            baselines, steps = dict(ck["baselines"]), int(ck["steps_spent"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{self.checkpoint_path}: cannot restore the search from it ({e}); start anew") from None
        self.strategy, self.history, self.incumbent, self.pool = strategy, history, incumbent, pool
        self.baselines, self.confirmation, self.steps_spent = baselines, ck["confirmation"], steps
        return ck

    # ------------------------------------------------------------------ main loop
    def _make_executor(self) -> Executor:
        ex = self.cfg.search.executor
        return make_executor(ex.kind, self.evaluator, **ex.model_dump(exclude={"kind"}))

    def run(self, resume: bool = False) -> SearchResult:
        """Run (or, with `resume`, continue from the last checkpoint) all generations, then the
        confirmation stage, then register the answer."""
        t_start = time.monotonic()
        sc = self.cfg.search
        start_gen, run_ids = 0, {}
        if resume:
            ck = self._load_checkpoint()
            if ck is not None:
                start_gen, self.parent_run, run_ids = (int(ck["completed_generations"]), ck["parent_run_id"],
                                                       ck["run_ids"])
                self._resumed_at = start_gen
        elif self.checkpoint_path.exists():
            self.checkpoint_path.unlink()
            for j in self.checkpoint_dir.glob("generation_*.journal.jsonl"):
                j.unlink()
        self.executor = self._make_executor()
        self.executor.launch()  # worker processes load the model while the tracker starts
        t = time.monotonic()
        try:
            self.tracker = make_tracker(self.cfg, sc.strategy.name, self.space)
            self.parent_run = self.tracker.start(resume_run_id=self.parent_run)
        except BaseException:
            self.executor.close()
            raise
        self.recorder = SearchRecorder(self.cfg, self.tracker, self.checkpoint_dir, self.timings)
        self.recorder.run_ids.update(run_ids)
        self.timings["tracking_s"] += time.monotonic() - t
        if start_gen == 0 and not self.history:
            write_checkpoint(self.checkpoint_path, {**self._checkpoint(0), "run_ids": {}})  # the parent run
        self._hook("on_search_start", sc.strategy.generations, sc.strategy.population,
                   start_generation=start_gen)
        status, result = "FAILED", None
        try:
            for gen in range(start_gen, sc.strategy.generations):
                self._run_generation(gen)
            if sc.evaluator.confirm.top_k > 0 and self.confirmation is None and self.pool:
                self._confirm(sc.strategy.generations)
            self.executor.request_stop()  # workers tear down while the last logs and registry run
            t = time.monotonic()
            self.recorder.wait()
            self.timings["tracking_s"] += time.monotonic() - t
            result = self._result(time.monotonic() - t_start)
            t = time.monotonic()
            if result.best_run_id is not None and self.cfg.tracking.enabled:
                c = self.confirmation
                info = {"confirmed": c is not None, "search_fitness": self._search_fitness(result.best_id)}
                if c is not None:
                    info.update(confirm_seeds=c["seeds"], confirm_n=len(c["seeds"]))
                result.registered_uri = self.tracker.register_best(
                    result.best_run_id, name=self.cfg.tracking.register_as, alias=self.cfg.tracking.alias,
                    fitness=result.best_fitness, stderr=result.best_stderr, info=info,
                )
            if self.report_dir is not None:
                self._report(result)
            self.timings["tracking_s"] += time.monotonic() - t
            self.timings["setup_s"] += self.executor.setup_s  # start-up waits, restarts included
            result.timings = dict(self.timings)
            result.wall_s = time.monotonic() - t_start
            self._hook("on_search_end", result)
            status = "FINISHED"
            return result
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.recorder.close()
            if self.executor is not None:
                self.executor.close()
            summary = None
            if status == "FINISHED" and result is not None:
                summary = {k: v for k, v in result.to_dict().items() if k != "history"}
                fits = [f for g in result.history for f in g.fitness if f is not None]
                summary.update(best_over_generations=max(fits) if fits else None,
                               search_fitness=self._search_fitness(result.best_id),
                               paired_against=(self.cfg.search.evaluator.baseline.name
                                               if self.cfg.search.evaluator.baseline is not None else None))
            self.tracker.finish(status, summary)

    def _run_generation(self, gen: int) -> None:
        """ask -> score (seeds, pairing, racing) -> tell -> incumbent -> one immutable record."""
        t_gen = time.monotonic()
        ec = self.cfg.search.evaluator
        t = time.monotonic()
        cands = self.strategy.ask()
        self.timings["strategy_s"] += time.monotonic() - t
        self._start_stage(gen)
        seeds = generation_seeds(self.cfg.seed, gen, ec.seeds, ec.resample_each_generation)
        scores = self._score(gen, "candidate", [c.theta for c in cands], [c.id for c in cands], seeds,
                             racing=ec.racing.enabled)
        full = full_length(scores, ec)
        fits = tell_values(scores, full, ec.failure_value)
        t = time.monotonic()
        self.strategy.tell(cands, fits)
        self.timings["strategy_s"] += time.monotonic() - t
        reeval = self._reevaluate_incumbent(gen, seeds)
        previous = None if self.incumbent is None else self.incumbent["id"]
        for c, s, f in zip(cands, scores, full, strict=True):
            if s.ok and f:  # a map dropped at a short racing rung never becomes the answer
                self._offer(gen, c, s)
        inc = self.incumbent
        ok = [s.fitness for s, f in zip(scores, full, strict=True) if s.ok and f]
        rec = GenerationRecord(
            generation=gen, ids=[c.id for c in cands], parent_ids=[list(c.parent_ids) for c in cands],
            notes=[c.note for c in cands], shas=[self.space.sha(c.theta) for c in cands],
            status=[s.status for s in scores], fitness=[s.fitness for s in scores],
            stderr=[s.stderr for s in scores], n_seeds=[len(s.seeds) for s in scores],
            budget_steps=[s.steps for s in scores], errors=[s.error for s in scores],
            best_fitness=max(ok) if ok else None, mean_fitness=float(np.mean(ok)) if ok else None,
            incumbent_id=None if inc is None else inc["id"],
            incumbent_fitness=None if inc is None else inc["fitness"], incumbent_reevaluation=reeval,
            seeds=seeds, reused_jobs=self._jobs_reused, wall_s=time.monotonic() - t_gen,
            compute_s=self._compute,
        )
        self.history.append(rec)
        children = [self._child(gen, i, c.id, c.theta, c.parent_ids, c.note, s, "candidate")
                    for i, (c, s) in enumerate(zip(cands, scores, strict=True))]
        summary = {
            "best_fitness": _nan(rec.best_fitness), "mean_fitness": _nan(rec.mean_fitness),
            "incumbent_fitness": _nan(rec.incumbent_fitness),
            "failed": float(sum(s != FINISHED for s in rec.status)),
            "inner_steps_spent": float(self.steps_spent),
        }
        plot = (inc["id"], inc["theta"]) if inc is not None and inc["id"] != previous else None
        children = self._baseline_logs + children
        self.recorder.submit(gen, children, summary, plot, self._checkpoint(gen + 1))
        self._hook("on_generation_end", gen, rec.best_fitness, rec.mean_fitness,
                   sum(s != FINISHED for s in rec.status))

    # ------------------------------------------------------------------ scoring
    def _score(self, gen: int, role: str, thetas: list[np.ndarray], ids: list[str], seeds: list[int],
               racing: bool = False) -> list[Score]:
        """Scores of `thetas` on `seeds` (all of them, or by successive halving with `racing`: over
        seeds, or over inner steps when `racing.steps` is set)."""
        ec = self.cfg.search.evaluator
        if racing and ec.racing.steps:
            return self._score_steps(gen, role, thetas, ids, seeds)
        rungs = racing_rungs(len(seeds), ec.racing.min_seeds, ec.racing.eta) if racing else [len(seeds)]
        eval_size = ec.confirm.val_size if role == "confirm" else ec.val_size
        outs: dict[str, Outcome] = {}
        active = list(range(len(thetas)))
        scores: dict[int, Score] = {}
        done = 0
        for r, upto in enumerate(rungs):
            specs = [(role, i, thetas[i], s, ids[i]) for i in active for s in seeds[done:upto]]
            outs.update(self._run_jobs(gen, specs, eval_size))
            for i in active:
                ss = seeds[:upto]
                per = [outs[job_key(role, i, s)] for s in ss]
                base = None
                if ec.baseline is not None:
                    base = [self._baseline_outcome(s, eval_size) for s in ss]
                scores[i] = replace(aggregate(per, ss, base, rung=r), steps=len(ss) * ec.inner_steps)
            done = upto
            if r + 1 < len(rungs):  # promote the best 1/eta of the survivors
                alive = sorted((i for i in active if scores[i].ok), key=lambda i: -scores[i].fitness)
                active = sorted(alive[: math.ceil(len(alive) / ec.racing.eta)])
                if not active:
                    break
        return [scores[i] for i in range(len(thetas))]

    def _score_steps(self, gen: int, role: str, thetas: list[np.ndarray], ids: list[str],
                     seeds: list[int]) -> list[Score]:
        """Multi-fidelity racing: every candidate trains the first rung's inner steps on all seeds;
        the best 1/eta go on to the next rung, trained anew for its longer horizon, up to
        `inner_steps`. A candidate dropped at a rung keeps that rung's (short-run) fitness."""
        ec = self.cfg.search.evaluator
        eval_size = ec.confirm.val_size if role == "confirm" else ec.val_size
        active = list(range(len(thetas)))
        scores: dict[int, Score] = {}
        spent = dict.fromkeys(active, 0)
        rungs = step_rungs(ec.racing.steps, ec.inner_steps)
        for r, T in enumerate(rungs):
            fid = "" if T is None else f"@{T}"
            outs = self._run_jobs(gen, [(role, i, thetas[i], s, ids[i]) for i in active for s in seeds],
                                  eval_size, T)
            for i in active:
                spent[i] += len(seeds) * (T or ec.inner_steps)
                per = [outs[job_key(role, i, s, fid)] for s in seeds]
                base = ([self._baseline_outcome(s, eval_size, fid) for s in seeds]
                        if ec.baseline is not None else None)
                scores[i] = replace(aggregate(per, seeds, base, rung=r), steps=spent[i])
            if r + 1 < len(rungs):
                alive = sorted((i for i in active if scores[i].ok), key=lambda i: -scores[i].fitness)
                active = sorted(alive[: math.ceil(len(alive) / ec.racing.eta)])
                if not active:
                    break
        return [scores[i] for i in range(len(thetas))]

    def _baseline_outcome(self, seed: int, eval_size: int | None, fidelity: str = "") -> Outcome:
        key = f"{seed}:{eval_size}{fidelity}"
        return Outcome.from_dict(self.baselines.get(key) or self._failed_baselines[key])

    def _run_jobs(self, gen: int, specs: list[tuple[str, int, np.ndarray, int, str]],
                  eval_size: int | None, steps: int | None = None) -> dict[str, Outcome]:
        """Evaluate (role, slot, theta, seed, id) specs through the executor, plus the paired
        baseline on any seed not cached yet; jobs in this generation's journal are reused.
        `steps`: inner steps of these jobs (None: `search.evaluator.inner_steps`)."""
        ec = self.cfg.search.evaluator
        fid = "" if steps is None else f"@{steps}"
        journal = self.recorder.journalled(gen)
        need = []
        if ec.baseline is not None:
            for s in dict.fromkeys(sp[3] for sp in specs):
                if f"{s}:{eval_size}{fid}" not in self.baselines:
                    need.append(("baseline", -1, np.zeros(self.space.dim), s, "baseline"))
        self._hook("on_generation_start", gen, len(need) + len(specs))
        outs: dict[str, Outcome] = {}
        todo: list[Job] = []
        meta: dict[int, tuple[str, str, str]] = {}  # job index -> key, sha, id
        for role, slot, theta, seed, cid in need + specs:
            key = job_key(role, slot, seed, fid)
            sha = "baseline" if role == "baseline" else self.space.sha(theta)
            e = journal.get(key)
            if e is not None and e["sha"] == sha:  # finished before an interruption
                outs[key] = Outcome.from_dict(e["outcome"])
                self._jobs_reused += 1
                o = outs[key]
                self._hook("on_candidate_end", gen, f"{cid}/s{seed}", _ok_fitness(o), o.status)
                continue
            job = Job(gen, len(todo), np.asarray(theta, dtype=np.float64), seed, ec.timeout_s, role=role,
                      candidate=max(slot, 0), eval_size=eval_size, inner_steps=steps)
            meta[job.index] = (key, sha, cid)
            todo.append(job)

        def on_result(job: Job, out: Outcome) -> None:
            key, sha, cid = meta[job.index]
            outs[key] = out
            self.recorder.journal(gen, key, sha, out)
            self._hook("on_candidate_end", gen, f"{cid}/s{job.seed}", _ok_fitness(out), out.status)

        t = time.monotonic()
        if todo:
            self.executor.map(todo, on_result=on_result)
        self.timings["compute_s"] += time.monotonic() - t
        ran = {key for key, _sha, _cid in meta.values()}
        for key, o in outs.items():
            if key in ran:
                for k in ("reset_s", "train_s", "eval_s"):
                    self.timings[k] += o.timings.get(k, 0.0)
                self.timings["job_s"] += o.timings.get("total_s", 0.0)
            self._compute += o.timings.get("train_s", 0.0) + o.timings.get("eval_s", 0.0)
            self.steps_spent += steps or ec.inner_steps
            if key.startswith("baseline:"):  # cached when it finished; a failure fails this call's seed
                seed = int(key.split(":")[1].partition("@")[0])
                cache = self.baselines if o.status == FINISHED else self._failed_baselines
                cache[f"{seed}:{eval_size}{fid}"] = o.to_dict()
                # a child run of its own (stage baseline): what the candidates' fitness is measured against
                job = Job(gen, -1, np.zeros(self.space.dim), seed, role="baseline", eval_size=eval_size,
                          inner_steps=steps or ec.inner_steps)
                self._baseline_logs.append(ChildLog(job, o, f"baseline-s{seed}{fid}", (), "paired baseline",
                                                    "baseline", {}, [seed]))
        return outs

    # ------------------------------------------------------------------ incumbent
    def _reevaluate_incumbent(self, gen: int, seeds: list[int]) -> float | None:
        """Re-score the incumbent on this generation's seeds (its own jobs); fold into its mean."""
        inc = self.incumbent
        if not self.cfg.search.evaluator.reevaluate_incumbent or inc is None:
            return None
        (s,) = self._score(gen, "incumbent", [inc["theta"]], [inc["id"]], seeds)
        if not s.ok:
            log.warning("generation %d: re-evaluating the incumbent %s failed: %s", gen, inc["id"], s.error)
            return None
        values = list(inc["values"]) + list(s.values)
        inc.update(values=values, fitness=float(np.mean(values)),
                   stderr=float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1
                   else inc["stderr"])
        return s.fitness

    def _offer(self, gen: int, cand: Candidate, s: Score) -> None:
        """A finished candidate may become the incumbent and may join the confirmation pool."""
        ec = self.cfg.search.evaluator
        entry = {"theta": np.asarray(cand.theta, dtype=np.float64).copy(), "id": cand.id, "generation": gen,
                 "values": list(s.values), "fitness": float(s.fitness), "stderr": s.stderr}

        def crit(e: dict[str, Any]) -> float:
            return criterion(e["fitness"], e["stderr"], ec.incumbent, ec.lcb_z)

        if self.incumbent is None or crit(entry) > crit(self.incumbent):
            self.incumbent = entry
        k = ec.confirm.top_k
        if k > 0:
            self.pool = sorted([*self.pool, entry], key=lambda e: -crit(e))[:k]

    # ------------------------------------------------------------------ confirmation
    def _confirm(self, gen: int) -> None:
        """Re-score the pool on fresh seeds; the best confirmed candidate becomes the answer."""
        ec = self.cfg.search.evaluator
        seeds = confirmation_seeds(self.cfg.seed, ec.confirm.seeds)
        self._start_stage(gen)
        pool = self.pool
        scores = self._score(gen, "confirm", [p["theta"] for p in pool], [p["id"] for p in pool], seeds)
        rows = []
        for p, s in zip(pool, scores, strict=True):
            rows.append({"id": p["id"], "search_fitness": p["fitness"], "search_stderr": p["stderr"],
                         "status": s.status, "fitness": s.fitness, "stderr": s.stderr,
                         "values": list(s.values), "error": s.error})
        ok = [i for i, s in enumerate(scores) if s.ok]
        best = max(ok, key=lambda i: criterion(scores[i].fitness, scores[i].stderr, ec.incumbent, ec.lcb_z),
                   default=None)
        self.confirmation = {"seeds": seeds, "rows": rows, "reused_jobs": self._jobs_reused,
                             "best": None if best is None else pool[best]["id"]}
        children = [self._child(gen, i, p["id"], p["theta"], (p["id"],), "confirmation", s, "confirm")
                    for i, (p, s) in enumerate(zip(pool, scores, strict=True))]
        self.recorder.submit(gen, self._baseline_logs + children, None, None, self._checkpoint(gen))

    # ------------------------------------------------------------------ helpers
    def _start_stage(self, gen: int) -> None:
        """Reset the per-generation counters; after a resume, drop the interrupted generation's
        partially logged child runs (a generation's children are logged again as a whole)."""
        self._jobs_reused, self._compute, self._failed_baselines = 0, 0.0, {}
        self._baseline_logs: list[ChildLog] = []  # this stage's paired-baseline runs, logged with it
        if self._resumed_at == gen:
            t = time.monotonic()
            removed = self.tracker.interrupted_children(gen, list(self.recorder.run_ids.values()))
            if removed:
                log.info("generation %d: deleted %d partially logged child runs", gen, removed)
            self.timings["tracking_s"] += time.monotonic() - t

    def _child(self, gen: int, slot: int, cid: str, theta: np.ndarray, parent_ids: tuple[str, ...],
               note: str, s: Score, role: str) -> ChildLog:
        ec = self.cfg.search.evaluator
        seeds = list(s.seeds)
        out = Outcome(gen, slot, s.status, fitness=s.fitness, stderr=s.stderr, metric=s.metric,
                      mean_length=s.mean_length, error=s.error, label=role, curves=list(s.curves),
                      timings=dict(s.timings), worker=",".join(s.workers),
                      samples=dict(s.samples or {}), started_at=s.started_at, ended_at=s.ended_at)
        extra = {"n_seeds": float(len(seeds)),
                 "budget_inner_steps": float(s.steps or len(seeds) * ec.inner_steps),
                 "rung": float(s.rung), "paired": float(ec.baseline is not None)}
        # per-seed fitness keyed by the seed itself (the same key means the same seed on every run)
        extra.update({f"fitness_seed/{seed}": v for seed, v in zip(seeds, s.values, strict=False)})
        if ec.baseline is not None and s.ok and ec.length_penalty == 0 and s.metric is not None:
            extra["paired_baseline_metric"] = s.metric - s.fitness  # what this fitness was measured against
        job = Job(gen, slot, np.asarray(theta, dtype=np.float64), seeds[0] if seeds else 0, role=role,
                  candidate=slot)
        return ChildLog(job, out, cid, tuple(parent_ids), note, self.space.sha(theta), extra, seeds)

    def _search_fitness(self, cid: str | None) -> float | None:
        for g in self.history:
            if cid in g.ids:
                return g.fitness[g.ids.index(cid)]
        return None

    def _hook(self, name: str, *args: Any, **kw: Any) -> None:
        f = getattr(self.progress, name, None)
        if f is not None:
            f(*args, **kw)

    def _report(self, result: SearchResult) -> None:
        """The answer as a map directory, and the fitness, lineage and map plots, written into
        `report_dir` and logged on the parent run before it closes."""
        d, cfg, space = self.report_dir, self.cfg, self.space
        theta = np.asarray(result.best_theta, dtype=np.float64)
        result.best_map = str(space.save(theta, d / "best_map"))
        files = [plots.plot_fitness(result.fitness_history(), d / "fitness.png",
                                    title=f"{cfg.name}: fitness per generation ({cfg.search.strategy.name})"),
                 plots.plot_lineage(lineage_records(result.history), d / "lineage.png",
                                    title=f"{cfg.name}: lineage of candidates", answer=result.best_id)]
        try:
            maps = {f"answer ({result.best_id})" if result.best_id else "answer": space.divergence(theta)}
            if isinstance(space, NeuralSpace):
                maps["initial (x0)"] = space.divergence(space.initial(cfg.seed))
            files.append(divergences.plot_maps(maps, d / "maps.png", baselines=True))
        except Exception as e:  # noqa: BLE001 - a plot must never lose a finished search
            log.warning("maps plot skipped: %s", e)
        result.report_files = [str(f) for f in files]
        self.tracker.log_files(files)

    def _result(self, wall: float) -> SearchResult:
        run_ids = self.recorder.run_ids
        c = self.confirmation
        if c is not None and c["best"] is not None:
            row = next(r for r in c["rows"] if r["id"] == c["best"])
            theta = next(p["theta"] for p in self.pool if p["id"] == c["best"])
            rid = run_ids.get(run_key("confirm", c["best"]))
            return SearchResult(np.asarray(theta), float(row["fitness"]), row["stderr"], c["best"], rid,
                                self.history, self.parent_run, None, wall, dict(self.timings), c,
                                self.steps_spent)
        inc = self.incumbent
        if inc is None:
            return SearchResult(self.strategy.recommendation(), float("nan"), None, None, None, self.history,
                                self.parent_run, None, wall, dict(self.timings), c, self.steps_spent)
        return SearchResult(np.asarray(inc["theta"]), float(inc["fitness"]), inc["stderr"], inc["id"],
                            run_ids.get(inc["id"]), self.history, self.parent_run, None, wall,
                            dict(self.timings), c, self.steps_spent)


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _ok_fitness(o: Outcome) -> float | None:
    return o.fitness if o.status == FINISHED else None

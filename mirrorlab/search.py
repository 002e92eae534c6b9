"""The search (outer loop, DESIGN section 5): ask, evaluate in parallel, tell, log, checkpoint.

`Search(cfg).run()` proposes mirror-map parameter vectors with a strategy, scores each with an
evaluator (by default a short inner GBMPO run, `GBMPOEvaluator`) through an executor (`local`,
`process`, `ray`: the loop does not know which), records every candidate in MLflow and
checkpoints after each generation so `run(resume=True)` continues a killed search and reaches
the same result as an uninterrupted one.

Common random numbers: every candidate of a generation gets the same seed, from which the
evaluator derives the inner training seed (prompt order, sampling) and the validation subset.
Seeds depend only on (cfg.seed, generation), so a resumed search uses the same ones.

Resume: the checkpoint (JSON, written atomically) holds the strategy's state dict, the history,
the incumbent, the MLflow parent run id and the candidate -> run id map. While a generation runs,
each logged candidate is appended to a journal; on resume the interrupted generation is asked
again (same candidates, the strategy state is exact), candidates found in the journal with the
same theta hash are reused (their child runs kept), and child runs the journal does not know
(partially logged when the process died) are deleted before those candidates are re-evaluated.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mirrorlab import strategies
from mirrorlab.config import Config, dump_config
from mirrorlab.executors import (
    FINISHED,
    Executor,
    Job,
    Outcome,
    check_deadline,
    make_executor,
)
from mirrorlab.registry import Registry
from mirrorlab.spaces import SearchSpace, make_space
from mirrorlab.tracking import make_tracker

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.json"
CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------- seeds (pure)
def generation_seed(seed: int, generation: int, resample: bool = True) -> int:
    """The common-random-numbers seed shared by all candidates of `generation` (31-bit)."""
    ss = np.random.SeedSequence([int(seed) % 2**32, int(generation) if resample else 0, 0x5EA6C])
    return int(ss.generate_state(1)[0] >> 1)


def val_subset(seed: int, n_val: int, size: int | None) -> list[int] | None:
    """The validation indices for a generation's seed: all (None) or `size` drawn without replacement."""
    if size is None or size >= n_val:
        return None
    rng = np.random.default_rng([int(seed), 0xEFA1])
    return sorted(int(i) for i in rng.choice(n_val, size=size, replace=False))


# --------------------------------------------------------------------------- evaluators
evaluators: Registry[Any] = Registry("evaluator")


def build_evaluator(cfg: Config) -> Any:
    """The evaluator named by `cfg.search.evaluator.kind` (registered name or `module:factory`)."""
    kind = cfg.search.evaluator.kind
    params = dict(cfg.search.evaluator.params)
    if kind in evaluators:
        return evaluators.get(kind, cfg=cfg, **params)
    if ":" in kind:
        import importlib

        mod, _, attr = kind.partition(":")
        return getattr(importlib.import_module(mod), attr)(cfg=cfg, **params)
    allowed = ", ".join(evaluators.names())
    raise ValueError(f"unknown evaluator {kind!r}; allowed: {allowed} or package.module:factory")


class _DeadlineCallback:
    """Trainer callback that stops an inner run at the next step once the job's deadline passed."""

    def __init__(self, job: Job) -> None:
        self.job = job

    def on_step(self, step: int, metrics: dict[str, Any]) -> None:
        check_deadline(self.job)


def _nonfinite_loss(curves: list[dict[str, Any]]) -> str | None:
    for i, row in enumerate(curves):
        for k, v in row.items():
            if "loss" in k and isinstance(v, int | float) and not math.isfinite(v):
                return f"non-finite {k}={v} at inner step {row.get('step', i)}"
    return None


class GBMPOEvaluator:
    """Scores a theta by T inner GBMPO steps on task.train from the base weights, then task.val.

    `setup()` builds the model, task and trainer once per worker; each evaluation resets the
    trainer to the base weights with the generation's seed, sets the candidate's divergence (and
    coefficient, for spaces that search it), trains, and evaluates on the generation's val subset.
    fitness = metric - length_penalty * mean completion length; stderr = the metric's.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.trainer: Any = None
        self.space: SearchSpace | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "trainer": None, "space": None}

    def setup(self) -> None:
        """Load the base model and build the trainer (heavy; once per worker)."""
        from mirrorlab.gbmpo import build_trainer

        self.space = make_space(self.cfg)
        self.trainer = build_trainer(self.cfg, divergence=self.space.divergence(self.space.initial(0)))
        self.n_val = len(self.trainer.task.val)

    def evaluate(self, job: Job) -> dict[str, Any]:
        """One candidate: reset, set map, train T steps, evaluate on val (common random numbers)."""
        if self.trainer is None:
            self.setup()
        ec = self.cfg.search.evaluator
        t0 = time.monotonic()
        div = self.space.divergence(job.theta)
        coef = self.space.coef(job.theta)
        self.trainer.reset(seed=job.seed)
        self.trainer.set_divergence(div, coef)
        t1 = time.monotonic()
        curves = self.trainer.train(steps=ec.inner_steps, callbacks=[_DeadlineCallback(job)])
        t2 = time.monotonic()
        bad = _nonfinite_loss(curves)
        if bad:
            raise FloatingPointError(bad)
        check_deadline(job)
        res = self.trainer.evaluate("val", indices=val_subset(job.seed, self.n_val, ec.val_size))
        t3 = time.monotonic()
        fitness = float(res.metric) - ec.length_penalty * float(res.mean_length)
        return {
            "fitness": fitness, "stderr": float(res.stderr), "metric": float(res.metric),
            "mean_length": float(res.mean_length), "n_eval": int(res.n),
            "curves": [{k: float(v) for k, v in row.items() if isinstance(v, int | float)} for row in curves],
            "timings": {"reset_s": t1 - t0, "train_s": t2 - t1, "eval_s": t3 - t2},
        }


class AnalyticEvaluator:
    """A cheap known objective of theta, for debugging strategies and the search machinery.

    fitness = -mean((theta - target)^2) (`sphere`) or minus the mean Rastrigin term
    (`rastrigin`), plus optional Gaussian noise (seeded by the generation seed and theta, so
    common random numbers hold; `stderr` = noise). `delay_s` sleeps per evaluation in small slices
    (checking the deadline) to simulate inner-run cost; it counts as training time.
    """

    def __init__(self, cfg: Config | None = None, function: str = "sphere", target: float = 1.0,
                 noise: float = 0.0, delay_s: float = 0.0) -> None:
        if function not in ("sphere", "rastrigin"):
            raise ValueError(f"analytic function must be sphere or rastrigin, got {function!r}")
        self.function, self.target, self.noise, self.delay_s = function, float(target), float(noise), delay_s

    def setup(self) -> None:
        """Nothing to load."""

    def value(self, theta: np.ndarray) -> float:
        """The noiseless objective (maximised)."""
        d = np.asarray(theta, dtype=np.float64) - self.target
        if self.function == "sphere":
            return float(-np.mean(d**2))
        return float(-np.mean(d**2 - 10.0 * np.cos(2 * np.pi * d) + 10.0))

    def evaluate(self, job: Job) -> dict[str, Any]:
        """Objective (+ seeded noise) after the simulated delay."""
        t0 = time.monotonic()
        end = t0 + self.delay_s
        while time.monotonic() < end:
            time.sleep(min(0.01, max(0.0, end - time.monotonic())))
            check_deadline(job)
        f = self.value(job.theta)
        if self.noise > 0:
            h = int.from_bytes(np.asarray(job.theta, "<f8").tobytes()[:8], "little") % 2**32
            f += float(np.random.default_rng([job.seed, h]).normal(0.0, self.noise))
        return {"fitness": f, "stderr": self.noise, "metric": f,
                "timings": {"train_s": time.monotonic() - t0, "eval_s": 0.0}}


class FaultInjectionEvaluator:
    """Wraps another evaluator and makes chosen candidates fail, to exercise the failure policy.

    `faults` maps "generation/index" (or "*/index") to `raise` (an exception), `nan` (the inner
    result's fitness replaced by NaN) or `hang` (a blocking sleep of `hang_s`, which only the
    timeout can stop; the `process` and `ray` executors kill it, `local` cannot).
    """

    def __init__(self, cfg: Config, inner: str = "gbmpo", inner_params: dict[str, Any] | None = None,
                 faults: dict[str, str] | None = None, hang_s: float = 3600.0) -> None:
        self.inner = evaluators.get(inner, cfg=cfg, **(inner_params or {}))
        self.faults = dict(faults or {})
        bad = {v for v in self.faults.values()} - {"raise", "nan", "hang"}
        if bad:
            raise ValueError(f"unknown fault kinds {sorted(bad)}; allowed: raise, nan, hang")
        self.hang_s = hang_s

    def setup(self) -> None:
        """Set up the wrapped evaluator."""
        self.inner.setup()

    def evaluate(self, job: Job) -> dict[str, Any]:
        """The wrapped evaluation, unless a fault is configured for this candidate."""
        fault = self.faults.get(f"{job.generation}/{job.index}") or self.faults.get(f"*/{job.index}")
        if fault == "raise":
            raise RuntimeError(f"injected failure for candidate {job.generation}/{job.index}")
        if fault == "hang":
            time.sleep(self.hang_s)
        res = self.inner.evaluate(job)
        if fault == "nan":
            res = {**res, "fitness": float("nan")}
        return res


evaluators.register("gbmpo", GBMPOEvaluator)
evaluators.register("analytic", AnalyticEvaluator)
evaluators.register("fault_injection", FaultInjectionEvaluator)


# --------------------------------------------------------------------------- results
@dataclass
class GenerationRecord:
    """One generation: per-candidate ids, lineage, hashes, fitness, errors, and timings."""

    generation: int
    ids: list[str]
    parents: list[str | None]
    shas: list[str]
    status: list[str]
    fitness: list[float | None]
    stderr: list[float | None]
    errors: list[str | None]
    run_ids: list[str | None]
    best_fitness: float | None
    mean_fitness: float | None
    incumbent_fitness: float | None
    wall_s: float
    compute_s: float


@dataclass
class SearchResult:
    """The outcome of a search: the incumbent (best theta and its fitness) and the history."""

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

    def fitness_history(self) -> list[list[float | None]]:
        """Per generation, the candidates' fitness (None for FAILED)."""
        return [list(g.fitness) for g in self.history]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        d = asdict(self)
        d["best_theta"] = np.asarray(self.best_theta).tolist()
        return d


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


def _journal_path(ckpt_dir: Path, generation: int) -> Path:
    return ckpt_dir / f"generation_{generation:04d}.journal.jsonl"


def read_journal(path: Path) -> dict[int, dict[str, Any]]:
    """Entries of a generation journal by candidate index; a torn last line is ignored."""
    out: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[int(e["index"])] = e
    return out


def _append_journal(path: Path, entry: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


_CID = re.compile(r"g\d+-\d+")


# --------------------------------------------------------------------------- the search
class Search:
    """The outer loop, built from a validated `Config` (space, strategy, evaluator, executor, tracker)."""

    def __init__(self, cfg: Config, evaluator: Any = None) -> None:
        self.cfg = cfg
        sc = cfg.search
        self.space = make_space(cfg)
        self.evaluator = evaluator if evaluator is not None else build_evaluator(cfg)
        self.strategy = strategies.get(
            sc.strategy.name, dim=self.space.dim, population=sc.strategy.population, seed=cfg.seed,
            x0=self.space.initial(cfg.seed), generations=sc.strategy.generations, **sc.strategy.params,
        )
        self.checkpoint_dir = Path(sc.checkpoint_dir or Path(cfg.output_dir) / cfg.name / "search")
        self.executor: Executor | None = None
        self.tracker: Any = None
        self.history: list[GenerationRecord] = []
        self.run_ids: dict[str, str] = {}  # candidate id -> child run id
        self.incumbent: dict[str, Any] | None = None  # theta, fitness (mean of evals), n, id, run_id
        self.on_generation: Callable[[GenerationRecord], None] | None = None
        self._resumed_at: int | None = None
        # optional progress display (e.g. mirrorlab.progress.SearchProgress): any of
        # on_generation_start(g, n), on_candidate_end(g, id, fitness, status),
        # on_generation_end(g, best, mean, failures), on_search_end(result)
        self.progress: Any = None
        self.timings = dict.fromkeys(
            ("setup_s", "tracking_s", "tracking_bg_s", "checkpoint_s", "strategy_s", "compute_s",
             "reset_s", "train_s", "eval_s", "job_s"), 0.0)

    # ------------------------------------------------------------------ checkpoint
    @property
    def checkpoint_path(self) -> Path:
        """Where the checkpoint of the last complete generation lives."""
        return self.checkpoint_dir / CHECKPOINT

    def _save_checkpoint(self, generation: int, parent_run_id: str | None,
                         snapshot: tuple[Any, list[GenerationRecord], dict[str, Any] | None] | None = None,
                         ) -> None:
        """Write the checkpoint of `generation`; `snapshot` = (strategy state, history, incumbent)
        taken right after that generation's `tell` (it is written later, from the tracking thread)."""
        t = time.monotonic()
        if snapshot is None:
            snapshot = (self.strategy.state_dict(), list(self.history), self.incumbent)
        state, history, incumbent = snapshot
        inc = None
        if incumbent is not None:
            inc = {**incumbent, "theta": np.asarray(incumbent["theta"]).tolist()}
        atomic_write_json(self.checkpoint_path, {
            "version": CHECKPOINT_VERSION,
            "completed_generations": generation + 1,
            "strategy": state,
            "history": [asdict(g) for g in history],
            "incumbent": inc,
            "run_ids": dict(self.run_ids),
            "parent_run_id": parent_run_id,
            "config": dump_config(self.cfg),
            "seed": self.cfg.seed,
        })
        _journal_path(self.checkpoint_dir, generation).unlink(missing_ok=True)
        self.timings["checkpoint_s"] += time.monotonic() - t

    def _load_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint_path.is_file():
            return None
        ck = json.loads(self.checkpoint_path.read_text())
        if ck.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{self.checkpoint_path}: unsupported checkpoint version {ck.get('version')}")
        if ck.get("config") != dump_config(self.cfg):
            log.warning("resuming %s with a config differing from the checkpointed one", self.checkpoint_path)
        self.strategy.load_state_dict(ck["strategy"])
        self.history = [GenerationRecord(**g) for g in ck["history"]]
        self.run_ids = dict(ck["run_ids"])
        inc = ck["incumbent"]
        if inc is not None:
            inc["theta"] = np.asarray(inc["theta"], dtype=np.float64)
        self.incumbent = inc
        return ck

    # ------------------------------------------------------------------ main loop
    def _make_executor(self) -> Executor:
        ex = self.cfg.search.executor
        return make_executor(
            ex.kind, self.evaluator, workers=ex.workers, ray_address=ex.ray_address,
            cpus_per_worker=ex.cpus_per_worker, gpus_per_worker=ex.gpus_per_worker,
        )

    def run(self, resume: bool = False) -> SearchResult:
        """Run (or, with `resume`, continue from the last checkpoint) all generations."""
        t_start = time.monotonic()
        sc = self.cfg.search
        start_gen, parent_run = 0, None
        if resume:
            ck = self._load_checkpoint()
            if ck is not None:
                start_gen, parent_run = int(ck["completed_generations"]), ck["parent_run_id"]
        elif self.checkpoint_path.exists():
            self.checkpoint_path.unlink()
            for j in self.checkpoint_dir.glob("generation_*.journal.jsonl"):
                j.unlink()
        self.executor = self._make_executor()
        self.executor.launch()  # worker processes load the model while the tracker starts
        t = time.monotonic()
        try:
            self.tracker = make_tracker(self.cfg, sc.strategy.name, self.space)
            parent_run = self.tracker.start(resume_run_id=parent_run)
        except BaseException:
            self.executor.close()
            raise
        self.timings["tracking_s"] += time.monotonic() - t
        if start_gen == 0 and not self.history:
            self._save_checkpoint(-1, parent_run)  # records the parent run before generation 0
        self._resumed_at = start_gen if resume else None
        self._log_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mirrorlab-tracking")
        self._finalising: Future[None] | None = None
        status = "FAILED"
        try:
            # no start-up barrier: each worker takes candidates as soon as its model is loaded
            for gen in range(start_gen, sc.strategy.generations):
                self._generation(gen, parent_run)
            self.executor.request_stop()  # workers tear down while the last logs and registry run
            t = time.monotonic()
            self._wait_finalised()
            self.timings["tracking_s"] += time.monotonic() - t
            result = self._result(parent_run, time.monotonic() - t_start)
            t = time.monotonic()
            if result.best_run_id is not None and self.cfg.tracking.enabled:
                result.registered_uri = self.tracker.register_best(
                    result.best_run_id, name=self.cfg.tracking.register_as, alias=self.cfg.tracking.alias,
                    fitness=result.best_fitness,
                )
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
            self._log_pool.shutdown(wait=True)
            if self.executor is not None:
                self.executor.close()
            summary = None
            if status == "FINISHED":
                summary = {k: v for k, v in result.to_dict().items() if k != "history"}
            self.tracker.finish(status, summary)

    def _jobs(self, gen: int, cands: list[Any]) -> list[Job]:
        ec = self.cfg.search.evaluator
        seed = generation_seed(self.cfg.seed, gen, ec.resample_each_generation)
        jobs = [Job(gen, i, np.asarray(c.theta, dtype=np.float64), seed, ec.timeout_s)
                for i, c in enumerate(cands)]
        if ec.reevaluate_incumbent and self.incumbent is not None:
            jobs.append(Job(gen, len(cands), np.asarray(self.incumbent["theta"]), seed, ec.timeout_s,
                            label="incumbent"))
        return jobs

    def _generation(self, gen: int, parent_run: str | None) -> None:
        t_gen = time.monotonic()
        t = time.monotonic()
        cands = self.strategy.ask()
        self.timings["strategy_s"] += time.monotonic() - t
        jobs = self._jobs(gen, cands)
        ids = [c.id or f"g{gen}-{i}" for i, c in enumerate(cands)] + (
            [f"g{gen}-incumbent"] if len(jobs) > len(cands) else []
        )
        parents = [c.parent for c in cands] + (
            [f"incumbent:{self.incumbent['id']}"] if len(jobs) > len(cands) else []
        )
        shas = [self.space.sha(j.theta) for j in jobs]
        journal = _journal_path(self.checkpoint_dir, gen)
        done = {i: e for i, e in read_journal(journal).items() if i < len(jobs) and e["sha"] == shas[i]}
        outcomes: dict[int, Outcome] = {i: Outcome.from_dict(e["outcome"]) for i, e in done.items()}
        run_ids: dict[int, str | None] = {i: e["run_id"] for i, e in done.items()}
        if self._resumed_at == gen:
            t = time.monotonic()
            removed = self.tracker.interrupted_children(gen, [r for r in run_ids.values() if r])
            if removed:
                log.info("generation %d: deleted %d partially logged child runs", gen, removed)
            self.timings["tracking_s"] += time.monotonic() - t
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)

        def log_one(job: Job, out: Outcome) -> None:
            t0 = time.monotonic()
            i = job.index
            parent = parents[i]
            parent_run_id = None
            if parent:
                m = _CID.search(parent)
                parent_run_id = self.run_ids.get(m.group(0)) if m else None
            rid = self.tracker.log_candidate(
                job, out, candidate_id=ids[i], parent=parent, parent_run=parent_run_id, sha=shas[i],
            )
            outcomes[i], run_ids[i] = out, rid
            _append_journal(journal, {"index": i, "sha": shas[i], "run_id": rid, "outcome": out.to_dict()})
            self.timings["tracking_bg_s"] += time.monotonic() - t0

        # children are logged by one background thread while the executor keeps evaluating, so
        # tracking (MLflow writes, map artifacts, plots) overlaps the inner runs
        pending: list[Future[None]] = []

        def on_result(job: Job, out: Outcome) -> None:
            outcomes[job.index] = out
            self._hook("on_candidate_end", gen, ids[job.index],
                       out.fitness if out.status == FINISHED else None, out.status)
            pending.append(self._log_pool.submit(log_one, job, out))

        todo = [j for j in jobs if j.index not in outcomes]
        self._hook("on_generation_start", gen, len(jobs))
        for i in sorted(outcomes):  # reused from the journal of an interrupted run
            o = outcomes[i]
            self._hook("on_candidate_end", gen, ids[i], o.fitness if o.status == FINISHED else None, o.status)
        t = time.monotonic()
        self.executor.map(todo, on_result=on_result)
        self.timings["compute_s"] += time.monotonic() - t
        outs = [outcomes[i] for i in range(len(jobs))]
        for o in outs:
            for k in ("reset_s", "train_s", "eval_s"):
                self.timings[k] += o.timings.get(k, 0.0)
            self.timings["job_s"] += o.timings.get("total_s", 0.0)  # the whole job, in the worker
        fail = self.cfg.search.evaluator.failure_value
        fits = [o.fitness if o.status == FINISHED else fail for o in outs[: len(cands)]]
        t = time.monotonic()
        self.strategy.tell(cands, fits)
        state = copy.deepcopy(self.strategy.state_dict())  # the checkpoint's, written later
        self.timings["strategy_s"] += time.monotonic() - t
        previous = None if self.incumbent is None else self.incumbent["id"]
        self._update_incumbent(gen, jobs, outs, ids)
        ok = [o.fitness for o in outs[: len(cands)] if o.status == FINISHED]
        rec = GenerationRecord(
            generation=gen, ids=ids, parents=parents, shas=shas, status=[o.status for o in outs],
            fitness=[o.fitness if o.status == FINISHED else None for o in outs],
            stderr=[o.stderr if o.status == FINISHED else None for o in outs],
            errors=[o.error for o in outs], run_ids=[None] * len(jobs),  # filled once logged
            best_fitness=max(ok) if ok else None, mean_fitness=float(np.mean(ok)) if ok else None,
            incumbent_fitness=None if self.incumbent is None else self.incumbent["fitness"],
            wall_s=time.monotonic() - t_gen,
            compute_s=sum(o.timings.get("train_s", 0.0) + o.timings.get("eval_s", 0.0) for o in outs),
        )
        self.history.append(rec)
        inc = None if self.incumbent is None else dict(self.incumbent)
        snapshot = (state, list(self.history), inc)

        def finalise() -> None:
            """After the generation's children are logged (FIFO pool): lineage ids, summary
            metrics, the new incumbent's plot, then the checkpoint. Overlaps the next generation."""
            for f in pending:
                f.result()  # a logging error surfaces here, then in the search thread
            t0 = time.monotonic()
            for i in range(len(cands)):
                if run_ids.get(i):
                    self.run_ids[ids[i]] = run_ids[i]
            rec.run_ids[:] = [run_ids.get(i) for i in range(len(jobs))]
            if inc is not None:
                inc["run_id"] = self.run_ids.get(inc["id"], inc.get("run_id"))
            self.tracker.log_generation(gen, {
                "best_fitness": rec.best_fitness if rec.best_fitness is not None else math.nan,
                "mean_fitness": rec.mean_fitness if rec.mean_fitness is not None else math.nan,
                "incumbent_fitness": rec.incumbent_fitness if rec.incumbent_fitness is not None else math.nan,
                "failed": float(sum(s != FINISHED for s in rec.status)),
            })
            if inc is not None and inc["id"] != previous and self.cfg.tracking.plot_scope == "incumbents":
                self.tracker.log_plot(inc["run_id"], inc["theta"])
            self.timings["tracking_bg_s"] += time.monotonic() - t0
            self._save_checkpoint(gen, parent_run, snapshot)

        t = time.monotonic()
        self._wait_finalised()  # the previous generation's (long done, normally): errors surface here
        self.timings["tracking_s"] += time.monotonic() - t
        self._finalising = self._log_pool.submit(finalise)
        self._hook("on_generation_end", gen, rec.best_fitness, rec.mean_fitness,
                   sum(s != FINISHED for s in rec.status))
        if self.on_generation is not None:
            self.on_generation(rec)

    def _wait_finalised(self) -> None:
        """Wait for the background end-of-generation work (logging, checkpoint); re-raise its error."""
        if self._finalising is not None:
            f, self._finalising = self._finalising, None
            f.result()

    def _hook(self, name: str, *args: Any) -> None:
        f = getattr(self.progress, name, None)
        if f is not None:
            f(*args)

    def _update_incumbent(self, gen: int, jobs: list[Job], outs: list[Outcome], ids: list[str]) -> None:
        inc = self.incumbent
        for j, o in zip(jobs, outs, strict=True):
            if o.status != FINISHED:
                continue
            if j.label == "incumbent" and inc is not None:
                n = inc["n"] + 1
                inc["fitness"] = inc["fitness"] + (o.fitness - inc["fitness"]) / n
                inc["n"] = n
        for j, o in zip(jobs, outs, strict=True):
            if o.status != FINISHED or j.label == "incumbent":
                continue
            if inc is None or o.fitness > inc["fitness"]:
                inc = {"theta": np.asarray(j.theta, dtype=np.float64).copy(), "fitness": float(o.fitness),
                       "stderr": o.stderr, "n": 1, "id": ids[j.index], "run_id": None,  # set once logged
                       "generation": gen}
        self.incumbent = inc

    def _result(self, parent_run: str | None, wall: float) -> SearchResult:
        inc = self.incumbent
        if inc is None:
            theta, fit = self.strategy.recommendation(), float("nan")
            return SearchResult(theta, fit, None, None, None, self.history, parent_run, None, wall,
                                dict(self.timings))
        inc["run_id"] = self.run_ids.get(inc["id"], inc.get("run_id"))
        return SearchResult(
            np.asarray(inc["theta"]), float(inc["fitness"]), inc["stderr"], inc["id"], inc["run_id"],
            self.history, parent_run, None, wall, dict(self.timings),
        )

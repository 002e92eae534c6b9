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

This module is the loop; `mirrorlab.fitness` holds the pure scoring (a candidate's `Score` over its
seeds, paired errors, racing rungs, the incumbent rule) and `mirrorlab.journal` the records, the
checkpoint, the journal of finished jobs and the `SearchRecorder` that writes them.

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
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mirrorlab import divergences, plots, strategies
from mirrorlab.config import Config, dump_config
from mirrorlab.evaluators import build_evaluator, confirmation_seeds, generation_seeds
from mirrorlab.executors import Executor, make_executor
from mirrorlab.fitness import Entry, Score, aggregate, criterion, full_length, racing_rungs, tell_values
from mirrorlab.journal import (
    CHECKPOINT,
    CHECKPOINT_VERSION,
    CheckpointError,
    ChildLog,
    GenerationRecord,
    SearchRecorder,
    SearchResult,
    job_key,
    lineage_records,
    read_checkpoint,
    run_key,
    step_rungs,
    write_checkpoint,
)
from mirrorlab.records import FINISHED, Job, Outcome
from mirrorlab.spaces import NeuralSpace, SearchSpace, make_space
from mirrorlab.strategies import Candidate
from mirrorlab.tracking import make_tracker

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the search
@dataclass(frozen=True)
class JobSpec:
    """One inner run to score: a candidate (or the baseline, slot -1) on one seed."""

    role: str  # candidate | incumbent | confirm | baseline
    slot: int
    theta: np.ndarray
    seed: int
    candidate_id: str


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
        self.incumbent: Entry | None = None
        self.pool: list[Entry] = []  # the top-k candidates for the confirmation stage
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
        return {
            "version": CHECKPOINT_VERSION, "completed_generations": completed,
            "strategy": copy.deepcopy(self.strategy.state_dict()),
            "history": [asdict(g) for g in self.history],
            "incumbent": None if self.incumbent is None else self.incumbent.to_dict(),
            "pool": [p.to_dict() for p in self.pool],
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

        try:
            strategy = self._new_strategy()
            strategy.load_state_dict(ck["strategy"])
            history = [GenerationRecord.from_dict(g) for g in ck["history"]]
            incumbent = None if ck["incumbent"] is None else Entry.from_dict(ck["incumbent"])
            pool = [Entry.from_dict(p) for p in ck["pool"]]
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
        previous = None if self.incumbent is None else self.incumbent.id
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
            incumbent_id=None if inc is None else inc.id,
            incumbent_fitness=None if inc is None else inc.fitness, incumbent_reevaluation=reeval,
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
        plot = (inc.id, inc.theta) if inc is not None and inc.id != previous else None
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
            specs = [JobSpec(role, i, thetas[i], s, ids[i]) for i in active for s in seeds[done:upto]]
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
            specs = [JobSpec(role, i, thetas[i], s, ids[i]) for i in active for s in seeds]
            outs = self._run_jobs(gen, specs, eval_size, T)
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

    def _run_jobs(self, gen: int, specs: list[JobSpec], eval_size: int | None,
                  steps: int | None = None) -> dict[str, Outcome]:
        """Evaluate `specs` through the executor, plus the paired
        baseline on any seed not cached yet; jobs in this generation's journal are reused.
        `steps`: inner steps of these jobs (None: `search.evaluator.inner_steps`)."""
        ec = self.cfg.search.evaluator
        fid = "" if steps is None else f"@{steps}"
        journal = self.recorder.journalled(gen)
        need = []
        if ec.baseline is not None:
            for s in dict.fromkeys(sp.seed for sp in specs):
                if f"{s}:{eval_size}{fid}" not in self.baselines:
                    need.append(JobSpec("baseline", -1, np.zeros(self.space.dim), s, "baseline"))
        self._hook("on_generation_start", gen, len(need) + len(specs))
        outs: dict[str, Outcome] = {}
        todo: list[Job] = []
        meta: dict[int, tuple[str, str, str]] = {}  # job index -> key, sha, id
        for sp in need + specs:
            role, slot, theta, seed, cid = sp.role, sp.slot, sp.theta, sp.seed, sp.candidate_id
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
        (s,) = self._score(gen, "incumbent", [inc.theta], [inc.id], seeds)
        if not s.ok:
            log.warning("generation %d: re-evaluating the incumbent %s failed: %s", gen, inc.id, s.error)
            return None
        self.incumbent = inc.with_values([*inc.values, *s.values])
        # its place in the confirmation pool carries the re-evaluated values too (the pool keeps its order)
        self.pool = [self.incumbent if p.id == inc.id else p for p in self.pool]
        return s.fitness

    def _offer(self, gen: int, cand: Candidate, s: Score) -> None:
        """A finished candidate may become the incumbent and may join the confirmation pool."""
        ec = self.cfg.search.evaluator
        entry = Entry(np.asarray(cand.theta, dtype=np.float64).copy(), cand.id, gen, tuple(s.values),
                      float(s.fitness), s.stderr)
        rule, z = ec.incumbent, ec.lcb_z
        if self.incumbent is None or entry.rank(rule, z) > self.incumbent.rank(rule, z):
            self.incumbent = entry
        k = ec.confirm.top_k
        if k > 0:
            self.pool = sorted([*self.pool, entry], key=lambda e: -e.rank(rule, z))[:k]

    # ------------------------------------------------------------------ confirmation
    def _confirm(self, gen: int) -> None:
        """Re-score the pool on fresh seeds; the best confirmed candidate becomes the answer."""
        ec = self.cfg.search.evaluator
        seeds = confirmation_seeds(self.cfg.seed, ec.confirm.seeds)
        self._start_stage(gen)
        pool = self.pool
        scores = self._score(gen, "confirm", [p.theta for p in pool], [p.id for p in pool], seeds)
        rows = []
        for p, s in zip(pool, scores, strict=True):
            rows.append({"id": p.id, "search_fitness": p.fitness, "search_stderr": p.stderr,
                         "status": s.status, "fitness": s.fitness, "stderr": s.stderr,
                         "values": list(s.values), "error": s.error})
        ok = [i for i, s in enumerate(scores) if s.ok]
        best = max(ok, key=lambda i: criterion(scores[i].fitness, scores[i].stderr, ec.incumbent, ec.lcb_z),
                   default=None)
        self.confirmation = {"seeds": seeds, "rows": rows, "reused_jobs": self._jobs_reused,
                             "best": None if best is None else pool[best].id}
        children = [self._child(gen, i, p.id, p.theta, (p.id,), "confirmation", s, "confirm")
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
        """The answer: the best confirmed candidate when the confirmation ran, else the incumbent."""
        run_ids = self.recorder.run_ids
        c = self.confirmation
        common = {"history": self.history, "parent_run_id": self.parent_run, "registered_uri": None,
                  "wall_s": wall, "timings": dict(self.timings), "confirmation": c,
                  "inner_steps_spent": self.steps_spent}
        if c is not None and c["best"] is not None:
            row = next(r for r in c["rows"] if r["id"] == c["best"])
            theta = next(p.theta for p in self.pool if p.id == c["best"])
            return SearchResult(best_theta=np.asarray(theta), best_fitness=float(row["fitness"]),
                                best_stderr=row["stderr"], best_id=c["best"],
                                best_run_id=run_ids.get(run_key("confirm", c["best"])), **common)
        inc = self.incumbent
        if inc is None:
            return SearchResult(best_theta=self.strategy.recommendation(), best_fitness=float("nan"),
                                best_stderr=None, best_id=None, best_run_id=None, **common)
        return SearchResult(best_theta=np.asarray(inc.theta), best_fitness=float(inc.fitness),
                            best_stderr=inc.stderr, best_id=inc.id, best_run_id=run_ids.get(inc.id), **common)


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _ok_fitness(o: Outcome) -> float | None:
    return o.fitness if o.status == FINISHED else None

"""`mirrorlab probe`: the fitness landscape's signal and noise, measured before any search.

A search can only find what stands above its fitness noise. The probe scores P points of the
configured search space (its init x0, `probe.points` random draws and the paired baseline) on the
same S inner seeds (common random numbers: a seed fixes prompt order, sampling and the validation
subset for every point) with the search's own evaluator and executor, then splits the variance of
one evaluation into between-point signal, training-seed noise and validation-sampling noise
(`mirrorlab.variance`), for the fitness and for each cheaper proxy the evaluator measured
(reference log-likelihood, expected reward and pass@k over k samples, val accuracy at shorter
horizons), with each one's cost per evaluation and its rank correlation with test accuracy on
the other half of the seeds. The components become a plan: seeds per candidate to tell apart
points d apart, and the expected gain of the best of n random draws at a budget.

Seeds come from their own stream (never drawn by a search's generations or its confirmation).
Finished jobs go to a journal (`append_journal`), so a killed probe resumes without redoing them
and reaches the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from mirrorlab import plots, tasks, variance
from mirrorlab.config import Config, dump_config
from mirrorlab.evaluators import build_evaluator
from mirrorlab.executors import make_executor
from mirrorlab.journal import append_journal, read_journal
from mirrorlab.records import FINISHED, Job, Outcome
from mirrorlab.repro import run_record
from mirrorlab.spaces import SearchSpace, make_space
from mirrorlab.tracking import MlflowSession
from mirrorlab.values import jsonable

_PROBE_SALT = 0x9B0BE
JOURNAL = "journal.jsonl"
RUN_ID = "mlflow_run_id.txt"
PRIMARY = "fitness"


def probe_seeds(seed: int, k: int) -> list[int]:
    """The probe's k inner seeds: a stream of their own (31-bit, like the search's)."""
    return [
        int(np.random.SeedSequence([int(seed) % 2**32, _PROBE_SALT, j]).generate_state(1)[0] >> 1)
        for j in range(int(k))
    ]


@dataclass(frozen=True)
class Point:
    """One probed point: `role` candidate (the space's map for `theta`) or baseline."""

    id: str
    kind: str  # init | draw | perturb | baseline
    theta: np.ndarray
    role: str = "candidate"


def draw_points(space: SearchSpace, cfg: Config) -> list[Point]:
    """x0 (when `probe.include_init`), `probe.points` draws, the baseline (when configured)."""
    pc = cfg.probe
    x0 = space.initial(cfg.seed)
    pts = [Point("x0", "init", x0)] if pc.include_init else []
    if pc.draw == "perturb":
        sigma = pc.sigma or float(cfg.search.strategy.params.get("sigma", 0.5))
        rng = np.random.default_rng([int(cfg.seed) % 2**32, _PROBE_SALT, 1])
        pts += [
            Point(f"p{j}", "perturb", x0 + sigma * rng.standard_normal(space.dim)) for j in range(pc.points)
        ]
    else:
        for j in range(pc.points):
            s = int(
                np.random.SeedSequence([int(cfg.seed) % 2**32, _PROBE_SALT, 2, j]).generate_state(1)[0] >> 1
            )
            pts.append(Point(f"d{j}", "draw", space.initial(s)))
    if pc.include_baseline and cfg.search.evaluator.baseline is not None:
        pts.append(Point("baseline", "baseline", np.zeros(space.dim), role="baseline"))
    return pts


# --------------------------------------------------------------------------- analysis (pure)
def _cell(o: Outcome, name: str) -> tuple[float, list[float] | None]:
    """One evaluation's value of measure `name` and its per-problem scores (None: no scores)."""
    if name == PRIMARY:
        sc = list(o.scores)
        return float(o.fitness), (sc if len(sc) >= 2 else None)
    sc = [float(x) for x in o.extra[name]]
    return float(np.mean(sc)), sc


def _measures(outs: list[Outcome]) -> list[str]:
    """The fitness and every per-problem proxy all outcomes carry (test accuracy is the target)."""
    names = [k for k, v in outs[0].extra.items() if isinstance(v, list) and k != "test"]
    return [PRIMARY] + sorted(n for n in names if all(n in o.extra for o in outs))


def _components(
    vals: np.ndarray, scores: list[list[list[float] | None]], alpha: float
) -> variance.Components:
    """Components of one measure's points x seeds table; eval noise from per-problem scores when
    every cell has them (the same problems per seed: common random numbers)."""
    ev = None
    P, S = vals.shape
    if all(
        scores[p][s] is not None and len(scores[p][s]) == len(scores[0][s])
        for p in range(P)
        for s in range(S)
    ):
        ev = float(
            np.mean(
                [variance.interaction_var(np.asarray([scores[p][s] for p in range(P)])) for s in range(S)]
            )
        )
    return variance.variance_components(vals, ev, alpha)


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(stats.spearmanr(a, b).statistic)


def analyse(
    points: list[Point], seeds: list[int], outs: dict[str, Outcome], cfg: Config, val_fixed: bool = False
) -> dict[str, Any]:
    """The probe's result from its outcomes (`outs[f"{point id}:{seed}"]`): per measure the variance
    components of the space's points (the baseline is a reference, reported beside them, not a
    point of the landscape), cost per evaluation, seeds to resolve one signal sd, rank correlation
    with test accuracy (measure on the first half of the seeds, test on the second); the plan;
    failures.

    Pairing with the baseline subtracts the same number from every point of a seed: the two-way
    decomposition is unchanged by it (it only moves the seed main effect), so the noise that ranks
    candidates of one generation is `noise_sd` either way; pairing removes `seed_main_sd` from
    comparisons across generations, and the confirmation stage's candidate-minus-baseline
    difference carries twice the noise variance (both runs' own noise).

    `val_fixed`: every seed scored the same validation problems (the whole split). Then what is
    specific to those problems persists across seeds and sits in the signal, and the noise has no
    separate validation-sampling part to estimate: `eval_sd` is None (unmeasured)."""
    pc = cfg.probe
    ok = [p for p in points if all(outs[f"{p.id}:{s}"].status == FINISHED for s in seeds)]
    failed = {
        p.id: next(outs[f"{p.id}:{s}"].error for s in seeds if outs[f"{p.id}:{s}"].status != FINISHED)
        for p in points
        if p not in ok
    }
    space_rows = [i for i, p in enumerate(ok) if p.role != "baseline"]
    if len(space_rows) < 2:
        raise RuntimeError(
            f"probe: fewer than 2 points of the space finished on every seed (failed: {failed})"
        )
    grid = [[outs[f"{p.id}:{s}"] for s in seeds] for p in ok]
    flat = [o for row in grid for o in row]
    train_s = float(np.mean([o.timings.get("train_s", 0.0) + o.timings.get("reset_s", 0.0) for o in flat]))
    eval_s = float(np.mean([o.timings.get("eval_s", 0.0) for o in flat]))
    has_test = all("test" in o.extra for o in flat)
    half = len(seeds) // 2
    test_b = (
        np.array([[np.mean(o.extra["test"]) for o in row[half:]] for row in grid]).mean(1)
        if has_test
        else None
    )
    test_all = (
        np.array([[np.mean(o.extra["test"]) for o in row] for row in grid]).mean(1) if has_test else None
    )
    steps = cfg.search.evaluator.inner_steps
    comps: dict[str, dict[str, Any]] = {}
    tables: dict[str, list[list[float]]] = {}
    for name in _measures(flat):
        cells = [[_cell(o, name) for o in row] for row in grid]
        allvals = np.array([[c[0] for c in row] for row in cells])
        vals = allvals[space_rows]
        per_problem = [[None if val_fixed else c[1] for c in cells[i]] for i in space_rows]
        c = _components(vals, per_problem, pc.alpha)
        if name == PRIMARY:
            cost = train_s + eval_s
        elif name.startswith("val_at_"):
            cost = train_s * int(name.removeprefix("val_at_")) / max(steps, 1) + eval_s
        else:
            cost = train_s + float(np.mean([o.extra.get("cost_s", {}).get(name, 0.0) for o in flat]))
        d = c.to_dict()
        k = (
            variance.seeds_for_difference(c.noise_var, c.signal_sd, pc.power, pc.alpha)
            if c.signal_sd > 0
            else None
        )
        d.update(
            cost_s=cost,
            seeds_to_resolve_signal=k,
            cpu_s_to_resolve_signal=None if k is None else k * cost,
            spearman_vs_test_other_seeds=None
            if test_b is None or half == 0
            else _spearman(vals[:, :half].mean(1), test_b[space_rows]),
            spearman_vs_test_same_seeds=None
            if test_all is None
            else _spearman(vals.mean(1), test_all[space_rows]),
        )
        comps[name] = d
        tables[name] = allvals.tolist()
    view = comps[PRIMARY]
    vc = variance.Components(**{k: view[k] for k in variance.Components.__dataclass_fields__})
    plan = variance.plan(
        vc,
        pc.budgets,
        pc.differences,
        pc.val_multipliers,
        pc.power,
        pc.alpha,
        cfg.search.evaluator.confirm.seeds,
    )
    plan["from"] = PRIMARY
    top = comps[PRIMARY]
    return {
        "signal_sd": top["signal_sd"],
        "seed_sd": top["seed_sd"],
        "eval_sd": top["eval_sd"],
        "noise_sd": top["noise_sd"],
        "icc": top["icc"],
        "n_points": len(space_rows),
        "n_seeds": len(seeds),
        "plan": plan,
        "components": comps,
        "tables": tables,
        "points": [
            {
                "id": p.id,
                "kind": p.kind,
                "role": p.role,
                "fitness_mean": float(np.mean(tables[PRIMARY][i])),
                "test_mean": None if test_all is None else float(test_all[i]),
            }
            for i, p in enumerate(ok)
        ],
        "seeds": list(seeds),
        "failed": failed,
        "job_s_total": float(sum(o.timings.get("total_s", 0.0) for o in outs.values())),
        "train_s_per_run": train_s,
        "eval_s_per_run": eval_s,
    }


def _label(point: dict[str, Any]) -> str:
    """A point's plot label: its id, and its lambda where the space searches one."""
    c = (point.get("describe") or {}).get("coef")
    return point["id"] if c is None else f"{point['id']} (lambda {c:.3g})"


def summary_markdown(res: dict[str, Any], cfg: Config) -> str:
    """The probe's answer in a few lines of Markdown (the MLflow run's description)."""
    p = res["plan"]
    lines = [
        f"**Probe of `{cfg.search.space.kind}` ({cfg.name})**: {res['n_points']} points x "
        f"{res['n_seeds']} seeds, {cfg.search.evaluator.inner_steps} inner steps.",
        "",
        "| measure | signal sd | noise sd | icc | cost s | seeds to resolve signal |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in res["components"].items():
        lines.append(
            f"| {name} | {c['signal_sd']:.4g} | {c['noise_sd']:.4g} | {c['icc']:.2f} | "
            f"{c.get('cost_s', float('nan')):.1f} | {c.get('seeds_to_resolve_signal')} |"
        )
    lines += [
        "",
        f"Verdict ({p['from']}): {p['verdict']}. Confirmation on {p['confirm_seeds']} seeds detects "
        f"{p['confirm_detectable_difference']:.4g}.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the probe
class Probe:
    """Scores the probe's points on its seeds through the search's executor, with a resume journal."""

    def __init__(self, cfg: Config, evaluator: Any = None) -> None:
        self.cfg = cfg
        self.space = make_space(cfg.search.space, cfg.divergence.coef)
        self.evaluator = evaluator if evaluator is not None else build_evaluator(cfg)
        self.dir = Path(cfg.probe.checkpoint_dir or Path(cfg.output_dir) / cfg.name / "probe")
        self.points = draw_points(self.space, cfg)
        self.seeds = probe_seeds(cfg.seed, cfg.probe.seeds)
        self.progress: Any = None  # optional: on_job_end(done, total, label, fitness)

    def _measure(self) -> dict[str, Any]:
        pc = self.cfg.probe
        return {
            "loglik": pc.loglik,
            "sample_k": pc.sample_k,
            "test_size": pc.test_size,
            "horizons": list(pc.horizons),
        }

    def _val_fixed(self, eval_size: int | None) -> bool:
        """Whether every seed scores the whole validation split (no per-seed subset)."""
        if eval_size is None:
            return True
        return eval_size >= len(tasks.get(self.cfg.task.name, **self.cfg.task.params).split("val"))

    def _sha(self, p: Point) -> str:
        return "baseline" if p.role == "baseline" else self.space.sha(p.theta)

    def _settings(self, eval_size: int | None) -> str:
        """Digest of what a job's outcome depends on besides its point and seed (measurements,
        validation size, inner steps, the baseline, model, task, training settings): a journalled
        job is reused on resume only under the same settings."""
        cfg, ec = self.cfg, self.cfg.search.evaluator
        key = {
            "measure": self._measure(),
            "eval_size": eval_size,
            "inner_steps": ec.inner_steps,
            "baseline": None if ec.baseline is None else ec.baseline.model_dump(mode="json"),
            "model": cfg.model.model_dump(mode="json"),
            "task": cfg.task.model_dump(mode="json"),
            "train": cfg.train.model_dump(mode="json"),
            "divergence": cfg.divergence.model_dump(mode="json"),
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Score every (point, seed) not in the journal, analyse, write probe.json, plot, MLflow."""
        t0 = time.monotonic()
        cfg, pc = self.cfg, self.cfg.probe
        self.dir.mkdir(parents=True, exist_ok=True)
        jpath = self.dir / JOURNAL
        if not resume:
            jpath.unlink(missing_ok=True)
            (self.dir / RUN_ID).unlink(missing_ok=True)
        done = read_journal(jpath)
        outs: dict[str, Outcome] = {}
        todo: list[Job] = []
        keys: dict[int, tuple[str, str]] = {}
        eval_size = pc.val_size or cfg.search.evaluator.val_size
        settings = self._settings(eval_size)
        for p in self.points:
            for s in self.seeds:
                key, sha = f"{p.id}:{s}", self._sha(p)
                e = done.get(key)
                # reused: the same point, finished, under the same settings (entries written before
                # the settings digest existed carry none and are taken as they are)
                if (
                    e is not None
                    and e["sha"] == sha
                    and e["outcome"]["status"] == FINISHED
                    and e.get("settings", settings) == settings
                ):
                    outs[key] = Outcome.from_dict(e["outcome"])
                    continue
                job = Job(
                    0,
                    len(todo),
                    np.asarray(p.theta, dtype=np.float64),
                    s,
                    cfg.search.evaluator.timeout_s,
                    role=p.role,
                    candidate=0,
                    eval_size=eval_size,
                    measure=self._measure(),
                )
                keys[job.index] = (key, sha)
                todo.append(job)
        reused = len(outs)
        tracker = _ProbeRun(cfg, self.dir) if cfg.tracking.enabled else None

        def on_result(job: Job, out: Outcome) -> None:
            key, sha = keys[job.index]
            outs[key] = out
            append_journal(jpath, {"key": key, "sha": sha, "settings": settings, "outcome": out.to_dict()})
            if self.progress is not None:
                self.progress.on_job_end(
                    len(outs),
                    len(self.points) * len(self.seeds),
                    key,
                    out.fitness if out.status == FINISHED else None,
                )

        status = "FAILED"
        try:
            if todo:
                ex = cfg.search.executor
                executor = make_executor(ex.kind, self.evaluator, **ex.model_dump(exclude={"kind"}))
                executor.launch()
                try:
                    executor.map(todo, on_result=on_result)
                finally:
                    executor.close()
            res = analyse(self.points, self.seeds, outs, cfg, val_fixed=self._val_fixed(eval_size))
            theta = {p.id: p.theta for p in self.points if p.role != "baseline"}
            for row in res["points"]:  # what each point is (its lambda, for spaces that search it)
                if row["id"] in theta:
                    row["describe"] = jsonable(self.space.describe(theta[row["id"]]))
            res.update(
                wall_s=time.monotonic() - t0,
                jobs_run=len(todo),
                jobs_reused=reused,
                space=cfg.search.space.kind,
                draw=pc.draw,
                val_size=eval_size,
                inner_steps=cfg.search.evaluator.inner_steps,
                config=dump_config(cfg),
                run_record=run_record(cfg.seed),
            )
            path = self.dir / "probe.json"
            path.write_text(json.dumps(jsonable(res), indent=2, default=str))
            png = plots.plot_probe(
                [_label(p) for p in res["points"]],
                res["tables"][PRIMARY],
                res["components"],
                self.dir / "probe.png",
                title=f"{cfg.name}: {res['n_points']} points x "
                f"{res['n_seeds']} seeds ({cfg.search.space.kind})",
            )
            res["files"] = [str(path), str(png)]
            if tracker is not None:
                res["mlflow_run_id"] = tracker.finish(res, [path, png])
            status = "FINISHED"
            return res
        finally:
            if tracker is not None and status != "FINISHED":
                tracker.close("FAILED")


class _ProbeRun:
    """The probe's MLflow run (reopened by a resumed probe): params, components, plan, files."""

    def __init__(self, cfg: Config, directory: Path) -> None:
        self.session = MlflowSession(cfg.tracking, cfg.name)
        f = directory / RUN_ID
        rid = f.read_text().strip() if f.is_file() else ""
        if not rid:
            rid = self.session.create_run(
                f"{cfg.name}-probe", {"mirrorlab.kind": "probe", "mirrorlab.space": cfg.search.space.kind}
            )
            self.session.log_config(rid, cfg)
            self.session.log_params(
                rid,
                {
                    "space": cfg.search.space.kind,
                    "points": cfg.probe.points,
                    "draw": cfg.probe.draw,
                    "seeds": cfg.probe.seeds,
                    "inner_steps": cfg.search.evaluator.inner_steps,
                    "val_size": cfg.probe.val_size or cfg.search.evaluator.val_size,
                    "baseline": (
                        cfg.search.evaluator.baseline.name if cfg.search.evaluator.baseline else None
                    ),
                },
            )
            f.write_text(rid)
        self.run_id, self.cfg, self.dir = rid, cfg, directory

    def finish(self, res: dict[str, Any], files: list[Path]) -> str:
        ms: dict[str, float | None] = {}
        for name, c in res["components"].items():
            for k in ("signal_sd", "noise_sd", "seed_sd", "eval_sd", "icc", "cost_s"):
                v = c.get(k)
                ms[f"{name}/{k}"] = None if v is None else round(float(v), 6)
        ms.update({k: res[k] for k in ("signal_sd", "noise_sd", "icc", "wall_s")})
        ms["confirm_detectable_difference"] = res["plan"]["confirm_detectable_difference"]
        self.session.log_metrics(self.run_id, ms)
        self.session.client.set_tag(self.run_id, "mlflow.note.content", summary_markdown(res, self.cfg))
        self.session.log_files(self.run_id, files)
        self.close("FINISHED")
        return self.run_id

    def close(self, status: str) -> None:
        """End the run; a finished probe forgets it (a new probe starts a new run)."""
        self.session.end_run(self.run_id, status)
        if status == "FINISHED":
            (self.dir / RUN_ID).unlink(missing_ok=True)

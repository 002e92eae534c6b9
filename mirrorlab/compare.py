"""Methods x seeds comparisons with error bars and a paired test against a baseline.

A comparison trains every method on the same seeds with otherwise identical settings, evaluates
each run on one split, and reports mean +- std per method plus, for each method, the paired
difference from the baseline (same seed = same pair): its mean, standard error, a paired
t-test p-value, an exact sign-flip permutation p-value and a plain verdict. The statistics are
small pure functions so they can be tested without training anything.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mirrorlab.config import START_LABEL

# --------------------------------------------------------------------------- statistics


def t_two_sided_pvalue(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with integer `df` >= 1 (closed form, no scipy needed).

    Uses the finite series for A(t|df) = P(|T| < t) (Abramowitz & Stegun 26.7.3-4).
    """
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    c2 = c * c
    if df % 2 == 1:
        acc, term = 0.0, c
        if df > 1:
            acc = term
            for k in range(1, (df - 3) // 2 + 1):
                term *= c2 * (2 * k) / (2 * k + 1)
                acc += term
        a = (2 / math.pi) * (theta + s * acc) if df > 1 else 2 * theta / math.pi
    else:
        acc, term = 1.0, 1.0
        for k in range(1, (df - 2) // 2 + 1):
            term *= c2 * (2 * k - 1) / (2 * k)
            acc += term
        a = s * acc
    return min(1.0, max(0.0, 1.0 - a))


def sign_flip_pvalue(diffs: list[float], max_exact: int = 16, samples: int = 20000, seed: int = 0) -> float:
    """Two-sided sign-flip permutation p-value of the mean of paired differences.

    Exact enumeration of all 2^n sign patterns for n <= `max_exact`, Monte Carlo otherwise.
    With n pairs the smallest attainable p is 2 / 2^n (0.25 for 3 seeds).
    """
    n = len(diffs)
    if n == 0:
        return float("nan")
    obs = abs(sum(diffs)) - 1e-12 * max(1.0, sum(abs(d) for d in diffs))
    if n <= max_exact:
        hits = total = 0
        for signs in itertools.product((1.0, -1.0), repeat=n):
            total += 1
            if abs(sum(s * d for s, d in zip(signs, diffs, strict=True))) >= obs:
                hits += 1
        return hits / total
    rng = random.Random(seed)
    hits = 1  # count the observed pattern (unbiased Monte Carlo p)
    for _ in range(samples):
        if abs(sum(d if rng.random() < 0.5 else -d for d in diffs)) >= obs:
            hits += 1
    return hits / (samples + 1)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


@dataclass
class PairedComparison:
    """A method against the baseline over the seeds both ran with (differences = method - baseline)."""

    method: str
    baseline: str
    n: int
    mean_diff: float
    stderr: float
    t_pvalue: float
    perm_pvalue: float
    length_diff: float
    exceeds_noise: bool
    verdict: str


def paired_comparison(
    method: str,
    baseline: str,
    base_values: dict[int, float],
    values: dict[int, float],
    base_lengths: dict[int, float] | None = None,
    lengths: dict[int, float] | None = None,
    alpha: float = 0.05,
) -> PairedComparison:
    """Paired test of `values` against `base_values`, both keyed by seed.

    The verdict says "difference exceeds seed noise" when the paired t-test p < `alpha`
    (the sign-flip p is reported beside it; with 3 seeds it cannot go below 0.25).
    """
    seeds = sorted(set(base_values) & set(values))
    diffs = [values[s] - base_values[s] for s in seeds]
    n = len(diffs)
    mean_d, sd = mean_std(diffs)
    if n < 2:
        se, p_t = float("nan"), float("nan")
    else:
        se = sd / math.sqrt(n)
        if se == 0.0:
            p_t = 1.0 if mean_d == 0.0 else 0.0
        else:
            p_t = t_two_sided_pvalue(mean_d / se, n - 1)
    p_perm = sign_flip_pvalue(diffs) if n else float("nan")
    ldiff = float("nan")
    if base_lengths and lengths:
        ls = sorted(set(base_lengths) & set(lengths))
        if ls:
            ldiff = sum(lengths[s] - base_lengths[s] for s in ls) / len(ls)
    exceeds = bool(n >= 2 and p_t < alpha)
    if n < 2:
        verdict = "needs >= 2 seeds"
    elif exceeds:
        verdict = f"difference exceeds seed noise ({'better' if mean_d > 0 else 'worse'})"
    else:
        verdict = "within seed noise"
    return PairedComparison(method, baseline, n, mean_d, se, p_t, p_perm, ldiff, exceeds, verdict)


# --------------------------------------------------------------------------- results


@dataclass
class RunResult:
    """One (method, seed) run: the evaluation on the comparison split and its training curve."""

    method: str
    seed: int
    metric: float
    stderr: float
    mean_length: float
    n: int
    wall_s: float = 0.0
    curve: list[dict[str, float]] = field(default_factory=list)
    run_id: str | None = None


@dataclass
class MethodSummary:
    """Mean +- std over seeds of one method's metric and completion length."""

    label: str
    divergence: dict[str, Any]
    seeds: list[int]
    metric_mean: float
    metric_std: float
    length_mean: float
    length_std: float


@dataclass
class CompareResult:
    """Everything a comparison reports: per-run numbers, per-method summaries, paired tests."""

    metric_name: str
    split: str
    baseline: str
    runs: list[RunResult]
    methods: list[MethodSummary]
    comparisons: list[PairedComparison]
    wall_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (what `results.json` holds)."""
        return _jsonable(asdict(self))

    def save(self, path: str | Path) -> Path:
        """Write the results as JSON."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=2))
        return p


def _jsonable(x: Any) -> Any:
    """Replace NaN/inf by None so the JSON is strict."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def summarise(
    runs: list[RunResult],
    labels: list[str],
    baseline: str,
    metric_name: str = "metric",
    split: str = "test",
    divergences: dict[str, dict[str, Any]] | None = None,
    alpha: float = 0.05,
) -> CompareResult:
    """Aggregate runs into per-method mean +- std and paired comparisons against `baseline`."""
    if baseline not in labels:
        raise ValueError(f"baseline {baseline!r} is not one of {labels}")
    by: dict[str, list[RunResult]] = {lab: [] for lab in labels}
    for r in runs:
        by.setdefault(r.method, []).append(r)
    methods = []
    for lab in labels:
        rs = sorted(by[lab], key=lambda r: r.seed)
        mm, ms = mean_std([r.metric for r in rs])
        lm, ls = mean_std([r.mean_length for r in rs])
        methods.append(
            MethodSummary(lab, (divergences or {}).get(lab, {}), [r.seed for r in rs], mm, ms, lm, ls)
        )
    base = {r.seed: r.metric for r in by[baseline]}
    base_len = {r.seed: r.mean_length for r in by[baseline]}
    comps = [
        paired_comparison(
            lab, baseline, base, {r.seed: r.metric for r in by[lab]},
            base_len, {r.seed: r.mean_length for r in by[lab]}, alpha=alpha,
        )
        for lab in labels
        if lab != baseline
    ]
    return CompareResult(metric_name, split, baseline, runs, methods, comps)


def _fmt(x: float, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def results_table(result: CompareResult) -> Any:
    """A rich Table: per method mean +- std of metric and length, and the paired test vs baseline."""
    from rich.table import Table

    comps = {c.method: c for c in result.comparisons}
    t = Table(
        title=f"{result.metric_name} on {result.split} (mean +- std over seeds; paired vs {result.baseline})"
    )
    for col in ("method", "seeds", result.metric_name, "length (tokens)", "diff vs base", "p (t)",
                "p (sign-flip)", "verdict"):
        t.add_column(col, justify="left" if col in ("method", "verdict") else "right")
    for m in result.methods:
        c = comps.get(m.label)
        row = [
            m.label,
            str(len(m.seeds)),
            f"{_fmt(m.metric_mean)} +- {_fmt(m.metric_std)}",
            f"{_fmt(m.length_mean, 1)} +- {_fmt(m.length_std, 1)}",
        ]
        if c is None:
            row += ["(baseline)", "", "", ""]
        else:
            row += [f"{c.mean_diff:+.3f} +- {_fmt(c.stderr)}", _fmt(c.t_pvalue), _fmt(c.perm_pvalue),
                    c.verdict]
        t.add_row(*row)
    return t


def results_text(result: CompareResult, width: int = 140) -> str:
    """The results table rendered as plain text (for logs, MLflow and files)."""
    import io

    from rich.console import Console

    con = Console(width=width, record=True, file=io.StringIO())
    con.print(results_table(result))
    return con.export_text()


# --------------------------------------------------------------------------- divergences


def compare_methods(cfg: Any) -> list[Any]:
    """The methods of `cfg.compare`, or the single `cfg.divergence` (labelled by name) when empty."""
    from mirrorlab.config import MethodConfig

    if cfg.compare.methods:
        return list(cfg.compare.methods)
    return [MethodConfig(label=cfg.divergence.name, divergence=cfg.divergence)]


def resolve_divergence(
    dcfg: Any, map_refs: dict[str, str] | None = None, tracking_uri: str | None = None
) -> Any:
    """Build the divergence a `DivergenceConfig` describes.

    `map` (a file, a map directory or `models:/NAME@ALIAS`, after substitution through
    `map_refs`) wins over `name` + `params`; otherwise `divergences.get(name, **params)`.
    """
    from mirrorlab import divergences

    if dcfg.map is not None:
        ref = (map_refs or {}).get(dcfg.map, dcfg.map)
        from mirrorlab.tracking import load_map

        return load_map(ref, tracking_uri=tracking_uri)
    return divergences.get(dcfg.name, **dcfg.params)


# --------------------------------------------------------------------------- MLflow


class CompareTracker:
    """MLflow logging of a comparison: a parent run, a child run per (method, seed).

    Uses an explicit `MlflowClient` (no global MLflow state), the same store as searches.
    """

    def __init__(self, cfg: Any, enabled: bool = True) -> None:
        self.enabled = enabled and bool(cfg.tracking.enabled)
        self.parent_run_id: str | None = None
        if not self.enabled:
            return
        from mlflow import MlflowClient

        from mirrorlab.tracking import resolve_tracking_uri

        self.uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        name = cfg.tracking.experiment or cfg.name
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            self.experiment_id = self.client.create_experiment(name)
        else:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            self.experiment_id = exp.experiment_id

    def start(self, cfg: Any, kind: str = "compare", run_name: str | None = None) -> str | None:
        """Create the parent run with the config and run record."""
        if not self.enabled:
            return None
        import tempfile

        from mirrorlab.config import dump_config
        from mirrorlab.repro import run_record

        run = self.client.create_run(
            self.experiment_id, run_name=run_name or f"{cfg.name}-{kind}",
            tags={"mirrorlab.kind": kind, "mirrorlab.task": cfg.task.name,
                  "mirrorlab.split": cfg.compare.split},
        )
        self.parent_run_id = run.info.run_id
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "config.yaml").write_text(dump_config(cfg))
            (Path(d) / "run_record.json").write_text(json.dumps(run_record(cfg.seed), indent=2, default=str))
            self.client.log_artifacts(self.parent_run_id, d)
        return self.parent_run_id

    def log_run(self, r: RunResult, divergence: dict[str, Any], split: str, metric_name: str) -> str | None:
        """One child run: params, the evaluation, the training curve (batched)."""
        if not self.enabled:
            return None
        from mlflow.entities import Param

        from mirrorlab.tracking import mlflow_metric

        run = self.client.create_run(
            self.experiment_id, run_name=f"{r.method}-s{r.seed}",
            tags={"mlflow.parentRunId": self.parent_run_id or "", "mirrorlab.kind": "compare-run",
                  "mirrorlab.method": r.method, "mirrorlab.seed": str(r.seed)},
        )
        rid = run.info.run_id
        ts = int(1000 * time.time())
        params = [Param("method", r.method), Param("seed", str(r.seed)), Param("split", split)]
        params += [Param(f"divergence.{k}", json.dumps(v, default=str)[:6000]) for k, v in divergence.items()]
        ms = [mlflow_metric(f"{split}_{metric_name}", r.metric, ts, 0),
              mlflow_metric(f"{split}_stderr", r.stderr, ts, 0),
              mlflow_metric(f"{split}_mean_length", r.mean_length, ts, 0),
              mlflow_metric("wall_s", r.wall_s, ts, 0)]
        for i, row in enumerate(r.curve):
            step = int(row.get("step", i + 1))
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    ms.append(mlflow_metric(f"train/{k}", float(v), ts, step))
        ms = [m for m in ms if math.isfinite(m.value)]
        self.client.log_batch(rid, params=params)
        for i in range(0, len(ms), 900):
            self.client.log_batch(rid, metrics=ms[i: i + 900])
        self.client.set_terminated(rid, status="FINISHED")
        return rid

    def finish(self, result: CompareResult | None, files: list[Path], status: str = "FINISHED") -> None:
        """Summary metrics per method, the results JSON/table/plots as artifacts; close the run."""
        if not self.enabled or self.parent_run_id is None:
            return
        from mirrorlab.tracking import mlflow_metric

        if result is not None:
            ts = int(1000 * time.time())
            ms = []
            for m in result.methods:
                k = m.label  # mlflow_metric makes the key valid
                ms += [mlflow_metric(f"{k}/{result.metric_name}_mean", m.metric_mean, ts, 0),
                       mlflow_metric(f"{k}/{result.metric_name}_std", m.metric_std, ts, 0),
                       mlflow_metric(f"{k}/length_mean", m.length_mean, ts, 0)]
            for c in result.comparisons:
                k = c.method
                ms += [mlflow_metric(f"{k}/diff_vs_baseline", c.mean_diff, ts, 0),
                       mlflow_metric(f"{k}/p_t", c.t_pvalue, ts, 0)]
            ms = [m for m in ms if math.isfinite(m.value)]
            if ms:
                self.client.log_batch(self.parent_run_id, metrics=ms)
        for f in files:
            if Path(f).is_file():
                sub = "plots" if str(f).endswith(".png") else None
                self.client.log_artifact(self.parent_run_id, str(f), sub)
        self.client.set_terminated(self.parent_run_id, status=status)


class _CurveRecorder:
    """Trainer callback keeping the per-step metrics (in case `train()` returns nothing)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_step(self, step: int, metrics: dict[str, Any]) -> None:
        row = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        row["step"] = float(step)
        self.rows.append(row)


def _plain_curve(curve: Any, fallback: list[dict[str, float]]) -> list[dict[str, float]]:
    rows = curve if isinstance(curve, list) and curve else fallback
    out = []
    for i, row in enumerate(rows):
        r = {k: float(v) for k, v in dict(row).items()
             if isinstance(v, int | float) and not isinstance(v, bool)}
        r.setdefault("step", float(i + 1))
        out.append(r)
    return out


# --------------------------------------------------------------------------- the run loop


def _curve_key(curves: list[list[dict[str, float]]], names: tuple[str, ...]) -> str | None:
    for k in names:
        if any(isinstance(row.get(k), int | float) for c in curves for row in c):
            return k
    return None


def write_plots(result: CompareResult, out_dir: str | Path) -> list[Path]:
    """Training curves (reward, completion length) and metric vs length per method, as PNGs."""
    from mirrorlab import plots

    d = Path(out_dir)
    labels = [m.label for m in result.methods]
    by = {lab: sorted([r for r in result.runs if r.method == lab], key=lambda r: r.seed) for lab in labels}
    paths = []
    all_curves = [r.curve for r in result.runs]
    for names, fname, ylabel in (
        (("reward_mean", "reward"), "curves_reward.png", "reward"),
        (("completion_length", "mean_length", "length"), "curves_length.png", "completion length (tokens)"),
        (("div_mean", "divergence"), "curves_divergence.png", "mean divergence D"),
        (("grad_ratio",), "curves_grad_ratio.png", "regulariser / PG gradient norm"),
    ):
        key = _curve_key(all_curves, names)
        if key is None:
            continue
        curves = {lab: [[row.get(key, math.nan) for row in r.curve] for r in by[lab]] for lab in labels}
        smooth = max(1, min(10, max((len(c) for v in curves.values() for c in v), default=1) // 10))
        paths.append(plots.plot_training_curves(curves, d / fname, ylabel=ylabel,
                                                title=f"training {ylabel} (mean over seeds, min-max)",
                                                smooth=smooth))
    pts = {lab: [(r.mean_length, r.metric) for r in by[lab]] for lab in labels}
    paths.append(plots.plot_metric_vs_length(pts, d / "metric_vs_length.png", metric_name=result.metric_name))
    return paths


def run_compare(
    cfg: Any,
    out_dir: str | Path | None = None,
    console: Any = None,
    map_refs: dict[str, str] | None = None,
    progress: bool = True,
) -> CompareResult:
    """Train every method on every seed (same settings otherwise), evaluate on `compare.split`.

    One trainer is built once and reused: `reset(seed)` restores the starting weights and a
    fresh optimiser, `set_divergence` swaps the regulariser. Writes `results.json`,
    `table.txt` and the PNGs into `out_dir` and logs everything to MLflow.
    """
    from mirrorlab.gbmpo import build_trainer
    from mirrorlab.progress import TrainProgress, _progress

    t_start = time.perf_counter()
    methods = compare_methods(cfg)
    labels = ([START_LABEL] if cfg.compare.include_start else []) + [m.label for m in methods]
    baseline = cfg.compare.baseline or labels[0]
    split = cfg.compare.split
    uri = cfg.tracking.tracking_uri
    divs = {m.label: resolve_divergence(m.divergence, map_refs, tracking_uri=uri) for m in methods}
    div_info = {}
    for m in methods:
        info = m.divergence.model_dump(mode="json")
        if m.divergence.map is not None and map_refs and m.divergence.map in map_refs:
            info["map"] = map_refs[m.divergence.map]
        sha = getattr(divs[m.label], "sha", None)
        if isinstance(sha, str):
            info["sha"] = sha
        div_info[m.label] = info
    if cfg.compare.include_start:
        div_info[START_LABEL] = {"name": "untrained", "coef": None, "steps": 0}
    tracker = CompareTracker(cfg)
    tracker.start(cfg)
    runs: list[RunResult] = []
    trainer = None
    metric_name = "metric"
    total = len(methods) * len(cfg.compare.seeds)
    status = "FAILED"
    prog = _progress(console) if progress else None
    try:
        if prog is not None:
            prog.start()
            runs_task = prog.add_task("runs", total=total, info="")
        for seed in cfg.compare.seeds:
            for m in methods:
                t0 = time.perf_counter()
                run_cfg = cfg.model_copy(deep=True)
                run_cfg.train.seed = seed
                run_cfg.divergence = m.divergence
                if trainer is None:
                    trainer = build_trainer(run_cfg, divergence=divs[m.label])
                    metric_name = getattr(trainer.task, "metric_name", "metric")
                else:
                    trainer.reset(seed=seed)
                if cfg.compare.include_start and m is methods[0]:  # the start, on this seed's eval
                    ev = trainer.evaluate(split, n=cfg.compare.eval_size)
                    r = RunResult(START_LABEL, seed, float(ev.metric), float(ev.stderr),
                                  float(ev.mean_length), int(ev.n), time.perf_counter() - t0, [])
                    r.run_id = tracker.log_run(r, div_info[START_LABEL], split, metric_name)
                    runs.append(r)
                    t0 = time.perf_counter()
                _set_divergence(trainer, divs[m.label], m.divergence)
                rec = _CurveRecorder()
                cbs: list[Any] = [rec]
                bar = None
                if prog is not None:
                    bar = TrainProgress(cfg.train.steps, f"{m.label} seed {seed}", progress=prog)
                    cbs.append(bar)
                curve = trainer.train(callbacks=cbs)
                if bar is not None:
                    bar.close()
                ev = trainer.evaluate(split, n=cfg.compare.eval_size)
                r = RunResult(m.label, seed, float(ev.metric), float(ev.stderr), float(ev.mean_length),
                              int(ev.n), time.perf_counter() - t0, _plain_curve(curve, rec.rows))
                r.run_id = tracker.log_run(r, div_info[m.label], split, metric_name)
                runs.append(r)
                if prog is not None:
                    prog.update(runs_task, advance=1,
                                info=f"last: {m.label} s{seed} {metric_name}={r.metric:.3f}")
        status = "FINISHED"
    finally:
        if prog is not None:
            prog.stop()
        if status != "FINISHED":
            tracker.finish(None, [], status="FAILED")
    result = summarise(runs, labels, baseline, metric_name, split, div_info)
    result.wall_s = time.perf_counter() - t_start
    result.meta = {"seeds": list(cfg.compare.seeds), "steps": cfg.train.steps, "lr": cfg.train.optim.lr,
                   "task": cfg.task.name, "model": cfg.model.name, "eval_size": cfg.compare.eval_size,
                   "mlflow_run_id": tracker.parent_run_id}
    files: list[Path] = []
    if out_dir is not None:
        d = Path(out_dir)
        files.append(result.save(d / "results.json"))
        (d / "table.txt").write_text(results_text(result))
        files.append(d / "table.txt")
        files += write_plots(result, d)
        try:  # the regularisers compared, as mirror maps (those with a potential)
            from mirrorlab import plots

            pot = {lab: dv for lab, dv in divs.items() if hasattr(dv, "phi_inv") and hasattr(dv, "h")}
            if pot:
                files.append(plots.plot_maps(pot, d / "maps.png", baselines=False))
        except Exception as e:  # noqa: BLE001 - a plot must never lose a finished comparison
            result.meta["maps_plot_error"] = str(e)
    tracker.finish(result, files)
    return result


def _set_divergence(trainer: Any, div: Any, dcfg: Any) -> None:
    """Swap the trainer's regulariser (and estimator). A loaded map that carries its own searched
    coefficient (a `mixture` map) uses it; otherwise the method's `coef`."""
    coef = dcfg.coef
    if dcfg.map is not None and isinstance(getattr(div, "coef", None), float):
        coef = div.coef
    trainer.set_divergence(div, coef=coef)
    for attr, val in (("estimator", dcfg.estimator), ("chunk_size", dcfg.chunk_size)):
        if hasattr(trainer, attr):
            setattr(trainer, attr, val)


def log_single_run(
    cfg: Any, kind: str, run_name: str, params: dict[str, Any], metrics: dict[str, float],
    curve: list[dict[str, float]] | None = None, files: list[Path] | None = None,
) -> str | None:
    """Log one finished run (train or eval) to MLflow: params, metrics, curve, files, config."""
    t = CompareTracker(cfg)
    if not t.enabled:
        return None
    import tempfile

    from mlflow.entities import Param

    from mirrorlab.config import dump_config
    from mirrorlab.repro import run_record
    from mirrorlab.tracking import mlflow_metric

    run = t.client.create_run(t.experiment_id, run_name=run_name,
                              tags={"mirrorlab.kind": kind, "mirrorlab.task": cfg.task.name})
    rid = run.info.run_id
    ts = int(1000 * time.time())
    t.client.log_batch(rid, params=[Param(k, json.dumps(v, default=str)[:6000]) for k, v in params.items()])
    ms = [mlflow_metric(k, float(v), ts, 0) for k, v in metrics.items()
          if v is not None and math.isfinite(float(v))]
    for i, row in enumerate(curve or []):
        step = int(row.get("step", i + 1))
        ms += [mlflow_metric(f"train/{k}", float(v), ts, step) for k, v in row.items()
               if k != "step" and isinstance(v, int | float) and math.isfinite(v)]
    for i in range(0, len(ms), 900):
        t.client.log_batch(rid, metrics=ms[i: i + 900])
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.yaml").write_text(dump_config(cfg))
        (Path(d) / "run_record.json").write_text(json.dumps(run_record(cfg.seed), indent=2, default=str))
        t.client.log_artifacts(rid, d)
    for f in files or []:
        if Path(f).is_file():
            t.client.log_artifact(rid, str(f), "plots" if str(f).endswith(".png") else None)
    t.client.set_terminated(rid, status="FINISHED")
    return rid

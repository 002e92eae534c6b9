"""Methods x seeds comparisons with error bars and a paired test against a baseline.

A comparison trains every method on the same seeds with otherwise identical settings, evaluates
each run on one split, and reports mean +- std per method plus, for each method, the paired
difference from the baseline (same seed = same pair): its mean, standard error, a paired
t-test p-value, an exact sign-flip permutation p-value and a plain verdict. The statistics are
small pure functions so they can be tested without training anything.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import random
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats

from mirrorlab import divergences, plots
from mirrorlab.config import STANDARD_BASELINES, START_LABEL, MethodConfig, standard_baselines
from mirrorlab.divergences import PotentialMixin
from mirrorlab.executors import make_executor
from mirrorlab.gbmpo import build_trainer, sample_tables
from mirrorlab.journal import append_journal, read_journal
from mirrorlab.maps import URI_SCHEMES, build_divergence
from mirrorlab.progress import TrainProgress, progress_bars
from mirrorlab.records import FINISHED, Job, Outcome
from mirrorlab.tracking import MlflowSession
from mirrorlab.values import fmt, jsonable

log = logging.getLogger(__name__)
JOURNAL = "compare.journal.jsonl"

# --------------------------------------------------------------------------- statistics


def t_two_sided_pvalue(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with `df` >= 1 degrees of freedom (scipy.stats)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if math.isnan(t):
        return float("nan")
    return float(min(1.0, 2.0 * scipy.stats.t.sf(abs(t), df)))


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
    started_at: float | None = None  # wall clock (unix s) of the run in the process that trained it
    ended_at: float | None = None


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
    # with compare.baselines: standard, every other method against the best standard row (by mean
    # metric, chosen after the fact on the same seeds: conservative for the methods)
    best_baseline: str | None = None
    vs_best: list[PairedComparison] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (what `results.json` holds)."""
        return jsonable(asdict(self), strict=True)

    def save(self, path: str | Path) -> Path:
        """Write the results as JSON."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=2))
        return p


def summarise(
    runs: list[RunResult],
    labels: list[str],
    baseline: str,
    metric_name: str = "metric",
    split: str = "test",
    divergences: dict[str, dict[str, Any]] | None = None,
    alpha: float = 0.05,
    best_of: list[str] | None = None,
) -> CompareResult:
    """Aggregate runs into per-method mean +- std and paired comparisons against `baseline`; with
    `best_of` (the standard baseline rows), also every other trained method against the best of
    them (`vs_best`)."""
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
    res = CompareResult(metric_name, split, baseline, runs, methods, comps)
    pool = [m for m in methods if best_of and m.label in best_of and m.seeds]
    if pool:
        best = max(pool, key=lambda m: m.metric_mean if not math.isnan(m.metric_mean) else -math.inf).label
        bv = {r.seed: r.metric for r in by[best]}
        bl = {r.seed: r.mean_length for r in by[best]}
        res.best_baseline = best
        res.vs_best = [
            paired_comparison(lab, best, bv, {r.seed: r.metric for r in by[lab]},
                              bl, {r.seed: r.mean_length for r in by[lab]}, alpha=alpha)
            for lab in labels if lab not in best_of and lab != START_LABEL
        ]
    return res


def regulariser_text(info: dict[str, Any]) -> str:
    """A row's regulariser for tables: `name @ lambda, placement`, `none (lambda 0)`, or `-`."""
    if not info or info.get("name") == "untrained":
        return "-"
    coef = info.get("effective_coef", info.get("coef"))
    if coef == 0:
        return "none (lambda 0)"
    name = "map" if info.get("map") else str(info.get("name", "?"))
    c = f" @ {coef:g}" if isinstance(coef, int | float) else ""
    anchor = f", lagged anchor / {info.get('anchor_every')} steps" if info.get("anchor") == "lagged" else ""
    return f"{name}{c}, {info.get('placement', 'loss')}{anchor}"


def results_table(result: CompareResult) -> Any:
    """A rich Table: per method mean +- std of metric and length, and the paired test vs baseline."""
    from rich.table import Table

    comps = {c.method: c for c in result.comparisons}
    best = {c.method: c for c in result.vs_best}
    t = Table(
        title=f"{result.metric_name} on {result.split} (mean +- std over seeds; paired vs {result.baseline})"
    )
    cols = ["method", "regulariser", "seeds", result.metric_name, "length (tokens)", "diff vs base", "p (t)",
            "p (sign-flip)", "verdict"]
    if result.best_baseline:
        cols.append(f"vs best baseline ({result.best_baseline})")
    for col in cols:
        t.add_column(col, justify="left" if col in ("method", "regulariser", "verdict") else "right")
    for m in result.methods:
        c = comps.get(m.label)
        row = [
            m.label,
            regulariser_text(m.divergence),
            str(len(m.seeds)),
            f"{fmt(m.metric_mean)} +- {fmt(m.metric_std)}",
            f"{fmt(m.length_mean, 1)} +- {fmt(m.length_std, 1)}",
        ]
        if c is None:
            row += ["(baseline)", "", "", ""]
        else:
            row += [f"{c.mean_diff:+.3f} +- {fmt(c.stderr)}", fmt(c.t_pvalue), fmt(c.perm_pvalue),
                    c.verdict]
        if result.best_baseline:
            b = best.get(m.label)
            row.append("" if b is None else f"{b.mean_diff:+.3f} +- {fmt(b.stderr)} (p {fmt(b.t_pvalue)})")
        t.add_row(*row)
    return t


def method_slug(label: str) -> str:
    """A method label as a metric-key segment: `KL (k3)` -> `kl-k3`, `no regulariser (lambda 0)` ->
    `no-regulariser-lambda-0`, so the parent's keys share names across methods."""
    return re.sub(r"[^a-z0-9.]+", "-", label.lower()).strip("-") or "method"


def summary_rows(result: CompareResult) -> list[dict[str, Any]]:
    """One row per method: mean, std, seeds, the paired difference vs the baseline with its p-values
    and verdict (None on the baseline's row). A pure function of the result: the terminal, the
    Markdown description and MLflow's sortable table render it."""
    comps = {c.method: c for c in result.comparisons}
    rows = []
    for m in result.methods:
        c = comps.get(m.label)
        rows.append({"method": m.label, "slug": method_slug(m.label),
                     "regulariser": regulariser_text(m.divergence), "seeds": len(m.seeds),
                     f"{result.metric_name}_mean": m.metric_mean, f"{result.metric_name}_std": m.metric_std,
                     "length_mean": m.length_mean,
                     "diff_vs_baseline": None if c is None else c.mean_diff,
                     "diff_stderr": None if c is None else c.stderr,
                     "p_t": None if c is None else c.t_pvalue,
                     "p_sign_flip": None if c is None else c.perm_pvalue,
                     "verdict": "(baseline)" if c is None else c.verdict})
    return rows


def results_markdown(result: CompareResult) -> str:
    """The results table with its verdicts in Markdown (the compare parent run's description in
    MLflow's UI, where a text artifact is cut off)."""
    name = result.metric_name
    lines = [f"**{name} on {result.split}**, mean +- std over seeds; paired vs "
             f"`{result.baseline}` (same seed = same pair)", "",
             f"| method | regulariser | seeds | {name} | diff vs base | p (t) | p (sign-flip) "
             "| verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary_rows(result):
        tail = ("(baseline) | | | |" if r["diff_vs_baseline"] is None else
                f"{r['diff_vs_baseline']:+.3f} +- {fmt(r['diff_stderr'])} | {fmt(r['p_t'])} | "
                f"{fmt(r['p_sign_flip'])} | {r['verdict']} |")
        lines.append(f"| {r['method']} | {r['regulariser']} | {r['seeds']} | "
                     f"{fmt(r[f'{name}_mean'])} +- {fmt(r[f'{name}_std'])} | {tail}")
    return "\n".join(lines)


def results_text(result: CompareResult, width: int = 220) -> str:
    """The results table rendered as plain text (for logs, MLflow and files)."""
    import io

    from rich.console import Console

    con = Console(width=width, record=True, file=io.StringIO())
    con.print(results_table(result))
    return con.export_text()


# --------------------------------------------------------------------------- divergences


def compare_methods(cfg: Any) -> list[Any]:
    """The methods of `cfg.compare`, or the single `cfg.divergence` (labelled by name) when empty;
    with `compare.baselines: standard` the standard rows come first, with fixed labels: `lambda 0`,
    `KL k1 in reward`, `KL k2 in loss`, `KL k3 in loss`, the KL rows at `compare.baseline_coef`
    (`config.standard_baselines`; the untrained start is `run_compare`'s own row)."""
    user = list(cfg.compare.methods) if cfg.compare.methods else [
        MethodConfig(label=cfg.divergence.name, divergence=cfg.divergence)]
    if cfg.compare.baselines == "standard":
        return standard_baselines(cfg.compare.baseline_coef) + user
    return user


# --------------------------------------------------------------------------- MLflow


class CompareTracker:
    """MLflow logging of a comparison: a parent run, a child run per (method, seed), through the
    shared `MlflowSession` (the same store and experiment as searches)."""

    def __init__(self, cfg: Any, enabled: bool = True) -> None:
        self.enabled = enabled and bool(cfg.tracking.enabled)
        self.parent_run_id: str | None = None
        self.samples_index: list[dict[str, Any]] = []  # (method, seed) -> child run, its tables
        if self.enabled:
            self.session = MlflowSession(cfg.tracking, cfg.name)

    def start(self, cfg: Any, kind: str = "compare", run_name: str | None = None) -> str | None:
        """Create the parent run with the config and run record."""
        if not self.enabled:
            return None
        self.parent_run_id = self.session.create_run(
            run_name or f"{cfg.name}-{kind}",
            {"mirrorlab.kind": kind, "mirrorlab.task": cfg.task.name, "mirrorlab.split": cfg.compare.split})
        self.session.log_config(self.parent_run_id, cfg)
        return self.parent_run_id

    def log_run(self, r: RunResult, divergence: dict[str, Any], split: str, metric_name: str,
                samples: dict[str, list[dict[str, Any]]] | None = None,
                same_as: str | None = None) -> str | None:
        """One child run: params, the evaluation, the training curve, the completion samples
        (tables `completions/<name>.json`). `same_as`: the method whose identical run (same
        regulariser, same seed) this row reuses."""
        if not self.enabled:
            return None
        s = self.session
        tags = {"mirrorlab.kind": "compare-run", "mirrorlab.method": r.method, "mirrorlab.seed": str(r.seed),
                "mirrorlab.compare_run": self.parent_run_id or ""}
        if same_as is not None:
            tags["mirrorlab.same_as"] = same_as
        if isinstance(divergence.get("map"), str) and divergence["map"].startswith(URI_SCHEMES):
            tags["mirrorlab.map_uri"] = divergence["map"]  # a registered (searched) map
        rid = s.create_run(f"{r.method}-s{r.seed}", tags, self.parent_run_id, start_time=r.started_at)
        s.log_params(rid, {"method": r.method, "seed": str(r.seed), "split": split,
                           **{f"divergence.{k}": v for k, v in divergence.items()}})
        s.log_metrics(rid, {f"{split}_{metric_name}": r.metric, f"{split}_stderr": r.stderr,
                            f"{split}_mean_length": r.mean_length, "wall_s": r.wall_s}, curve=r.curve)
        tables = s.log_samples(rid, samples)
        self.samples_index.append({"method": r.method, "seed": r.seed, "run_id": rid, "tables": tables})
        s.end_run(rid, end_time=r.ended_at)
        return rid

    def finish(self, result: CompareResult | None, files: list[Path], status: str = "FINISHED") -> None:
        """Summary metrics per method, the results JSON/table/plots as artifacts; close the run."""
        if not self.enabled or self.parent_run_id is None:
            return
        if result is not None:
            # one key per statistic, the method's slug after the slash: MLflow's charts group the
            # methods of a statistic in one section (`accuracy_mean/kl-k3`, `accuracy_mean/probl2`)
            ms: dict[str, float | None] = {}
            slug = {m.label: method_slug(m.label) for m in result.methods}
            for m in result.methods:
                ms.update({f"{result.metric_name}_mean/{slug[m.label]}": m.metric_mean,
                           f"{result.metric_name}_std/{slug[m.label]}": m.metric_std,
                           f"length_mean/{slug[m.label]}": m.length_mean})
            for c in result.comparisons:
                ms.update({f"diff_vs_baseline/{slug[c.method]}": c.mean_diff,
                           f"p_t/{slug[c.method]}": c.t_pvalue})
            for c in result.vs_best:
                ms.update({f"diff_vs_best_baseline/{slug[c.method]}": c.mean_diff,
                           f"p_t_vs_best/{slug[c.method]}": c.t_pvalue})
            self.session.log_metrics(self.parent_run_id, ms)
            self.session.log_table(self.parent_run_id, summary_rows(result), "summary.json")
            self._write_back(result)
            self.session.client.set_tag(self.parent_run_id, "mlflow.note.content", results_markdown(result))
            # how many (method, seed) runs came from the journal of an interrupted compare, not trained here
            self.session.client.set_tag(self.parent_run_id, "mirrorlab.resumed_runs",
                                        str(result.meta.get("resumed_runs", 0)))
        if self.samples_index:  # where each (method, seed)'s completion tables are (its child run)
            with tempfile.TemporaryDirectory() as d:
                f = Path(d) / "completions_index.json"
                f.write_text(json.dumps(self.samples_index, indent=2))
                self.session.log_files(self.parent_run_id, [f])
        self.session.log_files(self.parent_run_id, files)
        self.session.end_run(self.parent_run_id, status)


    def _write_back(self, result: CompareResult) -> None:
        """On the registry version of every compared map that came from the registry (`models:/`),
        the compare's verdict: difference vs the baseline, p, the compare run and split, and a line
        appended to the version's description. A registry failure is a tag on the compare run."""
        comps = {c.method: c for c in result.comparisons}
        client = self.session.client
        for m in result.methods:
            uri = m.divergence.get("map")
            if not (isinstance(uri, str) and uri.startswith("models:/")):
                continue
            try:
                name, _, ver = uri.removeprefix("models:/").partition("/")
                if "@" in name:
                    name, alias = name.split("@", 1)
                    ver = client.get_model_version_by_alias(name, alias).version
                c = comps.get(m.label)
                key = f"mirrorlab.compare.{self.parent_run_id}"
                tags = {f"{key}.method": m.label, f"{key}.split": result.split,
                        f"{key}.{result.metric_name}_mean": fmt(m.metric_mean),
                        "mirrorlab.last_compare_run": str(self.parent_run_id)}
                if c is not None:
                    tags.update({f"{key}.baseline": c.baseline,
                                 f"{key}.diff_vs_baseline": f"{c.mean_diff:+.4f}",
                                 f"{key}.p_t": fmt(c.t_pvalue), f"{key}.verdict": c.verdict})
                for k, v in tags.items():
                    client.set_model_version_tag(name, ver, k, v)
                mv = client.get_model_version(name, ver)
                line = (f"Compare run {self.parent_run_id} ({result.split}, {len(m.seeds)} seeds): "
                        f"{result.metric_name} {fmt(m.metric_mean)} +- {fmt(m.metric_std)}")
                if c is not None:
                    line += f"; vs {c.baseline} {c.mean_diff:+.4f} (p {fmt(c.t_pvalue)}): {c.verdict}"
                desc = f"{mv.description or ''}\n\n{line}.".strip()
                client.update_model_version(name, ver, description=desc)
            except Exception as e:  # noqa: BLE001 - the comparison itself is done and logged
                client.set_tag(self.parent_run_id, "mirrorlab.registry_error", f"{uri}: {e}"[:500])


def plain_curve(curve: list[dict[str, Any]]) -> list[dict[str, float]]:
    """A trainer's history as numeric rows (booleans and non-numbers dropped), each with a step."""
    out = []
    for i, row in enumerate(curve):
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


def train_arm(trainer: Any, reg: Any, split: str, eval_size: int | None, start: bool,
              callbacks: list[Any] = ()) -> dict[str, Any]:
    """One (method, seed) run on a trainer already reset to its seed: the untrained start first when
    `start`, then the regulariser, training and evaluation on `split`. Plain data, so the in-process
    loop and the worker path (`CompareEvaluator`) log it the same way (`_log_arm`)."""
    t0, w0 = time.perf_counter(), time.time()
    out: dict[str, Any] = {"start": None, "metric_name": trainer.task.metric_name}
    if start:
        ev = trainer.evaluate(split, n=eval_size)
        out["start"] = {"metric": float(ev.metric), "stderr": float(ev.stderr),
                        "mean_length": float(ev.mean_length), "n": int(ev.n),
                        "reward_errors": ev.reward_errors,
                        "wall_s": time.perf_counter() - t0, "samples": sample_tables([], ev, split),
                        "started_at": w0, "ended_at": time.time()}
        t0, w0 = time.perf_counter(), time.time()
    trainer.set_regulariser(reg)
    curve = trainer.train(callbacks=list(callbacks))
    ev = trainer.evaluate(split, n=eval_size)
    out.update(metric=float(ev.metric), stderr=float(ev.stderr), mean_length=float(ev.mean_length),
               n=int(ev.n), reward_errors=ev.reward_errors, wall_s=time.perf_counter() - t0,
               curve=plain_curve(curve),
               samples=sample_tables(curve, ev, split), started_at=w0, ended_at=time.time())
    return out


def compare_settings(cfg: Any) -> str:
    """Digest of what a (method, seed) run depends on besides its regulariser and seed (model, task,
    training settings but the seed, split, evaluation size, the start row): a journalled run is
    reused on resume only under the same settings. Left out: the seed (a run's own), and
    `share_trunk`, which changes the time, not one bit of the run (tests/test_gbmpo.py)."""
    train = cfg.train.model_dump(mode="json")
    for name in ("seed", "share_trunk"):
        train.pop(name, None)
    key = {"model": cfg.model.model_dump(mode="json"), "task": cfg.task.model_dump(mode="json"),
           "train": train, "split": cfg.compare.split, "eval_size": cfg.compare.eval_size,
           "start": cfg.compare.start_row}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class CompareJournal:
    """The finished (arm, seed) runs of a comparison, one fsynced line each (`compare.journal.jsonl`
    beside results.json), written as each run returns, from the in-process loop or a worker. A
    killed compare keeps them, and `mirrorlab compare --resume` trains only the rest: an entry is
    reused when its regulariser (`arm_key`: the divergence, its map's path and sha), seed and
    settings (`compare_settings`) are those of this comparison."""

    def __init__(self, path: Path | None, cfg: Any, resume: bool = False) -> None:
        self.path, self.settings = path, compare_settings(cfg)
        self.done: dict[str, dict[str, Any]] = {}
        self.stale = 0
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if not resume:
            path.unlink(missing_ok=True)
        for key, e in read_journal(path).items():
            if e.get("settings") == self.settings:
                self.done[key] = e["arm"]
            else:
                self.stale += 1
        if self.stale:
            log.warning("%s: %d finished runs were made under other settings (model, task, train, split "
                        "or eval size changed) and are run again", path, self.stale)

    @staticmethod
    def key(arm_key: str, seed: int) -> str:
        """Journal key of one run: a digest of its regulariser's record and the seed."""
        return f"{hashlib.sha256(arm_key.encode()).hexdigest()[:16]}:{seed}"

    def get(self, arm_key: str, seed: int, need_start: bool = False) -> dict[str, Any] | None:
        """The journalled run of this regulariser on `seed` (as `train_arm` returned it), or None;
        with `need_start`, None unless it also measured the untrained start (the first method's run
        does: a resume with the methods reordered trains the new first one again)."""
        arm = self.done.get(self.key(arm_key, seed))
        return None if arm is None or (need_start and arm.get("start") is None) else arm

    def add(self, arm_key: str, seed: int, label: str, arm: dict[str, Any]) -> None:
        """Record a finished run (fsynced before this returns)."""
        key = self.key(arm_key, seed)
        self.done[key] = arm
        if self.path is not None:
            append_journal(self.path, {"key": key, "method": label, "seed": seed,
                                       "settings": self.settings, "arm": jsonable(arm)})


class CompareEvaluator:
    """One (method, seed) run of a comparison in a worker process (`compare.workers` > 1): the same
    reset -> regulariser -> train -> evaluate as the in-process loop, on a trainer built once per
    worker. `job.candidate` is the method's index, `job.seed` the seed; `job.measure["start"]` also
    evaluates the untrained start first (returned in `extra`)."""

    def __init__(self, cfg: Any, map_refs: dict[str, str] | None = None) -> None:
        self.cfg, self.map_refs = cfg, map_refs
        self.trainer: Any = None
        self.regs: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "map_refs": self.map_refs, "trainer": None, "regs": {}}

    def setup(self) -> None:
        """Build every method's regulariser and the trainer (heavy; once per worker)."""
        uri = self.cfg.tracking.tracking_uri
        self.methods = compare_methods(self.cfg)
        self.regs = {m.label: build_divergence(m.divergence, map_refs=self.map_refs, tracking_uri=uri)
                     for m in self.methods}
        self.trainer = build_trainer(self.cfg, self.regs[self.methods[0].label])

    def evaluate(self, job: Job) -> dict[str, Any]:
        """Train method `job.candidate` on seed `job.seed`; evaluate on `compare.split`."""
        c = self.cfg.compare
        self.trainer.reset(seed=job.seed)
        arm = train_arm(self.trainer, self.regs[self.methods[job.candidate].label], c.split, c.eval_size,
                        bool(job.measure.get("start")))
        return {"fitness": arm["metric"], "extra": {"arm": arm}}


def _run_in_workers(cfg: Any, methods: list[Any], arm_key: dict[str, str], map_refs: dict[str, str] | None,
                    prog: Any, journal: CompareJournal) -> None:
    """Every distinct (arm, seed) run of the comparison not in `journal`, on `compare.workers` worker
    processes, each journalled as it returns; then a failed run raises (a comparison has no failure
    policy: a missing cell would bias the table; `--resume` re-runs only the missing ones)."""
    jobs, seen = [], set()
    for seed in cfg.compare.seeds:
        for i, m in enumerate(methods):
            start = cfg.compare.start_row and i == 0
            if (arm_key[m.label], seed) in seen or journal.get(arm_key[m.label], seed, start) is not None:
                continue
            seen.add((arm_key[m.label], seed))
            jobs.append(Job(0, len(jobs), np.zeros(1), seed, candidate=i,
                            measure={"start": start}))
    if not jobs:
        return
    w = cfg.compare.workers
    task = prog.add_task("runs (workers)", total=len(jobs), info="") if prog is not None else None

    def done(job: Job, out: Outcome) -> None:
        m = methods[job.candidate]
        if out.status == FINISHED:
            journal.add(arm_key[m.label], job.seed, m.label, out.extra["arm"])
        if prog is not None:
            info = f"last: {m.label} s{job.seed}"
            tail = f" {out.fitness:.3f}" if out.status == FINISHED else " FAILED"
            prog.update(task, advance=1, info=info + tail)

    ex = make_executor("process", CompareEvaluator(cfg, map_refs), workers=w,
                       cpus_per_worker=max(1, cfg.threads // w))
    ex.launch()
    try:
        outs = ex.map(jobs, on_result=done)
    finally:
        ex.close()
    bad = [(methods[j.candidate].label, j.seed, o.error) for j, o in zip(jobs, outs, strict=True)
           if o.status != FINISHED]
    if bad:
        raise RuntimeError(f"{len(bad)} compare runs failed (the {len(jobs) - len(bad)} finished ones are "
                           f"journalled: `--resume` runs only the failed ones again): {bad[:3]}")


@dataclass(frozen=True)
class ComparePlan:
    """What a comparison runs, decided before any training: the methods and row labels, the
    baseline row, each method's regulariser and what is recorded of it (`div_info`), and the key
    under which methods with the same regulariser share one run per seed."""

    methods: list[Any]
    labels: list[str]
    baseline: str
    regs: dict[str, Any]
    div_info: dict[str, dict[str, Any]]
    arm_key: dict[str, str]

    @property
    def divergences(self) -> dict[str, Any]:
        """The divergence of each method by label."""
        return {label: r.divergence for label, r in self.regs.items()}


def plan_compare(cfg: Any, map_refs: dict[str, str] | None = None,
                 map_uris: dict[str, str] | None = None) -> ComparePlan:
    """The `ComparePlan` of `cfg.compare`: builds every method's regulariser (maps resolved, the
    registry URI recorded beside the local file it was read from)."""
    methods = compare_methods(cfg)
    with_start = cfg.compare.start_row
    labels = ([START_LABEL] if with_start else []) + [m.label for m in methods]
    uri = cfg.tracking.tracking_uri
    regs = {m.label: build_divergence(m.divergence, map_refs=map_refs, tracking_uri=uri) for m in methods}
    div_info = {}
    for m in methods:
        info = m.divergence.model_dump(mode="json")
        if m.divergence.map is not None and map_refs and m.divergence.map in map_refs:
            info["map"] = map_refs[m.divergence.map]
            reg_uri = (map_uris or {}).get(m.divergence.map)
            if reg_uri:  # the registry URI a user can load anywhere; the local file it was read from too
                info["map"], info["map_path"] = reg_uri, map_refs[m.divergence.map]
        sha = getattr(regs[m.label].divergence, "sha", None)
        if isinstance(sha, str):
            info["sha"] = sha
        info["effective_coef"] = regs[m.label].coef  # a saved mixture map carries its searched lambda
        div_info[m.label] = info
    if with_start:
        div_info[START_LABEL] = {"name": "untrained", "coef": None, "steps": 0}
    # arms with the same regulariser train identically on a seed (reset(seed) restores everything):
    # such a row reuses the first one's run (its child run is tagged mirrorlab.same_as)
    arm_key = {m.label: json.dumps(div_info[m.label], sort_keys=True, default=str) for m in methods}
    return ComparePlan(methods, labels, cfg.compare.baseline or labels[0], regs, div_info, arm_key)


def run_compare(
    cfg: Any,
    out_dir: str | Path | None = None,
    console: Any = None,
    map_refs: dict[str, str] | None = None,
    progress: bool = True,
    map_uris: dict[str, str] | None = None,
    resume: bool = False,
) -> CompareResult:
    """Train every method on every seed (same settings otherwise), evaluate on `compare.split`.

    Three steps: `plan_compare` (methods, regularisers, shared runs), `_run_arms` (one trainer
    built once and reused: `reset(seed)` restores the starting weights and a fresh optimiser,
    `set_regulariser` swaps the regulariser; or `compare.workers` processes), then `summarise`
    (pure: the table, paired tests and verdicts) and `_write_outputs`. Writes `results.json`,
    `table.txt` and the PNGs into `out_dir` and logs everything to MLflow: a parent run, a child
    run per (method, seed) with its completion tables, and `completions_index.json` on the parent
    saying which child holds which tables. Each finished run is journalled in `out_dir` as it
    returns (`CompareJournal`); with `resume`, the journalled runs are reused, not trained again.
    """
    t_start = time.perf_counter()
    plan = plan_compare(cfg, map_refs, map_uris)
    journal = CompareJournal(Path(out_dir) / JOURNAL if out_dir is not None else None, cfg, resume)
    first = plan.methods[0] if cfg.compare.start_row else None  # its run must hold the start
    resumed = len({(plan.arm_key[m.label], s) for m in plan.methods for s in cfg.compare.seeds
                   if journal.get(plan.arm_key[m.label], s, m is first) is not None})  # as _run_arms reuses
    tracker = CompareTracker(cfg)
    tracker.start(cfg)
    status = "FAILED"
    prog = progress_bars(console) if progress else None
    try:
        if prog is not None:
            prog.start()
        runs, metric_name = _run_arms(cfg, plan, tracker, prog, map_refs, journal)
        status = "FINISHED"
    finally:
        if prog is not None:
            prog.stop()
        if status != "FINISHED":
            tracker.finish(None, [], status="FAILED")
    std = [lab for lab, _ in STANDARD_BASELINES] if cfg.compare.baselines == "standard" else None
    result = summarise(runs, plan.labels, plan.baseline, metric_name, cfg.compare.split, plan.div_info,
                       best_of=std)
    result.wall_s = time.perf_counter() - t_start
    result.meta = {"seeds": list(cfg.compare.seeds), "steps": cfg.train.steps, "lr": cfg.train.optim.lr,
                   "task": cfg.task.name, "model": cfg.model.name, "eval_size": cfg.compare.eval_size,
                   "baselines": cfg.compare.baselines, "baseline_coef": cfg.compare.baseline_coef,
                   "mlflow_run_id": tracker.parent_run_id, "resumed_runs": resumed}
    files = _write_outputs(result, out_dir, plan) if out_dir is not None else []
    tracker.finish(result, files)
    return result


def _run_arms(cfg: Any, plan: ComparePlan, tracker: CompareTracker, prog: Any,
              map_refs: dict[str, str] | None, journal: CompareJournal) -> tuple[list[RunResult], str]:
    """Every (method, seed) run of `plan` not in `journal`, journalled as it returns and logged to
    MLflow in plan order (with `compare.workers` > 1: once every worker run is back; a killed
    compare keeps the journal, not the MLflow runs); a method sharing an earlier one's regulariser
    reuses its run. Returns the runs (start rows included) and the metric's name."""
    methods, split = plan.methods, cfg.compare.split
    with_start = cfg.compare.start_row
    done: dict[tuple[str, int], tuple[RunResult, dict[str, Any]]] = {}
    runs: list[RunResult] = []
    trainer = None
    metric_name = "metric"
    if cfg.compare.workers > 1:
        _run_in_workers(cfg, methods, plan.arm_key, map_refs, prog, journal)
    runs_task = (prog.add_task("runs", total=len(methods) * len(cfg.compare.seeds), info="")
                 if prog is not None else None)
    for seed in cfg.compare.seeds:
        for m in methods:
            prev = done.get((plan.arm_key[m.label], seed))
            if prev is not None:
                r = replace(prev[0], method=m.label, wall_s=0.0, curve=list(prev[0].curve), run_id=None)
                r.run_id = tracker.log_run(r, plan.div_info[m.label], split, metric_name, prev[1],
                                           same_as=prev[0].method)
                runs.append(r)
                if prog is not None:
                    prog.update(runs_task, advance=1,
                                info=f"last: {m.label} s{seed} (same as {prev[0].method})")
                continue
            # trained in a worker, or before a resume
            arm = journal.get(plan.arm_key[m.label], seed, with_start and m is methods[0])
            if arm is None:
                run_cfg = cfg.model_copy(deep=True)
                run_cfg.train.seed = seed
                run_cfg.divergence = m.divergence
                if trainer is None:
                    trainer = build_trainer(run_cfg, plan.regs[m.label])
                else:
                    trainer.reset(seed=seed)
                bar = (TrainProgress(cfg.train.steps, f"{m.label} seed {seed}", progress=prog)
                       if prog is not None else None)
                arm = train_arm(trainer, plan.regs[m.label], split, cfg.compare.eval_size,
                                with_start and m is methods[0], [bar] if bar is not None else [])
                if bar is not None:
                    bar.close()
                journal.add(plan.arm_key[m.label], seed, m.label, arm)
            metric_name = arm["metric_name"]
            st = arm["start"] if with_start and m is methods[0] else None  # (a journalled run may hold one)
            if st is not None:  # the start, on this seed's eval
                r = RunResult(START_LABEL, seed, st["metric"], st["stderr"], st["mean_length"], st["n"],
                              st["wall_s"], [], started_at=st.get("started_at"), ended_at=st.get("ended_at"))
                r.run_id = tracker.log_run(r, plan.div_info[START_LABEL], split, metric_name, st["samples"])
                runs.append(r)
            r = RunResult(m.label, seed, arm["metric"], arm["stderr"], arm["mean_length"], arm["n"],
                          arm["wall_s"], arm["curve"], started_at=arm.get("started_at"),
                          ended_at=arm.get("ended_at"))
            r.run_id = tracker.log_run(r, plan.div_info[m.label], split, metric_name, arm["samples"])
            done[(plan.arm_key[m.label], seed)] = (r, arm["samples"])
            runs.append(r)
            if prog is not None:
                prog.update(runs_task, advance=1,
                            info=f"last: {m.label} s{seed} {metric_name}={r.metric:.3f}")
    return runs, metric_name


def _write_outputs(result: CompareResult, out_dir: str | Path, plan: ComparePlan) -> list[Path]:
    """results.json, table.txt, the plots and the compared maps into `out_dir`; the files written."""
    d = Path(out_dir)
    files = [result.save(d / "results.json")]
    (d / "table.txt").write_text(results_text(result))
    files.append(d / "table.txt")
    files += write_plots(result, d)
    try:  # the regularisers compared, as mirror maps (those with a potential)
        pot = {lab: dv for lab, dv in plan.divergences.items() if isinstance(dv, PotentialMixin)}
        if pot:
            files.append(divergences.plot_maps(pot, d / "maps.png"))
    except Exception as e:  # noqa: BLE001 - a plot must never lose a finished comparison
        result.meta["maps_plot_error"] = str(e)
    return files


def log_single_run(
    cfg: Any, kind: str, run_name: str, params: dict[str, Any], metrics: dict[str, float],
    curve: list[dict[str, float]] | None = None, files: list[Path] | None = None,
    samples: dict[str, list[dict[str, Any]]] | None = None,
    description: str | None = None,
) -> str | None:
    """Log one finished run (train or eval) to MLflow: params, metrics, curve, files, config,
    completion samples (`gbmpo.sample_tables`) as tables `completions/<name>.json`, and a Markdown
    `description` (the run page's first screen; default: its metrics as a table)."""
    if not cfg.tracking.enabled:
        return None
    s = MlflowSession(cfg.tracking, cfg.name)
    rid = s.create_run(run_name, {"mirrorlab.kind": kind, "mirrorlab.task": cfg.task.name})
    s.log_params(rid, params)
    s.log_metrics(rid, metrics, curve=curve)
    s.log_samples(rid, samples)
    s.log_config(rid, cfg)
    s.log_files(rid, files or [])
    if description is None:
        rows = [f"| {k} | {fmt(v, 4)} |" for k, v in metrics.items()]
        description = "\n".join([f"**{kind}** `{run_name}` ({cfg.model.name} on {cfg.task.name})", "",
                                  "| metric | value |", "|---|---|", *rows])
    s.client.set_tag(rid, "mlflow.note.content", description)
    s.end_run(rid)
    return rid

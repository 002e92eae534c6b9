"""The `mirrorlab` command: train, search, eval, compare, maps, and run (search then compare).

Every subcommand reads an optional YAML config plus repeated `--set a.b=c` overrides through
`mirrorlab.config.load_config`, then checks everything it can without training (registered
names, task construction and its disjoint splits, divergence parameters, map files) so a bad
config exits with status 2 and a message naming the problem before any model is loaded.
Results go to `<output_dir>/<name>/<command>/` and to MLflow.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table

from mirrorlab import compare, divergences, maps, plots, tasks
from mirrorlab.config import Config, ConfigError, config_reference, dump_config, field_rows, load_config
from mirrorlab.gbmpo import build_trainer, sample_tables
from mirrorlab.journal import CheckpointError
from mirrorlab.probe import Probe
from mirrorlab.progress import SearchProgress, TrainProgress
from mirrorlab.repro import run_record
from mirrorlab.search import Search
from mirrorlab.spaces import NeuralSpace
from mirrorlab.tracking import MLflowTracker, resolve_tracking_uri
from mirrorlab.values import fmt, jsonable

EXIT_CONFIG = 2
BEST_MAP_REF = "search:best"

# Tables stay readable when piped (rich would otherwise wrap them at 80 columns).
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


# --------------------------------------------------------------------------- helpers
def run_dir(cfg: Config, command: str) -> Path:
    """Where a command writes its results: `<output_dir>/<name>/<command>/`."""
    d = Path(cfg.output_dir) / cfg.name / command
    d.mkdir(parents=True, exist_ok=True)
    return d


MIN_FREE_MB = 50.0  # results, checkpoints and MLflow artifacts of a run stay well below this


def check_writable(path: Path, field: str, min_free_mb: float = MIN_FREE_MB) -> None:
    """Fail before any training if directory `path` cannot take a run's outputs: not writable (a
    read-only file system, no permission) or nearly full. Probes the nearest existing directory
    on the way to `path` with a small file it removes again, so a refused run leaves nothing
    behind. The message names the config field and the path."""
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        if not base.is_dir():
            raise NotADirectoryError(20, "not a directory")
        probe = base / f".mirrorlab-write-probe-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{field}: cannot write to {path} ({e.strerror or e} at {base}); choose a "
                          f"writable directory") from None
    free_mb = shutil.disk_usage(base).free / 2**20
    if free_mb < min_free_mb:
        raise ConfigError(f"{field}: only {free_mb:.1f} MB free at {path} (a run needs at least "
                          f"{min_free_mb:.0f} MB); free space or choose another directory")


def preflight(cfg: Config, command: str, allow_refs: tuple[str, ...] = ()) -> None:
    """Check what can be checked without training; raise ConfigError naming the field.

    Checks that the output directory and the sqlite MLflow store can be written, builds the task
    (which refuses overlapping splits) and every divergence the command will use (unknown
    parameters, unreadable map files), and checks split names.
    """
    try:
        task = tasks.get(cfg.task.name, **cfg.task.params)
    except Exception as e:  # noqa: BLE001 - any construction failure is a config problem here
        raise ConfigError(f"task ({cfg.task.name}, task.params={cfg.task.params}): {e}") from None
    if command in ("train", "eval", "search"):
        need = ["train", "val"] if command != "eval" else []
        for s in need:
            if not task.split(s):
                raise ConfigError(f"task.params: split {s!r} of task {cfg.task.name!r} is empty")
    divs: list[tuple[str, Any]] = []
    if command in ("train", "eval"):
        divs.append(("divergence", cfg.divergence))
    if command in ("compare", "run"):
        for i, m in enumerate(compare.compare_methods(cfg)):
            divs.append((f"compare.methods.{i} ({m.label}).divergence", m.divergence))
        if cfg.compare.methods and not task.split(cfg.compare.split):
            raise ConfigError(
                f"compare.split: split {cfg.compare.split!r} of task {cfg.task.name!r} is empty")
    for where, d in divs:
        if d.map is not None and d.map in allow_refs:
            continue
        try:
            maps.resolve(d, tracking_uri=cfg.tracking.tracking_uri)
        except Exception as e:  # noqa: BLE001
            extra = f" ({where}.params = {d.params})" if d.params and d.map is None else ""
            raise ConfigError(f"{where}: {e}{extra}") from None
    check_writable(Path(cfg.output_dir).resolve(), "output_dir")
    if command in ("search", "run") and cfg.search.checkpoint_dir is not None:
        check_writable(Path(cfg.search.checkpoint_dir).resolve(), "search.checkpoint_dir")
    if cfg.tracking.enabled:
        uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
        if uri.startswith("sqlite:///"):
            check_writable(Path(uri.removeprefix("sqlite:///")).parent, "tracking.tracking_uri")


def _load(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None), getattr(args, "set", None) or [])


def _save_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(data, strict=True), indent=2, default=str))
    return path


def _eval_table(title: str, metric_name: str, ev: Any, split: str) -> Table:
    t = Table(title=title)
    extra = dict(getattr(ev, "extra", {}) or {})  # e.g. GSM8K's strict and flexible readings
    for c in ("split", "n", metric_name, "stderr", "mean length", *extra):
        t.add_column(c, justify="right")
    t.add_row(split, str(ev.n), fmt(ev.metric), fmt(ev.stderr), fmt(ev.mean_length, 1),
              *(fmt(v) for v in extra.values()))
    return t


# --------------------------------------------------------------------------- train
def cmd_train(cfg: Config, args: argparse.Namespace) -> int:
    """One GBMPO run: train, evaluate, save the checkpoint, log to MLflow, plot the curves."""
    if args.steps is not None:
        cfg.train.steps = args.steps
    preflight(cfg, "train")
    d = run_dir(cfg, "train")
    (d / "config.yaml").write_text(dump_config(cfg))
    split = args.split or cfg.train.eval_split
    t0 = time.perf_counter()
    reg = maps.build_divergence(cfg.divergence, tracking_uri=cfg.tracking.tracking_uri)
    trainer = build_trainer(cfg, reg)
    with TrainProgress(cfg.train.steps, "train", console=err) as prog:
        history = trainer.train(callbacks=[prog])
    curve = compare.plain_curve(history)
    ev = trainer.evaluate(split, n=args.n or cfg.train.eval_size)
    wall = time.perf_counter() - t0
    metric_name = trainer.task.metric_name
    ckpt = d / "checkpoint"
    if not args.no_save:
        trainer.save_checkpoint(ckpt)
    label = f"{cfg.divergence.name} ({cfg.divergence.coef:g})"
    pngs = [plots.plot_training_curves({label: [[row.get(k, math.nan) for row in curve]]},
                                       d / f"train_{k}.png", ylabel=k, title=f"training {k}")
            for k in _curve_keys(curve)]
    result = {"split": split, "metric_name": metric_name, "metric": ev.metric, "stderr": ev.stderr,
              "extra_metrics": ev.extra,
              "mean_length": ev.mean_length, "n": ev.n, "reward_errors": ev.reward_errors, "wall_s": wall,
              "curve": curve,
              "regulariser": {"divergence": type(reg.divergence).__name__, "coef": reg.coef,
                              "estimator": reg.estimator, "placement": reg.placement,
                              "compiled": bool(cfg.divergence.compile),
                              # the inert-regulariser check (None: lambda 0 or reward placement)
                              "active": trainer.regulariser_active, "probe": trainer.regulariser_probe},
              "run_record": run_record(cfg.train.seed),
              "checkpoint": None if args.no_save else str(ckpt)}
    _save_json(d / "results.json", result)
    rid = compare.log_single_run(
        cfg, "train", f"train-{cfg.divergence.name}-s{cfg.train.seed}",
        {"divergence": cfg.divergence.model_dump(mode="json"), "steps": cfg.train.steps,
         "lr": cfg.train.optim.lr, "seed": cfg.train.seed, "model": cfg.model.name, "split": split},
        {f"{split}_{metric_name}": ev.metric, f"{split}_stderr": ev.stderr,
         f"{split}_mean_length": ev.mean_length, "wall_s": wall, f"{split}_reward_errors": ev.reward_errors,
         **{f"{split}_{metric_name}_{k}": v for k, v in ev.extra.items()},
         **({} if trainer.regulariser_active is None else
            {"regulariser_active": float(trainer.regulariser_active),
             "regulariser_probe": trainer.regulariser_probe})},
        curve, [d / "results.json", *pngs], samples=sample_tables(history, ev, split),
    )
    out.print(_eval_table(f"train: {label}, {cfg.train.steps} steps, {wall:.0f} s", metric_name, ev, split))
    out.print(f"results: {d}" + (f"\nMLflow run: {rid}" if rid else ""))
    return 0


def _curve_keys(curve: list[dict[str, Any]]) -> list[str]:
    keys = [k for k in ("reward_mean", "completion_length", "div_mean", "grad_ratio")
            if any(isinstance(row.get(k), int | float) for row in curve)]
    if not keys and curve:
        keys = [k for k, v in curve[0].items() if k != "step" and isinstance(v, int | float)][:2]
    return keys


# --------------------------------------------------------------------------- eval
def cmd_eval(cfg: Config, args: argparse.Namespace) -> int:
    """Evaluate a model (preset, path) or a saved checkpoint on a task split."""
    preflight(cfg, "eval")
    if args.checkpoint and not Path(args.checkpoint).exists():
        raise ConfigError(f"--checkpoint: {args.checkpoint} does not exist")
    d = run_dir(cfg, "eval")
    t0 = time.perf_counter()
    reg = maps.build_divergence(cfg.divergence, tracking_uri=cfg.tracking.tracking_uri)
    trainer = build_trainer(cfg, reg)
    if args.checkpoint:
        trainer.load_checkpoint(args.checkpoint)
    ev = trainer.evaluate(args.split, n=args.n)
    wall = time.perf_counter() - t0
    metric_name = trainer.task.metric_name
    src = args.checkpoint or cfg.model.name
    _save_json(d / "results.json", {"split": args.split, "metric_name": metric_name, "metric": ev.metric,
                                    "stderr": ev.stderr, "mean_length": ev.mean_length, "n": ev.n,
                                    "reward_errors": ev.reward_errors, "checkpoint": args.checkpoint,
                                    "model": cfg.model.name,
                                    "scores": list(ev.scores), "wall_s": wall, "extra_metrics": ev.extra})
    rid = compare.log_single_run(
        cfg, "eval", f"eval-{args.split}", {"source": src, "split": args.split, "n": ev.n},
        {f"{args.split}_{metric_name}": ev.metric, f"{args.split}_stderr": ev.stderr,
         f"{args.split}_mean_length": ev.mean_length, "wall_s": wall,
         f"{args.split}_reward_errors": ev.reward_errors,
         **{f"{args.split}_{metric_name}_{k}": v for k, v in ev.extra.items()}}, None, [d / "results.json"],
    )
    out.print(_eval_table(f"eval: {src} on {cfg.task.name}", metric_name, ev, args.split))
    out.print(f"results: {d}" + (f"\nMLflow run: {rid}" if rid else ""))
    return 0


def _ui_hint(cfg: Config) -> None:
    """Where to see the runs: the `mlflow ui` command for the store and the link that opens the
    experiment's runs view (MLflow 3 opens experiments in its GenAI view, which looks empty)."""
    if not cfg.tracking.enabled:
        return
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    try:
        from mlflow import MlflowClient

        exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(cfg.tracking.experiment or cfg.name)
    except Exception:  # noqa: BLE001 - a hint must never fail a finished command
        return
    if exp is None:
        return
    serve = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"(server: {uri})"
    out.print(f"MLflow: {serve}, then http://127.0.0.1:5000/#/experiments/{exp.experiment_id}"
              "?workflowType=machine_learning")


# --------------------------------------------------------------------------- search
def cmd_search(cfg: Config, args: argparse.Namespace) -> int:
    """Run (or resume) a search over mirror maps; print the best, save it, plot."""
    preflight(cfg, "search")
    res = _search(cfg, resume=args.resume)
    out.print(res["table"])
    out.print(f"best map: {res['best_ref']} (file: {res['best_map']})\nresults: {res['dir']}")
    _ui_hint(cfg)
    return 0


def _search(cfg: Config, resume: bool) -> dict[str, Any]:
    """Run the search with a live summary, then write plots, the best map and a summary JSON."""
    d = run_dir(cfg, "search")
    if cfg.search.checkpoint_dir is None:
        cfg.search.checkpoint_dir = str(d / "checkpoint")
    (d / "config.yaml").write_text(dump_config(cfg))
    t0 = time.perf_counter()
    search = Search(cfg, report_dir=d)
    with SearchProgress(console=err) as prog:
        search.progress = prog  # the search calls every hook itself
        result = search.run(resume=resume)
    wall = time.perf_counter() - t0
    return search_report(cfg, result, d, wall)


def search_report(cfg: Config, result: Any, d: Path, wall: float) -> dict[str, Any]:
    """`search.json` and the summary tables of a finished search (its best map and plots were
    written into `d` and logged on the parent run by the search itself)."""
    best_dir = result.best_map
    stats = plots.fitness_stats(result.fitness_history())
    summary = {"best_fitness": result.best_fitness, "best_stderr": result.best_stderr,
               "best_id": result.best_id, "confirmed": result.confirmation is not None,
               "confirmation": result.confirmation, "inner_steps_spent": result.inner_steps_spent,
               "paired_against": (cfg.search.evaluator.baseline.model_dump(mode="json")
                                  if cfg.search.evaluator.baseline is not None else None),
               "best_map": best_dir, "registered_uri": result.registered_uri,
               "mlflow_parent_run": result.parent_run_id, "wall_s": wall, "generations": stats,
               "timings": result.timings}
    _save_json(d / "search.json", summary)
    ec = cfg.search.evaluator
    what = (f"fitness = val metric minus {ec.baseline.name}@{ec.baseline.coef:g} on the same seeds"
            if ec.baseline is not None else "fitness = val metric")
    t = Table(title=f"search {cfg.name}: {cfg.search.strategy.name}, {cfg.search.space.kind} space, "
                    f"{ec.seeds} seed(s) per candidate ({wall:.0f} s, "
                    f"{result.inner_steps_spent} inner steps)\n"
                    f"{what}")
    for c in ("generation", "best", "mean", "std", "failed", "incumbent", "incumbent fitness"):
        t.add_column(c, justify="right")
    for s, g in zip(stats, result.history, strict=True):
        t.add_row(str(s["generation"]), fmt(s["best"]), fmt(s["mean"]), fmt(s["std"]), str(s["failures"]),
                  g.incumbent_id or "-", fmt(g.incumbent_fitness))
    tables = [t]
    if result.confirmation is not None:
        c = Table(title=f"confirmation: top {len(result.confirmation['rows'])} re-scored on "
                        f"{len(result.confirmation['seeds'])} fresh seeds")
        for col in ("candidate", "search fitness", "confirmed fitness", "stderr", "chosen"):
            c.add_column(col, justify="right")
        for r in result.confirmation["rows"]:
            c.add_row(r["id"], fmt(r["search_fitness"]), fmt(r["fitness"]), fmt(r["stderr"]),
                      "*" if r["id"] == result.best_id else "")
        tables.append(c)
    best_ref = result.registered_uri or best_dir
    return {"table": Group(*tables), "best_map": best_dir, "best_ref": best_ref, "dir": d,
            "wall_s": wall, "result": result}


# --------------------------------------------------------------------------- probe
def cmd_probe(cfg: Config, args: argparse.Namespace) -> int:
    """Score points of the search space on shared seeds; print signal, noise and the plan."""
    preflight(cfg, "search")
    d = run_dir(cfg, "probe")
    if cfg.probe.checkpoint_dir is None:
        cfg.probe.checkpoint_dir = str(d)
    (d / "config.yaml").write_text(dump_config(cfg))
    probe = Probe(cfg)
    n = len(probe.points) * len(probe.seeds)
    with TrainProgress(n, description="probe jobs", console=err, keys=("fitness",)) as prog:
        probe.progress = _ProbeProgress(prog)
        res = probe.run(resume=args.resume)
    out.print(probe_tables(cfg, res))
    out.print(f"results: {d / 'probe.json'} (plot: {d / 'probe.png'})")
    _ui_hint(cfg)
    return 0


class _ProbeProgress:
    """Adapts the probe's job hook to a progress bar (one tick per finished job)."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def on_job_end(self, done: int, total: int, label: str, fitness: float | None) -> None:
        self.bar.on_step(done, {"fitness": float("nan") if fitness is None else fitness})


def probe_tables(cfg: Config, res: dict[str, Any]) -> Group:
    """The probe's components per measure and its plan, as terminal tables."""
    ec = cfg.search.evaluator
    t = Table(title=f"probe {cfg.name}: {cfg.search.space.kind} space, {res['n_points']} points x "
                    f"{res['n_seeds']} seeds, {ec.inner_steps} inner steps, {res['val_size'] or 'all'} val "
                    f"problems ({res['wall_s']:.0f} s)\nsd of one evaluation; CI at "
                    f"{100 * (1 - cfg.probe.alpha):.0f}%")
    cols = ("measure", "signal sd [CI]", "seed sd", "eval sd", "noise sd", "icc [CI]", "p(all equal)",
            "s / eval", "seeds to resolve signal", "rho vs test (other seeds)")
    for c in cols:
        t.add_column(c, justify="right")
    for name, c in res["components"].items():
        lo, hi = c["signal_sd_ci"]
        rho = c.get("spearman_vs_test_other_seeds")
        t.add_row(name, f"{fmt(c['signal_sd'])} [{fmt(lo)}, {fmt(hi)}]", fmt(c["seed_sd"]), fmt(c["eval_sd"]),
                  fmt(c["noise_sd"]), f"{c['icc']:.2f} [{max(c['icc_ci'][0], 0):.2f}, {c['icc_ci'][1]:.2f}]",
                  f"{c['p_points']:.3f}", f"{c.get('cost_s', float('nan')):.1f}",
                  str(c.get("seeds_to_resolve_signal") or "-"), "-" if rho is None else f"{rho:+.2f}")
    p = res["plan"]
    a = Table(title=f"plan (from {p['from']}): seeds per candidate to detect a difference with "
                    f"{100 * p['power']:.0f}% power")
    for c in ("difference", "val problems x", "noise sd", "seeds per candidate"):
        a.add_column(c, justify="right")
    for r in p["seeds_for_difference"]:
        a.add_row(fmt(r["difference"]), f"{r['val_multiplier']:g}", fmt(r["noise_sd"]),
                  str(r["seeds_per_candidate"]))
    b = Table(title=f"best of n random draws; the confirmation stage ({p['confirm_seeds']} seeds) detects "
                    f"{fmt(p['confirm_detectable_difference'])}\n{p['verdict']}")
    for c in ("budget (inner runs)", "draws x seeds", "expected gain", "oracle gain (noise-free)"):
        b.add_column(c, justify="right")
    for r in p["best_of_n"]:
        b.add_row(str(r["budget_runs"]), f"{r['draws']} x {r['seeds_per_draw']}", fmt(r["expected_gain"]),
                  fmt(r["oracle_gain"]))
    return Group(t, a, b)


# --------------------------------------------------------------------------- compare
def cmd_compare(cfg: Config, args: argparse.Namespace) -> int:
    """Methods x seeds: train each, evaluate on the split, print the table and paired tests."""
    refs, uris = _finished_search_map(cfg)
    preflight(cfg, "compare", allow_refs=tuple(refs))
    d = run_dir(cfg, "compare")
    result = compare.run_compare(cfg, out_dir=d, console=err, map_refs=refs or None, map_uris=uris or None,
                                 resume=args.resume)
    out.print(compare.results_table(result))
    reused = result.meta.get("resumed_runs", 0)
    out.print(f"wall time {result.wall_s:.0f} s; results: {d}"
              + (f" ({reused} runs reused from the journal)" if reused else ""))
    _ui_hint(cfg)
    return 0


def _finished_search_map(cfg: Config) -> tuple[dict[str, str], dict[str, str]]:
    """`map: search:best` in `mirrorlab compare`: the map of this config's finished search
    (`<output_dir>/<name>/search/search.json`, written by `mirrorlab search` or `run`), named by
    its registry URI when it was registered; a clear error when no search has finished."""
    uses = [i for i, m in enumerate(compare.compare_methods(cfg)) if m.divergence.map == BEST_MAP_REF]
    if not uses:
        return {}, {}
    summary = Path(cfg.output_dir) / cfg.name / "search" / "search.json"
    found = json.loads(summary.read_text()) if summary.is_file() else {}
    best = found.get("best_map")
    if not best or not Path(best).exists():
        raise ConfigError(
            f"compare.methods.{uses[0]}.divergence.map: {BEST_MAP_REF!r} is the map a finished search of "
            f"this config found, and there is none ({summary} "
            f"{'names no map' if summary.is_file() else 'does not exist'}): run `mirrorlab run` (search, "
            f"then compare) or `mirrorlab search` first, or name a map file or models:/ URI")
    uri = found.get("registered_uri")
    return {BEST_MAP_REF: str(Path(best).resolve())}, ({BEST_MAP_REF: uri} if uri else {})


# --------------------------------------------------------------------------- run (search -> compare)
def cmd_run(cfg: Config, args: argparse.Namespace) -> int:
    """The main job: a search, then a comparison where `map: search:best` is the map it found."""
    preflight(cfg, "search")
    preflight(cfg, "run", allow_refs=(BEST_MAP_REF,))
    t0 = time.perf_counter()
    res = _search(cfg, resume=args.resume)
    out.print(res["table"])
    d = run_dir(cfg, "compare")
    uris = {BEST_MAP_REF: res["best_ref"]} if str(res["best_ref"]).startswith("models:/") else None
    result = compare.run_compare(cfg, out_dir=d, console=err, map_refs={BEST_MAP_REF: res["best_map"]},
                                 map_uris=uris, resume=args.resume)
    wall = time.perf_counter() - t0
    out.print(compare.results_table(result))
    out.print(f"total wall time {wall:.0f} s (search {res['wall_s']:.0f} s, compare {result.wall_s:.0f} s)")
    out.print(f"results: {Path(cfg.output_dir) / cfg.name}")
    _ui_hint(cfg)
    _save_json(Path(cfg.output_dir) / cfg.name / "run.json",
               {"wall_s": wall, "search_wall_s": res["wall_s"], "compare_wall_s": result.wall_s,
                "best_map": res["best_map"]})
    return 0


def quickstart_config() -> Path:
    """The quickstart config of a source checkout (`experiments/quickstart.yaml`)."""
    p = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
    if not p.is_file():
        raise ConfigError(f"quickstart config not found at {p} (run from a source checkout, "
                          "or `mirrorlab run path/to/quickstart.yaml`)")
    return p


# --------------------------------------------------------------------------- maps
def _map_rows(div: Any) -> list[tuple[str, str]]:
    rows = [("class", type(div).__name__), ("name", str(getattr(div, "name", "?")))]
    sha = getattr(div, "sha", None)
    if isinstance(sha, str):
        rows.append(("sha", sha))
    params = div.params() if hasattr(div, "params") else {}
    if params:
        rows.append(("params", json.dumps(params, default=str)[:300]))
    raw = getattr(div, "raw", None)
    if raw is not None:
        import numpy as np

        r = np.asarray(raw)
        n = (r.size - 2) // 3
        for name, seg in (("v", r[:n]), ("w", r[n:2 * n]), ("b", r[2 * n:3 * n])):
            rows.append((f"raw {name} (min/mean/max)",
                         f"{seg.min():.4g} / {seg.mean():.4g} / {seg.max():.4g}"))
        rows.append(("raw a, c", f"{r[-2]:.4g}, {r[-1]:.4g}"))
    if hasattr(div, "phi_inv"):
        ys = torch.tensor([1e-4, 1e-2, 0.1, 0.5, 1.0], dtype=torch.float64)
        with torch.no_grad():
            ph = div.phi_inv(ys)
        rows.append(("phi_inv at y=1e-4,.01,.1,.5,1", ", ".join(f"{v:.4g}" for v in ph.tolist())))
    lp = torch.log(torch.tensor([0.5, 0.1, 0.9, 0.01], dtype=torch.float64))
    ref = torch.log(torch.tensor([0.4, 0.2, 0.5, 0.02], dtype=torch.float64))
    with torch.no_grad():
        dv = div.sampled(lp, ref)
    rows.append(("D(y||y0) at (.5||.4),(.1||.2),(.9||.5),(.01||.02)",
                 ", ".join(f"{v:.4g}" for v in dv.tolist())))
    return rows


def _read_vector(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"maps import: no such file {path}")
    if path.suffix == ".npy":
        return np.load(path).astype(np.float64).reshape(-1)
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            for k in ("raw", "theta", "params", "parameters"):
                if k in data:
                    data = data[k]
                    break
            else:
                raise ConfigError(f"maps import: {path} has none of the keys raw, theta, params")
        return np.asarray(data, dtype=np.float64).reshape(-1)
    return np.asarray([float(x) for x in text.replace(",", " ").split()], dtype=np.float64)


def cmd_maps(cfg: Config, args: argparse.Namespace) -> int:
    """Show, plot, export, import or register a mirror map."""
    uri = cfg.tracking.tracking_uri
    act = args.maps_command
    if act == "show":
        div = maps.resolve_map_ref(args.ref, uri)
        t = Table(title=f"mirror map {args.ref}", show_header=False)
        t.add_column("field", style="bold")
        t.add_column("value")
        for k, v in _map_rows(div):
            t.add_row(k, v)
        out.print(t)
    elif act == "plot":
        found = {r: maps.resolve_map_ref(r, uri) for r in args.refs}
        p = divergences.plot_maps(found, args.out, baselines=not args.no_baselines)
        out.print(f"wrote {p}")
    elif act == "export":
        div = maps.resolve_map_ref(args.ref, uri)
        o = Path(args.out)
        if not hasattr(div, "raw"):
            raise ConfigError(f"maps export: {args.ref} is not a neural mirror map (nothing to export)")
        vec = np.asarray(div.raw if args.raw else div.theta, dtype=np.float64)
        if o.suffix == ".safetensors":
            div.save(o)
        elif o.suffix == ".json":
            _save_json(o, {"layout": "[v(126), w(126), b(126), a, c]", "transform": "raw = softplus(theta)",
                           "sha": getattr(div, "sha", None), ("raw" if args.raw else "theta"): vec.tolist()})
        elif o.suffix == ".npy":
            o.parent.mkdir(parents=True, exist_ok=True)
            np.save(o, vec)
        else:
            raise ConfigError(f"maps export: --out must end in .safetensors, .json or .npy, got {o}")
        out.print(f"wrote {o}")
    elif act == "import":
        vec = _read_vector(Path(args.path))
        try:
            div = (divergences.NeuralMirrorMap.from_theta(vec) if args.theta
                   else divergences.NeuralMirrorMap.from_raw(vec))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"maps import {args.path}: {e}") from None
        o = Path(args.out)
        if o.suffix != ".safetensors":
            raise ConfigError(f"maps import: --out must end in .safetensors, got {o}")
        div.save(o)
        out.print(f"wrote {o} (sha {div.sha})")
    elif act == "register":
        uri_out = register_map(cfg, maps.resolve_map_ref(args.ref, uri), args.name,
                               args.alias or cfg.tracking.alias, source=args.ref)
        out.print(f"registered {uri_out}")
    return 0


def register_map(cfg: Config, div: Any, name: str, alias: str, source: str = "") -> str:
    """Log a neural map as a run artifact (written by `NeuralSpace.save`, the format every command
    loads) and register it in the MLflow model registry with `alias`."""
    if not isinstance(div, divergences.NeuralMirrorMap):
        raise ConfigError("maps register: only neural mirror maps can be registered")
    space = NeuralSpace()
    tracker = MLflowTracker(cfg, "manual", space)
    rid = tracker.session.create_run(f"register-{name}", {"mirrorlab.kind": "map", "mirrorlab.source": source,
                                                          "mirrorlab.theta_sha": str(div.sha)})
    with tempfile.TemporaryDirectory() as d:
        tracker.client.log_artifacts(rid, str(space.save(np.asarray(div.theta), Path(d) / "map")), "map")
    tracker.session.end_run(rid)
    return str(tracker.register_best(rid, name=name, alias=alias))


# --------------------------------------------------------------------------- fields
def cmd_fields(cfg: Config, args: argparse.Namespace) -> int:
    """Print the configuration reference (all fields, or those under `prefix`)."""
    if args.markdown:
        out.print(config_reference(), end="", markup=False, highlight=False, soft_wrap=True)
        return 0
    t = Table(title="configuration fields (set in YAML or with --set path=value)")
    for c in ("field", "type", "default", "what it does"):
        t.add_column(c, overflow="fold")
    for path, typ, default, desc in field_rows():
        if path.startswith(args.prefix):
            t.add_row(path, typ, default, desc)
    out.print(t)
    return 0


# --------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser, config_positional: bool = True) -> None:
    if config_positional:
        p.add_argument("config", nargs="?", help="YAML config (optional; defaults otherwise)")
    else:
        p.add_argument("--config", "-c", help="YAML config (optional)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=10 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of the `mirrorlab` command."""
    ap = argparse.ArgumentParser(prog="mirrorlab", description=__doc__.splitlines()[0])
    ap.add_argument("--plugin", "-p", action="append", default=[], metavar="MODULE_OR_FILE",
                    help="import a module or .py file that registers divergences/tasks/strategies "
                         "(repeatable; also $MIRRORLAB_PLUGINS, comma-separated)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="one GBMPO run (model, task, divergence, lambda, steps)")
    _common(p)
    p.add_argument("--steps", type=int, help="shortcut for --set train.steps=N")
    p.add_argument("--split", choices=("train", "val", "test"),
                   help="evaluation split (default train.eval_split)")
    p.add_argument("--n", type=int, help="evaluate on the first N examples of the split")
    p.add_argument("--no-save", action="store_true", help="do not save the trained checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("search", help="search over mirror maps (outer loop)")
    _common(p)
    p.add_argument("--resume", action="store_true", help="resume from the last complete generation")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("probe", help="the fitness landscape's signal and noise, and a budget plan, "
                                     "before searching")
    _common(p)
    p.add_argument("--resume", action="store_true", help="reuse the jobs a killed probe finished")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("eval", help="evaluate a model or checkpoint on a task split")
    _common(p)
    p.add_argument("--checkpoint", help="a directory written by `mirrorlab train` (adapter or weights)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--n", type=int, help="evaluate on the first N examples")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="methods x seeds with mean +- std and paired tests")
    _common(p)
    p.add_argument("--resume", action="store_true",
                   help="reuse the runs a killed compare finished (its compare.journal.jsonl)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("run", help="search, then compare with the best map found (map: search:best)")
    _common(p)
    p.add_argument("--resume", action="store_true",
                   help="resume the search, then reuse the compare runs it had finished")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("quickstart", help="`run experiments/quickstart.yaml` (accepts --set)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_run, quickstart=True)

    p = sub.add_parser("maps", help="show, plot, export, import, register mirror maps")
    msub = p.add_subparsers(dest="maps_command", required=True, metavar="ACTION")
    refhelp = ("a map: a .safetensors file, models:/NAME@ALIAS, a built-in divergence name "
               "(kl_k3, prob_l2, neg_entropy...), or random:SEED")
    q = msub.add_parser("show", help="print a map's summary")
    q.add_argument("ref", help=refhelp)
    _common(q, config_positional=False)
    q = msub.add_parser("plot", help="plot phi_inv and h of maps beside KL and ProbL2")
    q.add_argument("refs", nargs="+", help=refhelp)
    q.add_argument("--out", "-o", default="maps.png")
    q.add_argument("--no-baselines", action="store_true")
    _common(q, config_positional=False)
    q = msub.add_parser("export", help="write a map as safetensors, or its raw 380-vector as JSON/.npy")
    q.add_argument("ref", help=refhelp)
    q.add_argument("--out", "-o", required=True, help="*.safetensors, *.json or *.npy")
    q.add_argument("--raw", action="store_true",
                   help="export the paper-compatible raw (non-negative) vector instead of theta")
    _common(q, config_positional=False)
    q = msub.add_parser("import", help="read a raw or theta vector (JSON/.npy/.txt) into a map file")
    q.add_argument("path")
    q.add_argument("--out", "-o", required=True, help="*.safetensors to write")
    q.add_argument("--theta", action="store_true", help="the vector is theta (default: raw, as the paper)")
    _common(q, config_positional=False)
    q = msub.add_parser("register", help="register a map in the MLflow model registry with an alias")
    q.add_argument("ref", help=refhelp)
    q.add_argument("--name", required=True)
    q.add_argument("--alias", default=None, help="default tracking.alias")
    _common(q, config_positional=False)
    p.set_defaults(func=cmd_maps)

    p = sub.add_parser("fields", help="every config field with its type, default and description")
    p.add_argument("prefix", nargs="?", default="", help="only fields under this path, e.g. search.evaluator")
    p.add_argument("--markdown", action="store_true", help="the Markdown reference (docs/config.md)")
    p.set_defaults(func=cmd_fields)
    return ap


def load_plugins(specs: list[str]) -> list[str]:
    """Import plugin modules (dotted names or `.py` paths) so their divergences, tasks and
    strategies are registered before the config is validated. Also read `$MIRRORLAB_PLUGINS`."""
    env = [p for p in os.environ.get("MIRRORLAB_PLUGINS", "").split(",") if p.strip()]
    loaded = []
    for spec in [*env, *specs]:
        spec = spec.strip()
        try:
            if spec.endswith(".py"):
                path = Path(spec).resolve()
                if not path.is_file():
                    raise FileNotFoundError(f"no such file {path}")
                name = f"mirrorlab_plugin_{path.stem}"
                mod_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(mod_spec)
                sys.modules[name] = module
                mod_spec.loader.exec_module(module)
            else:
                importlib.import_module(spec)
        except Exception as e:  # noqa: BLE001 - a broken plugin is a configuration problem
            raise ConfigError(f"--plugin {spec}: {type(e).__name__}: {e}") from None
        loaded.append(spec)
    return loaded


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, load and validate the config (exit 2 on ConfigError), run."""
    args = build_parser().parse_args(argv)
    try:
        load_plugins(args.plugin)
        if getattr(args, "quickstart", False):
            args.config = str(quickstart_config())
        cfg = _load(args)
        torch.set_num_threads(cfg.threads)  # the same numbers whatever the machine's core count
        return int(args.func(cfg, args) or 0)
    except ConfigError as e:
        err.print(f"[bold red]config error:[/] {escape(str(e))}", highlight=False)
        return EXIT_CONFIG
    except CheckpointError as e:
        err.print(f"[bold red]cannot resume:[/] {escape(str(e))}", highlight=False)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""MLflow lineage for searches (DESIGN section 6) and downloading of registered mirror maps.

One experiment per search name; a parent run per search (config YAML, strategy, seeds, run
record) and a child run per candidate (tags `mirrorlab.*`, fitness with its standard error, inner
training curves, completion length, a few completions as tables under `completions/`, the map as
safetensors + JSON and a plot). The best map is
registered in the model registry as a plain model version whose source is the child run's `map`
artifact directory, with an alias, so `maps.load_map("models:/NAME@ALIAS")` (or a file path) gives the
divergence back anywhere. Everything is logged from the search process; workers only return data.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import getpass
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mirrorlab.config import Config, dump_config
from mirrorlab.records import FINISHED, Job, Outcome
from mirrorlab.repro import git_commit, run_record
from mirrorlab.values import is_finite

TAG = "mirrorlab."
DEFAULT_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI: explicit, else $MLFLOW_TRACKING_URI, else sqlite in the working directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())  # pin cwd now
    return uri


def default_artifact_location(uri: str) -> str | None:
    """For a sqlite store, artifacts go in `mlruns/` beside the database file (not the cwd)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").as_uri()
    return None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if not isinstance(v, str) else v
    return out


_METRIC_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. :/]")


def metric_key(name: str) -> str:
    """A valid MLflow metric name for `name`: '@' becomes '_at_' (pass@1 -> pass_at_1), any other
    character MLflow rejects becomes '_'."""
    return _METRIC_KEY_BAD.sub("_", name.replace("@", "_at_"))


def _count(n: int | None) -> float | None:
    """An optional count as an MLflow metric value (None: not measured, not logged)."""
    return None if n is None else float(n)


def display_value(value: float, digits: int = 12) -> float:
    """`value` rounded to `digits` significant digits: 0.13999999999999996 -> 0.14 in the UI (the
    JSON results keep full precision)."""
    v = float(value)
    return float(f"{v:.{digits}g}") if math.isfinite(v) else v


def mlflow_metric(key: str, value: float, timestamp: int, step: int) -> Any:
    """An `mlflow.entities.Metric` whose key is made valid by `metric_key` and whose value is
    rounded by `display_value`."""
    from mlflow.entities import Metric

    return Metric(metric_key(key), display_value(value), timestamp, step)


@functools.cache
def provenance_tags() -> dict[str, str]:
    """The tags MLflow's fluent API sets and an explicit client does not: the git commit of the
    source tree, the entry point (source name, type LOCAL) and the user."""
    tags = {"mlflow.source.name": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python",
            "mlflow.source.type": "LOCAL", "mlflow.user": _user()}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
        if commit.endswith("-dirty"):
            tags[TAG + "git_dirty"] = "true"
    return tags


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return os.environ.get("USER", "unknown")


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive cross-process lock for a sqlite store (`<db>.lock`); a no-op for servers."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class MlflowSession:
    """One MLflow store and experiment, through an explicit client (no global MLflow state), with
    the logging every run kind shares: searches, their candidates, comparisons, train and eval.

    The experiment is `tracking.experiment` (else `default_experiment`), created on first use with
    its artifacts beside a sqlite store (restored if it was deleted)."""

    def __init__(self, tracking: Any, default_experiment: str) -> None:
        from mlflow import MlflowClient

        self.uri = resolve_tracking_uri(tracking.tracking_uri)
        self.experiment_name = tracking.experiment or default_experiment
        # Processes that open a new sqlite store at once race on its schema migration (MLflow
        # fails with "duplicate column" / alembic errors): creating the store and the experiment
        # happens under an exclusive lock on a file beside the database.
        with _store_lock(self.uri):
            self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                self.experiment_id = self.client.create_experiment(
                    self.experiment_name, artifact_location=default_artifact_location(self.uri))
            else:
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp.experiment_id)
                self.experiment_id = exp.experiment_id

    def create_run(self, run_name: str, tags: dict[str, str], parent_run_id: str | None = None,
                   start_time: float | None = None) -> str:
        """A new RUNNING run (a child of `parent_run_id` when given) with the provenance tags MLflow's
        UI shows (git commit, source, user); `start_time` (unix s) when the work began earlier, e.g.
        in a worker. Returns its id."""
        tags = {**provenance_tags(), **tags}
        if parent_run_id:
            tags = {"mlflow.parentRunId": parent_run_id, **tags}
        ms = None if start_time is None else int(1000 * start_time)
        return self.client.create_run(self.experiment_id, run_name=run_name, tags=tags,
                                      start_time=ms).info.run_id

    def log_config(self, run_id: str, cfg: Config) -> None:
        """`config.yaml` and `run_record.json` (seed, versions, threads, commit) as artifacts."""
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "config.yaml").write_text(dump_config(cfg))
            (Path(d) / "run_record.json").write_text(json.dumps(run_record(cfg.seed), indent=2, default=str))
            self.client.log_artifacts(run_id, d)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Params (non-strings as JSON), in batches of 100 (MLflow's limit)."""
        from mlflow.entities import Param

        items = [Param(k[:250], (v if isinstance(v, str) else json.dumps(v, default=str))[:6000])
                 for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float | None], step: int = 0,
                    curve: list[dict[str, float]] | None = None) -> None:
        """Finite `metrics` at `step`, plus each row of a training `curve` as `train/<key>` at its
        step, in batches of 900 (keys made valid by `metric_key`)."""
        ts = int(1000 * time.time())
        ms = [mlflow_metric(k, float(v), ts, step) for k, v in metrics.items() if is_finite(v)]
        for i, row in enumerate(curve or []):
            st = int(row.get("step", i + 1))
            ms += [mlflow_metric(f"train/{k}", float(v), ts, st) for k, v in row.items()
                   if k != "step" and isinstance(v, int | float) and math.isfinite(v)]
        for i in range(0, len(ms), 900):
            self.client.log_batch(run_id, metrics=ms[i : i + 900])

    def log_files(self, run_id: str, files: Iterable[str | os.PathLike[str]]) -> None:
        """Existing files as artifacts; PNGs under `plots/`."""
        for f in files:
            if Path(f).is_file():
                self.client.log_artifact(run_id, str(f), "plots" if str(f).endswith(".png") else None)

    #: rows per logged table at most (the trainer's `train.log_completions` bounds them first)
    max_table_rows: int = 512

    def log_table(self, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Rows (dicts; missing keys become null) as an MLflow table artifact at `artifact_file`
        (e.g. `completions/step_0001.json`), read back by `mlflow.load_table(artifact_file,
        run_ids=[...])` across runs; at most `max_table_rows` rows."""
        rows = list(rows)[: self.max_table_rows]
        if not rows:
            return
        cols = list(dict.fromkeys(k for r in rows for k in r))
        self.client.log_table(run_id, data={c: [r.get(c) for r in rows] for c in cols},
                              artifact_file=artifact_file)

    def log_samples(self, run_id: str, samples: dict[str, list[dict[str, Any]]] | None) -> list[str]:
        """Completion samples (`{table name: rows}`, as `gbmpo.sample_tables` makes them) as tables
        `completions/<name>.json`; returns the artifact paths. A failure is recorded as the tag
        `mirrorlab.samples_error` and never fails the run."""
        paths = []
        try:
            for name, rows in (samples or {}).items():
                path = f"completions/{name}.json"
                self.log_table(run_id, rows, path)
                paths.append(path)
        except Exception as e:  # noqa: BLE001 - samples are diagnostics; a run must not fail on them
            self.client.set_tag(run_id, TAG + "samples_error", str(e)[:500])
        return paths

    def end_run(self, run_id: str, status: str = "FINISHED", end_time: float | None = None) -> None:
        """Close a run with `status` (at `end_time`, unix s, when the work ended before now)."""
        self.client.set_terminated(run_id, status=status,
                                   end_time=None if end_time is None else int(1000 * end_time))


class NullTracker:
    """Tracker used when tracking is disabled: same methods, records nothing."""

    parent_run_id: str | None = None
    experiment_id: str | None = None

    def start(self, resume_run_id: str | None = None) -> str | None:
        return None

    def interrupted_children(self, generation: int, keep: Iterable[str]) -> int:
        return 0

    def log_baseline(self, job: Job, outcome: Outcome, **kw: Any) -> str | None:
        return None

    def log_candidate(self, job: Job, outcome: Outcome, **kw: Any) -> str | None:
        return None

    def log_plot(self, run_id: str | None, theta: Any) -> None:
        pass

    def log_generation(self, generation: int, summary: dict[str, float]) -> None:
        pass

    def log_files(self, files: Iterable[Any]) -> None:
        pass

    def register_best(self, run_id: str | None, **kw: Any) -> str | None:
        return None

    def finish(self, status: str = "FINISHED", summary: dict[str, Any] | None = None) -> None:
        pass


class MLflowTracker:
    """Parent run per search, child run per candidate, best map in the model registry."""

    def __init__(self, cfg: Config, strategy: str, space: Any) -> None:
        self.cfg = cfg
        self.session = MlflowSession(cfg.tracking, cfg.name)
        self.uri, self.client = self.session.uri, self.session.client
        self.experiment_name, self.experiment_id = self.session.experiment_name, self.session.experiment_id
        self.strategy = strategy
        self.space = space
        self.parent_run_id: str | None = None

    # ------------------------------------------------------------------ parent run
    def start(self, resume_run_id: str | None = None) -> str:
        """Create the parent run (or reopen `resume_run_id`) and log config, seeds, run record."""
        if resume_run_id is not None:
            self.parent_run_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            self.client.set_tag(resume_run_id, TAG + "resumed", "true")
            return resume_run_id
        cfg = self.cfg
        rid = self.session.create_run(f"{cfg.name}-search", {
            TAG + "kind": "search", TAG + "strategy": self.strategy,
            TAG + "space": cfg.search.space.kind, TAG + "task": cfg.task.name,
            TAG + "seed": str(cfg.seed), TAG + "executor": cfg.search.executor.kind,
            TAG + "evaluator": cfg.search.evaluator.kind,
        })
        self.parent_run_id = rid
        self.session.log_params(rid, _flatten(cfg.model_dump(mode="json", exclude={"compare"})))
        self.session.log_config(rid, cfg)
        return rid

    def interrupted_children(self, generation: int, keep: Iterable[str]) -> int:
        """Delete child runs of generations >= `generation` not in `keep` (left by a killed search)."""
        keep = set(keep)
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}'",
            max_results=50000,
        )
        n = 0
        for r in runs:
            g = r.data.tags.get(TAG + "generation")
            if g is not None and int(g) >= generation and r.info.run_id not in keep:
                self.client.delete_run(r.info.run_id)
                n += 1
        return n

    # ------------------------------------------------------------------ children
    def log_baseline(self, job: Job, outcome: Outcome, *, candidate_id: str) -> str:
        """One child run (stage baseline) for the paired baseline on one seed: its regulariser, its
        accuracy, training curve and completions, the metric every candidate on this seed is
        measured against (a candidate's `fitness` = its metric minus this one's)."""
        b = self.cfg.search.evaluator.baseline
        tags = {"mlflow.parentRunId": self.parent_run_id or "", TAG + "generation": str(job.generation),
                TAG + "candidate": "baseline", TAG + "candidate_id": candidate_id, TAG + "stage": "baseline",
                TAG + "status": outcome.status, TAG + "worker": outcome.worker, TAG + "seed": str(job.seed),
                TAG + "seeds": json.dumps([job.seed])}
        if outcome.error:
            tags[TAG + "error"] = outcome.error[:4900]
        rid = self.session.create_run(candidate_id, tags, start_time=outcome.started_at)
        self.session.log_params(rid, {"inner_steps": job.inner_steps or self.cfg.search.evaluator.inner_steps,
                                      "val_size": job.eval_size, "seed": job.seed,
                                      **({} if b is None else {"divergence.name": b.name,
                                                               "divergence.coef": b.coef})})
        self.session.log_metrics(rid, {"metric": outcome.metric if outcome.metric is not None
                                       else outcome.fitness, "mean_length": outcome.mean_length,
                                       "n_eval": None if outcome.n_eval is None else float(outcome.n_eval),
                                       "reward_errors": _count(outcome.reward_errors),
                                       **{f"time_{k}": v for k, v in outcome.timings.items()}},
                                 curve=outcome.curves)
        self.session.log_samples(rid, outcome.samples)
        self.session.end_run(rid, "FINISHED" if outcome.status == FINISHED else "FAILED", outcome.ended_at)
        return rid

    def log_candidate(
        self, job: Job, outcome: Outcome, *, candidate_id: str, parent_ids: tuple[str, ...] = (),
        note: str = "", parent_run: str | None = None, sha: str, extra: dict[str, float] | None = None,
        seeds: list[int] | None = None,
    ) -> str:
        """One child run for one evaluated candidate (FINISHED or FAILED with its error).

        `outcome` is the candidate's aggregate over its inner seeds; `extra` adds metrics (per-seed
        fitness, budget spent, racing rung); lineage is `parent_ids` (JSON tag) and the first
        parent's run id; `note` says how the strategy made the candidate."""
        from mlflow.entities import RunTag

        label = str(job.candidate) if job.role in ("candidate", "confirm") else job.role
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            TAG + "generation": str(job.generation),
            TAG + "candidate": label,
            TAG + "candidate_id": candidate_id,
            TAG + "stage": "confirm" if job.role == "confirm" else "search",
            TAG + "parent": parent_ids[0] if parent_ids else note,
            TAG + "parent_ids": json.dumps(list(parent_ids)),
            TAG + "note": note,
            TAG + "strategy": self.strategy,
            TAG + "theta_sha": sha,
            TAG + "status": outcome.status,
            TAG + "space": self.space.kind,
            TAG + "worker": outcome.worker,
            TAG + "seed": str(job.seed),
            TAG + "seeds": json.dumps(seeds if seeds is not None else [job.seed]),
        }
        if parent_run:
            tags[TAG + "parent_run"] = parent_run
        if outcome.error:
            tags[TAG + "error"] = outcome.error[:4900]
        name = candidate_id if job.role == "candidate" else f"{job.role}-{candidate_id}"
        rid = self.session.create_run(name, tags, start_time=outcome.started_at)
        metrics: dict[str, float | None] = {
            "fitness": outcome.fitness, "fitness_stderr": outcome.stderr, "metric": outcome.metric,
            "mean_length": outcome.mean_length,
            "n_eval": None if outcome.n_eval is None else float(outcome.n_eval),
            "reward_errors": _count(outcome.reward_errors),
            **(extra or {}), **{f"time_{k}": v for k, v in outcome.timings.items()}}
        self.session.log_metrics(rid, metrics, curve=outcome.curves)
        self.session.log_samples(rid, outcome.samples)  # per-seed rows, tagged with their seed
        theta = np.asarray(job.theta, dtype=np.float64)
        desc = self.space.describe(theta)
        self.client.log_batch(rid, tags=[RunTag(TAG + "params", json.dumps(desc))])
        # params and numeric theta descriptors, so MLflow's parallel-coordinates and scatter views
        # have something to plot (lambda for spaces that search it, the map's norm and mean)
        ec, sp = self.cfg.search.evaluator, self.cfg.search.strategy.params
        self.session.log_params(rid, {"strategy": self.strategy, "space": self.space.kind,
                                      "inner_steps": ec.inner_steps,
                                      "seeds": len(seeds or [job.seed]),
                                      "val_size": (ec.confirm.val_size if job.role == "confirm"
                                                   else ec.val_size),
                                      "divergence.coef": self.cfg.divergence.coef,
                                      **{f"strategy.{k}": v for k, v in sp.items()
                                         if isinstance(v, int | float | str | bool)}})
        self.session.log_metrics(rid, {f"theta/{k}": float(v) for k, v in desc.items()
                                       if isinstance(v, int | float) and not isinstance(v, bool)})
        with tempfile.TemporaryDirectory() as d:
            self.space.save(theta, Path(d) / "map")
            self.client.log_artifacts(rid, str(Path(d) / "map"), "map")
            if self.cfg.tracking.plots and self.cfg.tracking.plot_scope == "all":
                self._plot(rid, theta, Path(d))
        self.session.end_run(rid, "FINISHED" if outcome.status == FINISHED else "FAILED", outcome.ended_at)
        return rid

    def _plot(self, rid: str, theta: np.ndarray, d: Path) -> None:
        try:
            p = self.space.plot(theta, d / "plot" / "map.png")
            if p is not None:
                self.client.log_artifact(rid, str(p), "plot")
        except Exception as e:  # noqa: BLE001 - a plot must never fail a search
            self.client.set_tag(rid, TAG + "plot_error", str(e)[:500])

    def log_plot(self, run_id: str | None, theta: np.ndarray) -> None:
        """Attach the map plot (`plot/map.png`) to an existing child run (used for new incumbents)."""
        if run_id is None or not self.cfg.tracking.plots:
            return
        with tempfile.TemporaryDirectory() as d:
            self._plot(run_id, np.asarray(theta, dtype=np.float64), Path(d))

    def log_generation(self, generation: int, summary: dict[str, float]) -> None:
        """Per-generation summary metrics on the parent run (step = generation)."""
        self.session.log_metrics(self.parent_run_id, summary, step=generation)

    def log_files(self, files: Iterable[str | os.PathLike[str]]) -> None:
        """Files of the search's report (plots, the best map's summary) on the parent run."""
        if self.parent_run_id is not None:
            self.session.log_files(self.parent_run_id, files)

    # ------------------------------------------------------------------ registry / end
    def register_best(self, run_id: str | None, *, name: str | None = None, alias: str = "best",
                      fitness: float | None = None, stderr: float | None = None,
                      info: dict[str, Any] | None = None) -> str | None:
        """Register the `map` artifact of child `run_id` as a model version and alias it; the
        version's tags carry the fitness it was chosen with, its standard error and `info`
        (e.g. whether the fitness is the confirmed one, on how many fresh seeds)."""
        if run_id is None:
            return None
        from mlflow.exceptions import MlflowException

        name = name or f"{self.experiment_name}-map"
        try:
            self.client.create_registered_model(
                name, description="mirror maps found by mirrorlab searches (artifact: map/)"
            )
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code) and "already exists" not in str(e):
                raise
        tags = {TAG + "space": self.space.kind, TAG + "search_run": self.parent_run_id or "",
                TAG + "candidate_run": run_id}
        if fitness is not None:
            tags[TAG + "fitness"] = repr(fitness)
        if stderr is not None:
            tags[TAG + "fitness_stderr"] = repr(stderr)
        for k, v in (info or {}).items():
            tags[TAG + k] = v if isinstance(v, str) else json.dumps(v)
        desc = (f"Found by search run {self.parent_run_id} (experiment {self.experiment_name}); the map is "
                f"candidate run {run_id}'s `map/` artifact; fitness {_f(fitness, 6)} +- {_f(stderr, 6)} "
                "(full precision in the tags).")
        mv = self.client.create_model_version(
            name, source=f"runs:/{run_id}/map", run_id=run_id, tags=tags, description=desc
        )
        self.client.set_registered_model_alias(name, alias, mv.version)
        uri = f"models:/{name}@{alias}"
        if self.parent_run_id:
            self.client.set_tag(self.parent_run_id, TAG + "registered_map", uri)
        return uri

    def finish(self, status: str = "FINISHED", summary: dict[str, Any] | None = None) -> None:
        """Close the parent run with `status`, attaching a JSON summary artifact; a finished search
        also gets the answer where MLflow's UI shows it first: the run description (Markdown) and
        metrics named for what they are (`confirmed_fitness` when the confirmation stage ran,
        `best_fitness_all_generations`, `inner_steps_total`)."""
        if self.parent_run_id is None:
            return
        if summary is not None:
            with tempfile.TemporaryDirectory() as d:
                p = Path(d) / "search_result.json"
                p.write_text(json.dumps(summary, indent=2))
                self.client.log_artifact(self.parent_run_id, str(p))
            c = summary.get("confirmation")
            confirmed = c is not None and c.get("best") is not None  # else the answer is the incumbent
            ms = {"inner_steps_total": summary.get("inner_steps_spent"),
                  "best_fitness_all_generations": summary.get("best_over_generations")}
            if confirmed:
                ms.update(confirmed_fitness=summary.get("best_fitness"),
                          confirmed_fitness_stderr=summary.get("best_stderr"))
            self.session.log_metrics(self.parent_run_id, {k: v for k, v in ms.items() if v is not None})
            note = search_description(self.cfg, summary, self.experiment_id)
            self.client.set_tag(self.parent_run_id, "mlflow.note.content", note)
        self.client.set_terminated(self.parent_run_id, status=status)


def _f(x: Any, digits: int = 4) -> str:
    return "-" if x is None else f"{float(x):.{digits}g}"


def search_description(cfg: Config, summary: dict[str, Any], experiment_id: str | None = None) -> str:
    """The search's answer in Markdown (the parent run's description in MLflow's UI); with
    `experiment_id`, the answer's candidate run is a link (a relative link of the UI's router)."""
    ec, st = cfg.search.evaluator, cfg.search.strategy
    base = summary.get("paired_against")
    what = f"minus {base} trained on the same seeds" if base else "(val metric)"
    c = summary.get("confirmation")
    if c is not None and c.get("best") is None:
        c = None  # the stage ran but no candidate finished it: the answer is the incumbent
    reg = f", registered as `{summary['registered_uri']}`" if summary.get("registered_uri") else ""
    rid = summary.get("best_run_id")
    link = f" ([its run](#/experiments/{experiment_id}/runs/{rid}))" if rid and experiment_id else ""
    lines = [f"**Answer**: candidate `{summary.get('best_id')}`{link}{reg}", ""]
    if c is not None:
        lines.append(f"Confirmed fitness {_f(summary.get('best_fitness'))} +- "
                     f"{_f(summary.get('best_stderr'))} "
                     f"{what}, on {len(c.get('seeds', []))} fresh seeds the search never used; its search "
                     f"fitness was {_f(summary.get('search_fitness'))}.")
    else:
        lines.append(f"Incumbent fitness {_f(summary.get('best_fitness'))} +- "
                     f"{_f(summary.get('best_stderr'))} "
                     f"{what} (no confirmation stage: search fitness carries the winner's curse).")
    lines += ["", f"Strategy `{st.name}` in the `{cfg.search.space.kind}` space: "
              f"{st.generations} generations x "
              f"{st.population} candidates, {ec.seeds} seed(s) each, {ec.inner_steps} inner steps, "
              f"{summary.get('inner_steps_spent')} inner steps in all (baselines and confirmation included); "
              f"best fitness over all generations {_f(summary.get('best_over_generations'))}."]
    if base:
        lines += ["", f"The paired baseline ({base}) is logged once per seed as a child run with "
                  "`mirrorlab.stage = baseline`; each candidate shows `paired_baseline_metric` beside its "
                  "`fitness`."]
    return "\n".join(lines)


def make_tracker(cfg: Config, strategy: str, space: Any) -> MLflowTracker | NullTracker:
    """MLflowTracker when `cfg.tracking.enabled`, else a NullTracker."""
    return MLflowTracker(cfg, strategy, space) if cfg.tracking.enabled else NullTracker()


# --------------------------------------------------------------------------- loading maps
def download_map(ref: str, dst: str | os.PathLike[str], tracking_uri: str | None = None) -> Path:
    """Download the map directory behind `models:/NAME@ALIAS`, `models:/NAME/VERSION` or
    `runs:/RUN_ID/PATH` into `dst` (no global MLflow state is changed)."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if ref.startswith("models:/"):
        body = ref.removeprefix("models:/")
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, _, version = body.partition("/")
            mv = client.get_model_version(name, version)
        ref = mv.source
    if not ref.startswith("runs:/"):
        raise ValueError(f"cannot resolve map source {ref!r} (expected runs:/RUN_ID/PATH)")
    run_id, _, artifact_path = ref.removeprefix("runs:/").partition("/")
    return Path(client.download_artifacts(run_id, artifact_path or "map", str(dst)))

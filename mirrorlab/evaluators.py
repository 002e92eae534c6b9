"""Evaluators: what scores one job of the search (DESIGN section 5), and the seeds they share.

An evaluator is a picklable object with `setup()` (heavy, once per worker) and `evaluate(job) ->
dict` (one inner run). A job's `role` says what to train: `candidate` / `incumbent` / `confirm`
train the search space's map for `job.theta`; `baseline` trains the paired-fitness baseline
divergence (`search.evaluator.baseline`) on the job's seed, so the search can subtract it.

Seeds are pure functions of (search seed, generation, slot): every candidate of a generation gets
the same k seeds (common random numbers), and each seed fixes the inner run's prompt order and
sampling and its validation subset. Confirmation seeds come from a separate stream the search
never draws from, so a confirmed fitness is measured on seeds the search never saw.

This module sits below the search (config validates `search.evaluator.kind` against this
registry without importing the search loop).
"""

from __future__ import annotations

import importlib
import math
import time
from typing import Any

import numpy as np

from mirrorlab.records import Job, check_deadline
from mirrorlab.registry import Registry

_GEN_SALT = 0x5EA6C
_CONFIRM_SALT = 0xC0F1A


# --------------------------------------------------------------------------- seeds (pure)
def generation_seed(seed: int, generation: int, resample: bool = True) -> int:
    """The first common-random-numbers seed shared by all candidates of `generation` (31-bit)."""
    return generation_seeds(seed, generation, 1, resample)[0]


def generation_seeds(seed: int, generation: int, k: int, resample: bool = True) -> list[int]:
    """The k inner seeds of `generation` (the same for every candidate of it; with `resample`
    False, the same for the whole search). Slot 0 is `generation_seed`'s historical value."""
    g = int(generation) if resample else 0
    out = []
    for j in range(int(k)):
        key = [int(seed) % 2**32, g, _GEN_SALT] + ([j] if j else [])
        out.append(int(np.random.SeedSequence(key).generate_state(1)[0] >> 1))
    return out


def confirmation_seeds(seed: int, k: int) -> list[int]:
    """k seeds for the final confirmation stage, from a stream the generations never use."""
    return [int(np.random.SeedSequence([int(seed) % 2**32, _CONFIRM_SALT, j]).generate_state(1)[0] >> 1)
            for j in range(int(k))]


def val_subset(seed: int, n_val: int, size: int | None) -> list[int] | None:
    """The validation indices for a seed: all (None) or `size` drawn without replacement."""
    if size is None or size >= n_val:
        return None
    rng = np.random.default_rng([int(seed), 0xEFA1])
    return sorted(int(i) for i in rng.choice(n_val, size=size, replace=False))


# --------------------------------------------------------------------------- registry
evaluators: Registry[Any] = Registry("evaluator")


def build_evaluator(cfg: Any) -> Any:
    """The evaluator named by `cfg.search.evaluator.kind` (registered name or `module:factory`)."""
    kind = cfg.search.evaluator.kind
    params = dict(cfg.search.evaluator.params)
    if kind in evaluators:
        return evaluators.get(kind, cfg=cfg, **params)
    if ":" in kind:
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
    """Scores a job by T inner GBMPO steps on task.train from the base weights, then task.val.

    `setup()` builds the model, task and trainer once per worker; each evaluation resets the
    trainer to the base weights with the job's seed, sets the divergence (the candidate's map and
    coefficient, or the paired baseline's for `role == "baseline"`), trains, and evaluates on the
    seed's val subset of `job.eval_size` problems. fitness = metric - length_penalty * mean
    completion length; stderr = the metric's sampling standard error; `scores` = per-problem
    scores (for paired standard errors).
    """

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.trainer: Any = None
        self.space: Any = None
        self._baseline: tuple[Any, float] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "trainer": None, "space": None, "_baseline": None}

    def setup(self) -> None:
        """Load the base model and build the trainer (heavy; once per worker)."""
        from mirrorlab.gbmpo import build_trainer
        from mirrorlab.spaces import make_space

        self.space = make_space(self.cfg)
        self.trainer = build_trainer(self.cfg, divergence=self.space.divergence(self.space.initial(0)))
        self.n_val = len(self.trainer.task.val)

    def _divergence(self, job: Job) -> tuple[Any, float]:
        if job.role != "baseline":
            return self.space.divergence(job.theta), self.space.coef(job.theta)
        if self._baseline is None:
            from mirrorlab.divergences import from_config

            bcfg = self.cfg.search.evaluator.baseline
            if bcfg is None:
                raise ValueError("a baseline job needs search.evaluator.baseline (a divergence config)")
            self._baseline = (from_config(bcfg), float(bcfg.coef))
        return self._baseline

    def evaluate(self, job: Job) -> dict[str, Any]:
        """One job: reset, set the divergence, train T steps, evaluate on the seed's val subset."""
        if self.trainer is None:
            self.setup()
        ec = self.cfg.search.evaluator
        t0 = time.monotonic()
        div, coef = self._divergence(job)
        self.trainer.reset(seed=job.seed)
        self.trainer.set_divergence(div, coef)
        t1 = time.monotonic()
        curves = self.trainer.train(steps=ec.inner_steps, callbacks=[_DeadlineCallback(job)])
        t2 = time.monotonic()
        bad = _nonfinite_loss(curves)
        if bad:
            raise FloatingPointError(bad)
        check_deadline(job)
        res = self.trainer.evaluate("val", indices=val_subset(job.seed, self.n_val, job.eval_size))
        t3 = time.monotonic()
        fitness = float(res.metric) - ec.length_penalty * float(res.mean_length)
        return {
            "fitness": fitness, "stderr": float(res.stderr), "metric": float(res.metric),
            "mean_length": float(res.mean_length), "n_eval": int(res.n),
            "scores": [float(s) for s in res.scores],
            "curves": [{k: float(v) for k, v in row.items() if isinstance(v, int | float)} for row in curves],
            "timings": {"reset_s": t1 - t0, "train_s": t2 - t1, "eval_s": t3 - t2},
        }


class AnalyticEvaluator:
    """A cheap known objective of theta, for debugging strategies and the search machinery.

    fitness = -mean((theta - target)^2) (`sphere`) or minus the mean Rastrigin term
    (`rastrigin`), plus optional Gaussian noise (seeded by the job's seed and theta, so common
    random numbers hold; `stderr` = noise). A `baseline` job scores `baseline_theta` (default all
    zeros) under the same seed. `delay_s` sleeps per evaluation in small slices (checking the
    deadline) to simulate inner-run cost; it counts as training time.
    """

    def __init__(self, cfg: Any = None, function: str = "sphere", target: float = 1.0,
                 noise: float = 0.0, delay_s: float = 0.0, baseline_theta: float = 0.0) -> None:
        if function not in ("sphere", "rastrigin"):
            raise ValueError(f"analytic function must be sphere or rastrigin, got {function!r}")
        self.function, self.target, self.noise, self.delay_s = function, float(target), float(noise), delay_s
        self.baseline_theta = float(baseline_theta)

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
        theta = np.asarray(job.theta, dtype=np.float64)
        if job.role == "baseline":
            theta = np.full_like(theta, self.baseline_theta)
        f = self.value(theta)
        if self.noise > 0:
            h = int.from_bytes(np.asarray(theta, "<f8").tobytes()[:8], "little") % 2**32
            f += float(np.random.default_rng([job.seed, h]).normal(0.0, self.noise))
        return {"fitness": f, "stderr": self.noise, "metric": f,
                "timings": {"train_s": time.monotonic() - t0, "eval_s": 0.0}}


class FaultInjectionEvaluator:
    """Wraps another evaluator and makes chosen candidates fail, to exercise the failure policy.

    `faults` maps "generation/candidate" (or "*/candidate") to `raise` (an exception), `nan` (the
    inner result's fitness replaced by NaN) or `hang` (a blocking sleep of `hang_s`, which only the
    timeout can stop; the `process` and `ray` executors kill it, `local` cannot). `candidate` is
    the candidate's slot in its generation, whichever of its seeds the job runs.
    """

    def __init__(self, cfg: Any, inner: str = "gbmpo", inner_params: dict[str, Any] | None = None,
                 faults: dict[str, str] | None = None, hang_s: float = 3600.0) -> None:
        self.inner = evaluators.get(inner, cfg=cfg, **(inner_params or {}))
        self.faults = dict(faults or {})
        bad = set(self.faults.values()) - {"raise", "nan", "hang"}
        if bad:
            raise ValueError(f"unknown fault kinds {sorted(bad)}; allowed: raise, nan, hang")
        self.hang_s = hang_s

    def setup(self) -> None:
        """Set up the wrapped evaluator."""
        self.inner.setup()

    def evaluate(self, job: Job) -> dict[str, Any]:
        """The wrapped evaluation, unless a fault is configured for this candidate."""
        fault = None
        if job.role == "candidate":
            faults = self.faults
            fault = faults.get(f"{job.generation}/{job.candidate}") or faults.get(f"*/{job.candidate}")
        if fault == "raise":
            raise RuntimeError(f"injected failure for candidate {job.generation}/{job.candidate}")
        if fault == "hang":
            time.sleep(self.hang_s)
        res = self.inner.evaluate(job)
        if fault == "nan":
            res = {**res, "fitness": float("nan")}
        return res


evaluators.register("gbmpo", GBMPOEvaluator)
evaluators.register("analytic", AnalyticEvaluator)
evaluators.register("fault_injection", FaultInjectionEvaluator)

"""Evaluators: what scores one job of the search (DESIGN section 5), and the seeds they share.

An evaluator is a picklable object with `setup()` (heavy, once per worker) and `evaluate(job) ->
dict` (one inner run). A job's `role` says what to train: `candidate` / `incumbent` / `confirm`
train the search space's map for `job.theta`; `baseline` trains the paired-fitness baseline
divergence (`search.evaluator.baseline`) on the job's seed, so the search can subtract it.

Seeds are pure functions of (search seed, generation, slot): every candidate of a generation gets
the same k seeds (common random numbers), and each seed fixes the inner run's prompt order and
sampling and its validation subset. Confirmation seeds come from a separate stream the search
never draws from, so a confirmed fitness is measured on seeds the search never saw.

This module sits below the config, which validates `search.evaluator.kind` against this
registry; the real evaluator, `gbmpo`, lives in `mirrorlab.inner` (it builds trainers, so a layer
above the config) and is registered here by its import path.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from mirrorlab.records import Job, check_deadline
from mirrorlab.registry import Registry, import_path

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
    factory = import_path(kind) if kind not in evaluators and ":" in kind else evaluators.factory(kind)
    return factory(cfg=cfg, **params)


class DeadlineCallback:
    """Trainer callback that stops an inner run at the next step once the job's deadline passed."""

    def __init__(self, job: Job) -> None:
        self.job = job

    def on_step(self, step: int, metrics: dict[str, Any]) -> None:
        check_deadline(self.job)


def nonfinite_loss(curves: list[dict[str, Any]]) -> str | None:
    for i, row in enumerate(curves):
        for k, v in row.items():
            if "loss" in k and isinstance(v, int | float) and not math.isfinite(v):
                return f"non-finite {k}={v} at inner step {row.get('step', i)}"
    return None


class AnalyticEvaluator:
    """A cheap known objective of theta, for debugging strategies and the search machinery.

    fitness = -mean((theta - target)^2) (`sphere`) or minus the mean Rastrigin term
    (`rastrigin`), plus optional Gaussian noise (seeded by the job's seed and theta, so common
    random numbers hold; `stderr` = noise). A `baseline` job scores `baseline_theta` (default all
    zeros) under the same seed. `delay_s` sleeps per evaluation in small slices (checking the
    deadline) to simulate inner-run cost; it counts as training time. With `pid_dir`, each job
    first writes the id of the process running it to `<pid_dir>/<generation>-<index>.pid`, so a
    fault test can kill that worker from outside, as the OOM killer would.
    """

    def __init__(self, cfg: Any = None, function: str = "sphere", target: float = 1.0,
                 noise: float = 0.0, delay_s: float = 0.0, baseline_theta: float = 0.0,
                 pid_dir: str | None = None) -> None:
        if function not in ("sphere", "rastrigin"):
            raise ValueError(f"analytic function must be sphere or rastrigin, got {function!r}")
        self.function, self.target, self.noise, self.delay_s = function, float(target), float(noise), delay_s
        self.baseline_theta = float(baseline_theta)
        self.pid_dir = pid_dir

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
        if self.pid_dir is not None:
            tmp = Path(self.pid_dir) / f".{job.generation}-{job.index}.pid.tmp"
            tmp.write_text(str(os.getpid()))
            tmp.replace(tmp.with_name(f"{job.generation}-{job.index}.pid"))
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
            key = [job.seed, h] if job.inner_steps is None else [job.seed, h, job.inner_steps]
            f += float(np.random.default_rng(key).normal(0.0, self.noise))
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


evaluators.register("gbmpo", "mirrorlab.inner:GBMPOEvaluator")  # a layer up: it builds trainers
evaluators.register("analytic", AnalyticEvaluator)
evaluators.register("fault_injection", FaultInjectionEvaluator)

"""The inner run that scores a search candidate: T GBMPO steps from the base weights, then val.

`GBMPOEvaluator` is the evaluator registered as `gbmpo` (in `mirrorlab.evaluators`, by import
path): it builds the trainer once per worker and, per job, the regulariser through
`mirrorlab.maps` (so `divergence.compile`, the estimator and a space's searched coefficient
apply to candidates exactly as to `train` and `compare`).
"""

from __future__ import annotations

import math
import time
from typing import Any

from mirrorlab.evaluators import DeadlineCallback, nonfinite_loss, val_subset
from mirrorlab.gbmpo import Regulariser, build_trainer, sample_tables
from mirrorlab.maps import build_divergence, regulariser
from mirrorlab.records import Job, check_deadline
from mirrorlab.spaces import make_space

# What `Job.measure` may ask of an inner run besides its fitness (the probe asks; a search does not):
#   loglik: true       per val problem, mean log-prob per token of the reference completion
#   sample_k: k        per val problem, k sampled completions scored: expected reward (mean), pass@k (max)
#   test_size: n       per-problem scores of greedy decoding on the first n test problems
#   horizons: [t, ..]  per-problem val scores after t < inner_steps steps (the same run, paused)
MEASURES = ("loglik", "sample_k", "test_size", "horizons")


def sample_proxies(per_problem: list[list[float]]) -> tuple[list[float], list[float]]:
    """From k scored samples per problem: the expected reward (their mean) and pass@k (1 when any
    sample scores 1, i.e. their max for 0/1 scores; for fractional scores, the best sample).
    Samples the task could not judge (NaN) are left out; a problem with none judged gives NaN."""
    judged = [[x for x in r if not math.isnan(x)] for r in per_problem]
    return ([sum(r) / len(r) if r else math.nan for r in judged],
            [max(r) if r else math.nan for r in judged])


class GBMPOEvaluator:
    """Scores a job by T inner GBMPO steps on task.train from the base weights, then task.val.

    `setup()` builds the model, task and trainer once per worker; each evaluation resets the
    trainer to the base weights with the job's seed, sets the divergence (the candidate's map and
    coefficient, or the paired baseline's for `role == "baseline"`), trains, and evaluates on the
    seed's val subset of `job.eval_size` problems. fitness = metric - length_penalty * mean
    completion length; stderr = the metric's sampling standard error; `scores` = per-problem
    scores (for paired standard errors); `samples` = a few completions of the first and last inner
    step and of the evaluation (`train.log_completions`; logged on the candidate's MLflow run).
    """

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.trainer: Any = None
        self.space: Any = None
        self._baseline: Regulariser | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "trainer": None, "space": None, "_baseline": None}

    def setup(self) -> None:
        """Load the base model and build the trainer (heavy; once per worker)."""
        cfg = self.cfg
        self.space = make_space(cfg.search.space, cfg.divergence.coef)
        self.trainer = build_trainer(cfg, self._regulariser(self.space.initial(0)))
        self.n_val = len(self.trainer.task.val)

    def _regulariser(self, theta: Any) -> Regulariser:
        """A candidate's map with its coefficient (the space's, else `divergence.coef`) and the
        configured estimator, chunk size and `compile`."""
        return regulariser(self.space.divergence(theta), self.cfg.divergence, self.space.coef(theta))

    def _regulariser_for(self, job: Job) -> Regulariser:
        if job.role != "baseline":
            return self._regulariser(job.theta)
        if self._baseline is None:
            bcfg = self.cfg.search.evaluator.baseline
            if bcfg is None:
                raise ValueError("a baseline job needs search.evaluator.baseline (a divergence config)")
            self._baseline = build_divergence(bcfg, tracking_uri=self.cfg.tracking.tracking_uri)
        return self._baseline

    def evaluate(self, job: Job) -> dict[str, Any]:
        """One job: reset, set the divergence, train T steps, evaluate on the seed's val subset."""
        if self.trainer is None:
            self.setup()
        ec = self.cfg.search.evaluator
        steps = job.inner_steps or ec.inner_steps  # a racing rung may train fewer
        t0 = time.monotonic()
        reg = self._regulariser_for(job)
        self.trainer.reset(seed=job.seed)
        self.trainer.set_regulariser(reg)
        t1 = time.monotonic()
        indices = val_subset(job.seed, self.n_val, job.eval_size)
        extra: dict[str, Any] = {}
        horizons = sorted({int(h) for h in job.measure.get("horizons", ()) if 0 < int(h) < steps})
        curves: list[dict[str, Any]] = []
        paused_s = 0.0
        for h in [*horizons, steps]:
            curves += self.trainer.train(steps=h - len(curves), callbacks=[DeadlineCallback(job)])
            if h < steps:  # greedy decoding only: no RNG drawn, the run goes on unchanged
                tp = time.monotonic()
                scores = self.trainer.evaluate("val", indices=indices).scores
                extra[f"val_at_{h}"] = [float(x) for x in scores]
                paused_s += time.monotonic() - tp
        t2 = time.monotonic()
        bad = nonfinite_loss(curves)
        if bad:
            raise FloatingPointError(bad)
        check_deadline(job)
        res = self.trainer.evaluate("val", indices=indices)
        t3 = time.monotonic()
        extra.update(self._measure(job, indices))
        if horizons:
            extra.setdefault("cost_s", {})["horizons"] = paused_s
        fitness = float(res.metric) - ec.length_penalty * float(res.mean_length)
        return {
            "fitness": fitness, "stderr": float(res.stderr), "metric": float(res.metric),
            "mean_length": float(res.mean_length), "n_eval": int(res.n), "reward_errors": res.reward_errors,
            "scores": [float(s) for s in res.scores],
            "curves": [{k: float(v) for k, v in row.items() if isinstance(v, int | float)} for row in curves],
            "timings": {"reset_s": t1 - t0, "train_s": t2 - t1 - paused_s, "eval_s": t3 - t2},
            "samples": sample_tables(curves, res, "val"),  # bounded by train.log_completions
            "extra": extra,  # what job.measure asked for (the probe's proxies), per problem
        }

    def _measure(self, job: Job, indices: list[int] | None) -> dict[str, Any]:
        """The extra measurements `job.measure` asks for (after training), each with its cost."""
        m, out, cost = job.measure, {}, {}
        val = self.trainer.task.split("val")
        exs = [val[i] for i in indices] if indices is not None else list(val)
        if m.get("loglik"):
            t = time.monotonic()
            out["loglik"] = self.trainer.reference_loglik(exs)
            cost["loglik"] = time.monotonic() - t
        k = int(m.get("sample_k") or 0)
        if k > 0:
            t = time.monotonic()
            out["expected_reward"], out["pass_at_k"] = sample_proxies(self.trainer.sampled_scores(exs, k))
            cost["expected_reward"] = cost["pass_at_k"] = time.monotonic() - t
        n_test = int(m.get("test_size") or 0)
        if n_test > 0:
            t = time.monotonic()
            out["test"] = [float(x) for x in self.trainer.evaluate("test", n=n_test).scores]
            cost["test"] = time.monotonic() - t
        if cost:
            out["cost_s"] = cost
        return out

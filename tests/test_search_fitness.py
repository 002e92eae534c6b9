"""Noise-aware fitness in the search: k seeds with common random numbers, paired fitness against a
cached baseline, racing (successive halving), the incumbent rule, and the confirmation stage
(including kill -9 during confirmation, then resume to the same registered map)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _helpers import assert_killed, kill9_when, killable
from mlflow import MlflowClient

from mirrorlab import strategies as S
from mirrorlab.config import ConfigError, config_from_dict, dump_config
from mirrorlab.evaluators import AnalyticEvaluator, confirmation_seeds, generation_seeds
from mirrorlab.fitness import aggregate, paired_stderr, racing_rungs
from mirrorlab.journal import journal_path, read_journal
from mirrorlab.records import FINISHED, Job, Outcome
from mirrorlab.search import Search
from mirrorlab.strategies import Candidate


class Listed(S.Strategy):
    """Proposes the thetas given in `points` (rows), the same every generation: duplicates and a
    clearly better point are placed by the test."""

    name = "listed_test"

    def __init__(self, dim: int, population: int, seed: int, x0: Any = None, generations: int | None = None,
                 points: list[list[float]] | None = None) -> None:
        super().__init__(dim, population, seed, x0, generations)
        self.points = np.asarray(points, dtype=np.float64)

    def _ask(self) -> list[Candidate]:
        return [Candidate(self.points[i % len(self.points)].copy(), self._cid(i), parent_ids=(f"p{i}",))
                for i in range(self.population)]

    def _tell(self, candidates: list[Candidate], fitnesses: np.ndarray) -> None:
        pass  # no state: `self.state` stays None


S.register("listed_test", Listed, overwrite=True)


class Counting(AnalyticEvaluator):
    """The analytic evaluator, counting jobs per role (local executor: same process)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.roles: list[tuple[str, int]] = []

    def evaluate(self, job: Job) -> dict[str, Any]:
        self.roles.append((job.role, job.seed))
        return super().evaluate(job)


def analytic_cfg(tmp: Path, name: str, points: list[list[float]], evaluator: dict | None = None,
                 generations: int = 2, tracking: bool = False, noise: float = 0.1, delay_s: float = 0.0,
                 **params: Any) -> Any:
    ev = {"kind": "analytic", "params": {"noise": noise, "target": 1.0, "delay_s": delay_s, **params},
          **(evaluator or {})}
    return config_from_dict({
        "name": name, "seed": 3, "output_dir": str(tmp / "runs"),
        "search": {"space": {"kind": "mixture"},
                   "strategy": {"name": "listed_test", "population": len(points), "generations": generations,
                                "params": {"points": points}},
                   "evaluator": ev, "checkpoint_dir": str(tmp / f"ck-{name}")},
        "tracking": {"enabled": tracking, "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "plots": False},
    })


def counting_search(cfg: Any) -> tuple[Search, Counting]:
    p = cfg.search.evaluator.params
    ev = Counting(function="sphere", target=p["target"], noise=p["noise"], delay_s=p["delay_s"],
                  baseline_theta=p.get("baseline_theta", 0.0))
    return Search(cfg, evaluator=ev), ev


# --------------------------------------------------------------------------- pure helpers
def test_racing_rungs():
    assert racing_rungs(4, 1, 2) == [1, 2, 4]
    assert racing_rungs(5, 1, 2) == [1, 2, 4, 5]
    assert racing_rungs(9, 1, 3) == [1, 3, 9]
    assert racing_rungs(3, 2, 2) == [2, 3]


def test_aggregate_pairs_and_its_standard_error():
    def o(f, scores=()):
        return Outcome(0, 0, FINISHED, fitness=f, stderr=0.05, metric=f, scores=list(scores))

    a = [o(0.5, [1, 0, 1, 1]), o(0.7)]
    b = [o(0.4, [1, 0, 0, 1]), o(0.5)]
    s = aggregate(a, [1, 2], b)
    assert s.values == pytest.approx((0.1, 0.2)) and s.fitness == pytest.approx(0.15)
    assert s.stderr == pytest.approx(np.std([0.1, 0.2], ddof=1) / math.sqrt(2))
    # one seed: the per-problem paired differences give the standard error
    d = np.array([0, 0, 1, 0.0])
    assert paired_stderr([0.1], a[0], b[0]) == pytest.approx(np.std(d, ddof=1) / 2)
    assert paired_stderr([0.1], a[0], None) == 0.05  # unpaired: the run's own sampling error
    failed = aggregate(a, [1, 2], [b[0], Outcome(0, 0, "FAILED", error="boom")])
    assert failed.status == "FAILED" and "baseline failed on seed 2" in failed.error


def test_seed_streams_are_disjoint_and_stable():
    g = {s for gen in range(50) for s in generation_seeds(0, gen, 4)}
    c = set(confirmation_seeds(0, 8))
    assert len(g) == 200 and len(c) == 8 and not g & c
    assert generation_seeds(0, 5, 3, resample=False) == generation_seeds(0, 0, 3)
    assert generation_seeds(0, 2, 3)[:1] == generation_seeds(0, 2, 1)


# --------------------------------------------------------------------------- paired fitness and CRN
def test_same_theta_same_fitness_and_baseline_trained_once_per_seed(tmp_path):
    pts = [[0.2, 0.1], [0.2, 0.1], [0.0, 0.0], [0.9, -0.3]]  # a duplicate, and the baseline's own theta
    ev = {"seeds": 3, "baseline": {"name": "kl_k3", "coef": 0.04}, "resample_each_generation": False}
    s, counter = counting_search(analytic_cfg(tmp_path, "paired", pts, ev, generations=3, baseline_theta=0.0))
    res = s.run()
    for g in res.history:
        assert g.fitness[0] == g.fitness[1]  # common random numbers: same theta, same seeds, same value
        assert abs(g.fitness[2]) < 1e-12  # the baseline itself scores 0
        assert g.n_seeds == [3] * 4 and g.seeds == res.history[0].seeds
    roles = [r for r, _ in counter.roles]
    assert roles.count("baseline") == 3  # once per seed of the fixed set, not per candidate or generation
    assert roles.count("candidate") == 3 * 4 * 3
    # fresh seeds each generation: the baseline is trained once per new seed
    s2, c2 = counting_search(analytic_cfg(tmp_path, "paired2", pts, {**ev, "resample_each_generation": True},
                                          generations=2, baseline_theta=0.0))
    s2.run()
    assert [r for r, _ in c2.roles].count("baseline") == 6
    assert len({seed for r, seed in c2.roles if r == "baseline"}) == 6


def test_the_notebook_shows_baselines_params_provenance_and_real_durations(tmp_path):
    """Issue 23 items 2 and 4, read back with MLflow's own client: a child run per paired baseline
    (stage baseline) on each seed; candidates with params and the baseline metric they were paired
    with; runs spanning at least the job's own time (created after it, with the worker's times); git
    commit, source and user tags; metric values without binary noise."""
    pts = [[0.2, 0.1], [0.9, -0.3]]
    ev = {"seeds": 2, "baseline": {"name": "kl_k3", "coef": 0.04}, "resample_each_generation": False}
    cfg = analytic_cfg(tmp_path, "notebook", pts, ev, generations=2, tracking=True, baseline_theta=0.0,
                       delay_s=0.3)
    res = Search(cfg).run()
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    runs = client.search_runs([client.get_run(res.parent_run_id).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    base = [r for r in runs if r.data.tags.get("mirrorlab.stage") == "baseline"]
    seeds = res.history[0].seeds
    assert sorted(int(r.data.tags["mirrorlab.seed"]) for r in base) == sorted(seeds)  # once per seed
    assert all(r.data.params["divergence.name"] == "kl_k3" and "metric" in r.data.metrics for r in base)
    by_seed = {int(r.data.tags["mirrorlab.seed"]): r.data.metrics["metric"] for r in base}
    cands = [r for r in runs if r.data.tags.get("mirrorlab.stage") == "search"]
    assert len(cands) == 2 * len(pts)
    for r in cands:
        m = r.data.metrics
        assert {"strategy", "inner_steps", "seeds", "divergence.coef"} <= set(r.data.params)
        # the pairing is visible: fitness = own metric - the baselines' mean on the same seeds
        assert m["paired_baseline_metric"] == pytest.approx(np.mean([by_seed[s] for s in seeds]), abs=1e-9)
        assert m["fitness"] == pytest.approx(m["metric"] - m["paired_baseline_metric"], abs=1e-9)
    for r in base + cands:
        # each job slept 0.3 s in the worker; a candidate ran 2 seeds
        assert r.info.end_time - r.info.start_time >= 300
        t = r.data.tags
        assert len(t["mlflow.source.git.commit"]) == 40 and t["mlflow.user"] and t["mlflow.source.name"]
        assert all(len(repr(v)) <= 16 for v in r.data.metrics.values())  # no 0.13999999999999996
    parent = client.get_run(res.parent_run_id)
    assert parent.data.tags["mlflow.source.git.commit"] == base[0].data.tags["mlflow.source.git.commit"]


@pytest.mark.slow
def test_paired_gbmpo_fitness_of_the_baseline_map_itself_is_zero(tmp_path):
    """Real inner runs: a candidate whose map is the baseline's map has fitness 0 (same seeds, same
    validation subset, deterministic training), any other is the paired difference."""
    from test_search import tiny_cfg

    from mirrorlab.spaces import make_space

    cfg = tiny_cfg(tmp_path, "paired-gbmpo", strategy="listed_test", params={"points": []},
                   evaluator={"seeds": 2, "val_size": 24})
    space = make_space(cfg.search.space, cfg.divergence.coef)
    x = space.initial(0)
    other = x + np.random.default_rng(1).normal(0, 2.0, x.size)
    map_file = space.save(x, tmp_path / "basemap") / "map.safetensors"
    points = [x.tolist(), other.tolist()]
    cfg = tiny_cfg(tmp_path, "paired-gbmpo", strategy="listed_test", params={"points": points},
                   evaluator={"seeds": 2, "val_size": 24, "baseline": {"name": "neural", "coef": 1.0,
                                                                       "map": str(map_file)}})
    cfg.search.strategy.population = 2
    cfg.search.strategy.generations = 1
    res = Search(cfg).run()
    g = res.history[0]
    assert g.status == [FINISHED, FINISHED]
    assert g.fitness[0] == pytest.approx(0.0, abs=1e-12) and g.stderr[0] == pytest.approx(0.0, abs=1e-12)
    assert g.fitness[1] is not None and g.n_seeds == [2, 2]
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    kid = client.search_runs([client.get_run(res.parent_run_id).info.experiment_id],
                             filter_string=f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    m = {r.data.tags["mirrorlab.candidate_id"]: r.data.metrics for r in kid}
    assert m["g0-1"]["paired"] == 1.0 and m["g0-1"]["budget_inner_steps"] == 2 * 3
    per_seed = [m["g0-1"][f"fitness_seed/{seed}"] for seed in g.seeds]  # keyed by the seed itself
    assert sum(per_seed) == pytest.approx(2 * g.fitness[1])
    assert m["g0-1"]["metric"] - m["g0-1"]["paired_baseline_metric"] == pytest.approx(g.fitness[1])


# --------------------------------------------------------------------------- racing
def test_racing_spends_less_than_flat_and_ranks_the_clearly_better_first(tmp_path):
    target = [1.0, 1.0]
    pts = [[-2.0 + 0.1 * i, -2.0] for i in range(7)] + [target]  # the last is clearly the best
    ev = {"seeds": 4, "racing": {"enabled": True, "eta": 2, "min_seeds": 1}}
    s, counter = counting_search(analytic_cfg(tmp_path, "race", pts, ev, generations=1, noise=0.3))
    res = s.run()
    g = res.history[0]
    flat = len(pts) * 4
    assert len(counter.roles) == 8 + 4 + 2 * 2 < flat  # 16 inner runs instead of 32
    assert sum(g.budget_steps) == 16 * s.cfg.search.evaluator.inner_steps
    assert int(np.argmax(g.fitness)) == 7 and g.n_seeds[7] == 4 and res.best_id == "g0-7"
    assert sorted(g.n_seeds) == [1, 1, 1, 1, 2, 2, 4, 4]
    # promoted candidates keep their identity and lineage
    assert g.ids == [f"g0-{i}" for i in range(8)] and g.parent_ids == [[f"p{i}"] for i in range(8)]


def test_step_racing_spends_less_than_flat_and_keeps_the_clearly_better(tmp_path):
    """Multi-fidelity racing over inner steps (20 -> 60, eta 4) with a paired baseline: 8 short runs
    and 2 full ones instead of 8 full ones, the baseline trained once per rung length, the clearly
    better candidate promoted and kept, ids and lineage unchanged, budgets per candidate exact."""
    target = [1.0, 1.0]
    pts = [[-2.0 + 0.1 * i, -2.0] for i in range(7)] + [target]
    ev = {"seeds": 2, "inner_steps": 60, "baseline": {"name": "kl_k3", "coef": 0.04},
          "racing": {"enabled": True, "eta": 4, "steps": [20, 60]}}
    cfg = analytic_cfg(tmp_path, "race-steps", pts, ev, generations=1, noise=0.3)
    s, counter = counting_search(cfg)
    res = s.run()
    g = res.history[0]
    full_equiv = sum(g.budget_steps) + 2 * (20 + 60)  # + the baseline on 2 seeds at both lengths
    assert s.steps_spent == full_equiv < (len(pts) + 1) * 2 * 60  # flat: 8 candidates + baseline, 60 steps
    assert sorted(g.budget_steps) == [40] * 6 + [160] * 2  # 2 seeds x 20, or x (20 + 60)
    assert g.budget_steps[7] == 160 and int(np.argmax(g.fitness)) == 7 and res.best_id == "g0-7"
    assert [r for r in counter.roles if r[0] == "baseline"] == [("baseline", x) for x in g.seeds] * 2
    assert g.ids == [f"g0-{i}" for i in range(8)] and g.parent_ids == [[f"p{i}"] for i in range(8)]
    # a map dropped after 20 steps is never the incumbent, and the strategy ranks it below survivors
    full = [b == 160 for b in g.budget_steps]
    assert g.best_fitness == max(f for f, ok in zip(g.fitness, full, strict=True) if ok)
    from mirrorlab.fitness import Score, tell_values

    sc = [Score(FINISHED, 0.9, 0.1, (0.9,), (1,), rung=0), Score(FINISHED, 0.2, 0.1, (0.2,), (1,), rung=1),
          Score("FAILED", None, None, (), (1,), rung=0)]
    assert tell_values(sc, [False, True, False], -1.0) == [0.2, 0.2, -1.0]
    with pytest.raises(ConfigError, match="racing.steps"):
        config_from_dict({"search": {"evaluator": {"inner_steps": 60, "racing": {"steps": [20, 60]}}}})
    with pytest.raises(ConfigError, match="racing.steps"):
        config_from_dict({"search": {"evaluator": {"inner_steps": 60,
                                                   "racing": {"enabled": True, "steps": [20, 40]}}}})


def test_lcb_incumbent_prefers_the_reliable_candidate(tmp_path):
    s = Search(analytic_cfg(tmp_path, "lcb", [[0.0, 0.0]], {"incumbent": "lcb", "lcb_z": 2.0}))
    from mirrorlab.fitness import Score

    lucky = Score(FINISHED, 0.60, 0.10, (0.5, 0.7), (1, 2))
    steady = Score(FINISHED, 0.55, 0.01, (0.54, 0.56), (1, 2))
    s._offer(0, Candidate(np.zeros(2), "g0-0"), lucky)
    s._offer(0, Candidate(np.ones(2), "g0-1"), steady)
    assert s.incumbent.id == "g0-1"  # 0.55 - 0.02 beats 0.60 - 0.20
    s2 = Search(analytic_cfg(tmp_path, "mean", [[0.0, 0.0]]))
    s2._offer(0, Candidate(np.zeros(2), "g0-0"), lucky)
    s2._offer(0, Candidate(np.ones(2), "g0-1"), steady)
    assert s2.incumbent.id == "g0-0"


def test_noise_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="racing.min_seeds"):
        config_from_dict({"search": {"evaluator": {"seeds": 2, "racing": {"enabled": True, "min_seeds": 2}}}})
    with pytest.raises(ConfigError, match=r"search\.evaluator\.incumbent"):
        config_from_dict({"search": {"evaluator": {"incumbent": "max"}}})
    with pytest.raises(ConfigError, match=r"search\.evaluator\.seeds"):
        config_from_dict({"search": {"evaluator": {"seeds": 0}}})
    with pytest.raises(ConfigError, match=r"search\.evaluator\.confirm\.top_k"):
        config_from_dict({"search": {"evaluator": {"confirm": {"top_k": -1}}}})


# --------------------------------------------------------------------------- confirmation
CONFIRM_POINTS = [[-1.0, -1.0], [0.5, 0.5], [0.9, 0.9], [1.0, 1.0], [0.0, 2.0], [2.0, 0.0]]


def confirm_cfg(tmp: Path, name: str, delay_s: float = 0.0) -> Any:
    ev = {"seeds": 1, "incumbent": "mean", "confirm": {"top_k": 3, "seeds": 4}}
    return analytic_cfg(tmp, name, CONFIRM_POINTS, ev, generations=2, tracking=True, noise=0.5,
                        delay_s=delay_s)


def test_confirmation_registers_the_confirmed_fitness(tmp_path):
    cfg = confirm_cfg(tmp_path, "confirm")
    res = Search(cfg).run()
    c = res.confirmation
    assert c is not None and len(c["rows"]) == 3 and c["seeds"] == confirmation_seeds(3, 4)
    assert not set(c["seeds"]) & {s for g in res.history for s in g.seeds}  # fresh seeds
    row = next(r for r in c["rows"] if r["id"] == res.best_id)
    assert res.best_fitness == row["fitness"] == max(r["fitness"] for r in c["rows"])
    assert len(row["values"]) == 4 and res.best_stderr == pytest.approx(np.std(row["values"], ddof=1) / 2)
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri, registry_uri=cfg.tracking.tracking_uri)
    mv = client.get_model_version_by_alias(f"{cfg.name}-map", "best")
    assert float(mv.tags["mirrorlab.fitness"]) == res.best_fitness
    assert float(mv.tags["mirrorlab.fitness_stderr"]) == res.best_stderr
    assert mv.tags["mirrorlab.confirmed"] == "true" and mv.run_id == res.best_run_id
    assert mv.tags["mirrorlab.search_run"] == res.parent_run_id
    assert mv.tags["mirrorlab.candidate_run"] == mv.run_id
    assert res.parent_run_id in mv.description
    run = client.get_run(res.best_run_id)
    # MLflow shows 12 significant digits (no binary noise); the JSON and the version tag keep all
    assert run.data.tags["mirrorlab.stage"] == "confirm"
    assert run.data.metrics["fitness"] == pytest.approx(res.best_fitness, rel=1e-11)
    # the search parent says the same on its first screen: description and consistent metrics
    parent = client.get_run(res.parent_run_id)
    m, note = parent.data.metrics, parent.data.tags["mlflow.note.content"]
    assert m["confirmed_fitness"] == pytest.approx(res.best_fitness, abs=1e-12)
    assert m["confirmed_fitness_stderr"] == pytest.approx(res.best_stderr, abs=1e-12)
    assert m["inner_steps_total"] == res.inner_steps_spent
    best = max(f for g in res.history for f in g.fitness if f is not None)
    assert m["best_fitness_all_generations"] == pytest.approx(best, rel=1e-11)
    assert f"`{res.best_id}`" in note and f"models:/{cfg.name}-map@best" in note and "fresh seeds" in note
    assert f"#/experiments/{parent.info.experiment_id}/runs/{res.best_run_id}" in note


RUNNER = """
import sys
from mirrorlab.config import load_config
from mirrorlab.search import Search
sys.path.insert(0, sys.argv[2])
import test_search_fitness  # registers the listed_test strategy
Search(load_config(sys.argv[1])).run(resume=False)
"""


def _completed(ckpt: Path) -> int:
    try:
        return int(json.loads(ckpt.read_text())["completed_generations"])
    except (OSError, ValueError, KeyError):  # not written yet, or mid-replace
        return -1


@pytest.mark.slow
def test_kill9_during_confirmation_resumes_to_the_same_registered_map(tmp_path):
    ref = Search(confirm_cfg(tmp_path, "confirm-ref", delay_s=0.05)).run()
    cfg = confirm_cfg(tmp_path, "confirm-killed", delay_s=0.3)
    f = tmp_path / "killed.yaml"
    f.write_text(dump_config(cfg))
    journal = journal_path(Path(cfg.search.checkpoint_dir), 2)  # the confirmation stage's
    ckpt = Path(cfg.search.checkpoint_dir) / "checkpoint.json"
    with killable([sys.executable, "-c", RUNNER, str(f), str(Path(__file__).parent)], cwd=tmp_path) as proc:
        # inside the confirmation stage: its journal has begun and the last generation's checkpoint
        # (written by the recorder's background thread) has landed
        kill9_when(proc, lambda: len(read_journal(journal)) >= 2 and _completed(ckpt) == 2, timeout_s=120,
                   poll_s=0.01)
    assert_killed(proc)
    done = read_journal(journal)
    assert 2 <= len(done) < 12, "the kill must land inside the confirmation stage"
    ck = json.loads((Path(cfg.search.checkpoint_dir) / "checkpoint.json").read_text())
    assert ck["completed_generations"] == 2 and ck["confirmation"] is None
    res = Search(cfg).run(resume=True)
    assert res.best_id == ref.best_id and res.best_fitness == ref.best_fitness
    np.testing.assert_array_equal(res.best_theta, ref.best_theta)
    assert res.confirmation["rows"] == ref.confirmation["rows"]
    assert res.confirmation["reused_jobs"] == len(done)
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri, registry_uri=cfg.tracking.tracking_uri)
    mv = client.get_model_version_by_alias(f"{cfg.name}-map", "best")
    assert float(mv.tags["mirrorlab.fitness"]) == ref.best_fitness and mv.run_id == res.best_run_id
    kids = client.search_runs([client.get_run(res.parent_run_id).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    stages = sorted(r.data.tags["mirrorlab.stage"] for r in kids)
    assert stages == ["confirm"] * 3 + ["search"] * 12  # partial confirm children replaced, none doubled


def test_a_candidate_after_a_baseline_job_trains_with_its_own_coefficient(tmp_path):
    """Regression: a worker that trained the paired baseline (kl_k3 @ 0.04) kept that lambda for the
    next candidate, because a neural space has no coefficient of its own and the trainer kept its
    last one. Every job now gets its full regulariser (map, lambda, estimator) from the builder."""
    from test_search import tiny_cfg

    from mirrorlab.inner import GBMPOEvaluator
    from mirrorlab.records import Job

    cfg = tiny_cfg(tmp_path, "coef-after-baseline", evaluator={"inner_steps": 1, "val_size": 4,
                                                                "baseline": {"name": "kl_k3", "coef": 0.04}})
    ev = GBMPOEvaluator(cfg)
    ev.setup()
    theta = ev.space.initial(1)
    seen = []
    for role in ("baseline", "candidate", "baseline", "candidate"):
        ev.evaluate(Job(0, 0, theta, seed=3, role=role))
        seen.append((role, type(ev.trainer.divergence).__name__, ev.trainer.coef))
    assert seen == [("baseline", "KLK3", 0.04), ("candidate", "NeuralMirrorMap", 1.0)] * 2

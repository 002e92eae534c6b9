"""The landscape probe: variance components against known truths, the plan's arithmetic, the probe
on the analytic evaluator (recovers injected noise), on the real tiny model (every proxy, MLflow),
and its resume after kill -9."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from _helpers import assert_killed, kill9_when, killable
from mlflow import MlflowClient
from test_search import tiny_cfg

from mirrorlab import variance
from mirrorlab.config import config_from_dict, dump_config
from mirrorlab.evaluators import AnalyticEvaluator, confirmation_seeds, generation_seeds
from mirrorlab.journal import read_journal
from mirrorlab.probe import Probe, draw_points, probe_seeds
from mirrorlab.spaces import make_space


# --------------------------------------------------------------------------- variance (pure)
def _table(rng, P, S, sa, sb, se):
    return rng.normal(0, sa, (P, 1)) + rng.normal(0, sb, (1, S)) + rng.normal(0, se, (P, S))


@pytest.mark.parametrize(
    "P,S,sa,sb,se", [(6, 3, 0.02, 0.03, 0.04), (8, 4, 0.0, 0.02, 0.05), (5, 2, 0.05, 0.01, 0.02)]
)
def test_components_intervals_cover_the_truth_at_the_stated_rate(P, S, sa, sb, se):
    """A synthetic random-effects data set with known variances: the 95% intervals of the signal
    variance (MLS), the noise variance (chi-square) and the ICC (F) cover the truth in 95% of 400
    replicates (binomial sd 1.1 points: accept 90-99%), and the estimates are unbiased before clipping."""
    rng = np.random.default_rng(1)
    n = 400
    cover = np.zeros(3)
    noise_est = []
    for _ in range(n):
        c = variance.variance_components(_table(rng, P, S, sa, sb, se))
        cover += [
            c.signal_var_ci[0] <= sa**2 <= c.signal_var_ci[1],
            c.noise_var_ci[0] <= se**2 <= c.noise_var_ci[1],
            c.icc_ci[0] <= sa**2 / (sa**2 + se**2) <= c.icc_ci[1],
        ]
        noise_est.append(c.noise_var)
    rate = cover / n
    assert np.all((rate >= 0.90) & (rate <= 0.99)), rate
    assert abs(np.mean(noise_est) / se**2 - 1) < 0.1  # unbiased: 400 x (P-1)(S-1) df


def test_anova_of_a_hand_table():
    y = np.array([[1.0, 2.0], [3.0, 6.0]])  # rows 1.5, 4.5; cols 2, 4; mean 3
    a = variance.two_way_anova(y)
    assert (a.ms_points, a.ms_seeds) == (9.0, 4.0)
    assert a.ms_resid == pytest.approx(1.0)  # residuals +-0.5
    c = variance.variance_components(y)
    assert c.signal_var == pytest.approx((9 - 1) / 2) and c.noise_var == pytest.approx(1.0)
    assert c.seed_main_var == pytest.approx((4 - 1) / 2)
    with pytest.raises(ValueError, match="missing"):
        variance.two_way_anova(np.array([[1.0, np.nan], [2.0, 3.0]]))


def test_interaction_var_is_the_unshared_sampling_noise():
    rng = np.random.default_rng(0)
    n = 4000
    same = np.tile(rng.random(n) < 0.5, (3, 1)).astype(float)  # every point solves the same problems
    assert variance.interaction_var(same) == 0.0
    indep = (rng.random((3, n)) < 0.5).astype(float)  # independent points: the binomial variance
    assert variance.interaction_var(indep) == pytest.approx(0.25 / n, rel=0.05)


def test_plan_arithmetic_by_hand():
    z = 1.959963984540054 + 0.8416212335729143
    assert variance.seeds_for_difference(0.01, 0.05) == math.ceil(2 * z**2 * 0.01 / 0.0025) == 63
    assert variance.detectable_difference(0.01, 63) <= 0.05 < variance.detectable_difference(0.01, 62)
    assert variance.expected_max_normal(1) == 0.0
    assert variance.expected_max_normal(2) == pytest.approx(1 / math.sqrt(math.pi), rel=1e-6)
    assert variance.expected_max_normal(3) == pytest.approx(1.5 / math.sqrt(math.pi), rel=1e-6)
    assert variance.selection_gain(0.04, 0.0, 2, 1) == pytest.approx(0.2 / math.sqrt(math.pi), rel=1e-6)
    # reliability: equal signal and per-evaluation noise, 1 seed -> sqrt(1/2) of the oracle
    assert variance.selection_gain(0.04, 0.04, 2, 1) == pytest.approx(0.2 / math.sqrt(2 * math.pi), rel=1e-6)
    assert variance.selection_gain(0.0, 0.04, 10, 1) == 0.0
    c = variance.variance_components(np.array([[0.0, 0.1, 0.0], [0.5, 0.6, 0.4], [1.0, 1.1, 1.05]]))
    p = variance.plan(c, budgets=[4], differences=[0.1], val_scale=[1.0], confirm_seeds=3)
    assert p["best_of_n"][0]["draws"] * p["best_of_n"][0]["seeds_per_draw"] <= 4
    assert p["verdict"].startswith("searchable")


# --------------------------------------------------------------------------- the probe
def _analytic_cfg(tmp: Path, points: int = 8, seeds: int = 6, executor: str = "local", **ev) -> object:
    return config_from_dict(
        {
            "name": "probe-analytic",
            "seed": 3,
            "output_dir": str(tmp / "runs"),
            "search": {
                "space": {"kind": "mixture"},
                "evaluator": {
                    "kind": "analytic",
                    "inner_steps": 1,
                    "params": {"function": "sphere", "target": 0.0, "noise": 0.05, **ev},
                },
                "executor": {"kind": executor, "workers": 2 if executor != "local" else 1},
            },
            "probe": {"points": points, "seeds": seeds, "loglik": False},
            "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        }
    )


def test_probe_seeds_are_a_stream_of_their_own():
    mine = set(probe_seeds(0, 8))
    assert len(mine) == 8 and mine == set(probe_seeds(0, 8))
    theirs = {s for g in range(50) for s in generation_seeds(0, g, 8)} | set(confirmation_seeds(0, 8))
    assert not mine & theirs


def test_probe_recovers_injected_noise_and_the_true_signal(tmp_path):
    """Analytic objective plus seeded Gaussian noise 0.05, independent per point and seed: the noise
    interval holds 0.05, the signal interval holds the sd of the noiseless values of the drawn points,
    and the MLflow run carries the components and a description."""
    cfg = _analytic_cfg(tmp_path)
    res = Probe(cfg).run()
    c = res["components"]["fitness"]
    assert c["noise_sd_ci"][0] <= 0.05 <= c["noise_sd_ci"][1]
    ev = AnalyticEvaluator(function="sphere", target=0.0)
    true = [ev.value(p.theta) for p in draw_points(make_space(cfg.search.space, cfg.divergence.coef), cfg)]
    assert c["signal_sd_ci"][0] <= float(np.std(true, ddof=1)) <= c["signal_sd_ci"][1]
    assert c["eval_sd"] is None  # no per-problem scores: eval noise unknown, not invented
    for k in ("signal_sd", "seed_sd", "eval_sd", "noise_sd", "icc", "n_points", "n_seeds", "plan"):
        assert k in res
    assert res["n_points"] == 9 and res["n_seeds"] == 6 and res["jobs_run"] == 54
    on_disk = json.loads((Path(cfg.output_dir) / cfg.name / "probe" / "probe.json").read_text())
    assert on_disk["noise_sd"] == pytest.approx(res["noise_sd"])
    run = MlflowClient(cfg.tracking.tracking_uri).get_run(res["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["mirrorlab.kind"] == "probe"
    assert "Probe of `mixture`" in run.data.tags["mlflow.note.content"]
    assert run.data.metrics["fitness/noise_sd"] == pytest.approx(res["noise_sd"], abs=1e-6)


@pytest.mark.parametrize("executor", ["process", "ray"])
def test_probe_on_the_worker_executors_gives_the_local_numbers(tmp_path, executor):
    import importlib.util

    if executor == "ray" and importlib.util.find_spec("ray") is None:
        pytest.skip("the ray executor needs the ray extra: pip install -e '.[ray]'")
    a = Probe(_analytic_cfg(tmp_path / "a", points=3, seeds=2)).run()
    b = Probe(_analytic_cfg(tmp_path / "b", points=3, seeds=2, executor=executor)).run()
    assert a["tables"] == b["tables"]


RUNNER = """
import sys, torch
torch.set_num_threads(1)
from mirrorlab.config import load_config
from mirrorlab.probe import Probe
Probe(load_config(sys.argv[1])).run(resume=False)
"""


@pytest.mark.slow
def test_probe_resumes_after_kill9_to_the_same_numbers(tmp_path):
    ref = Probe(_analytic_cfg(tmp_path / "ref", points=4, seeds=3)).run()
    cfg = _analytic_cfg(tmp_path / "killed", points=4, seeds=3, delay_s=0.4)
    cfg_file = tmp_path / "probe.yaml"
    cfg_file.write_text(dump_config(cfg))
    journal = Path(cfg.output_dir) / cfg.name / "probe" / "journal.jsonl"
    with killable(
        [sys.executable, "-c", RUNNER, str(cfg_file)],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    ) as proc:
        kill9_when(proc, lambda: len(read_journal(journal)) >= 3, timeout_s=120)
    assert_killed(proc)
    done = len(read_journal(journal))
    assert 3 <= done < 15
    res = Probe(cfg).run(resume=True)
    assert res["jobs_reused"] == done and res["jobs_run"] == 15 - done
    assert res["tables"] == ref["tables"]
    assert res["components"]["fitness"]["noise_var"] == ref["components"]["fitness"]["noise_var"]


@pytest.mark.slow
def test_probe_on_the_tiny_model_measures_every_proxy(tmp_path, capsys):
    """The shortened real probe (what CI runs): tiny model, 2 draws + x0 + the KL baseline on 2
    seeds, 4 inner steps; every proxy measured with its cost and its test correlations; the
    baseline is reported beside the space's points, not decomposed with them."""
    from mirrorlab.cli import main

    cfg = tiny_cfg(
        tmp_path,
        "probe-tiny",
        evaluator={"inner_steps": 4, "val_size": 24, "baseline": {"name": "kl_k3", "coef": 0.04}},
    )
    f = tmp_path / "p.yaml"
    f.write_text(dump_config(cfg))
    rc = main(
        [
            "probe",
            str(f),
            "--set",
            "probe.points=2",
            "--set",
            "probe.seeds=2",
            "--set",
            "probe.sample_k=2",
            "--set",
            "probe.test_size=24",
            "--set",
            "probe.horizons=[2]",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "probe probe-tiny" in printed and "seeds per candidate" in printed
    res = json.loads((Path(cfg.output_dir) / "probe-tiny" / "probe" / "probe.json").read_text())
    comps = res["components"]
    assert set(comps) == {"fitness", "loglik", "expected_reward", "pass_at_k", "val_at_2"}
    for name in ("fitness", "loglik", "expected_reward", "pass_at_k", "val_at_2"):
        assert comps[name]["cost_s"] > 0 and comps[name]["eval_sd"] is not None
        assert "spearman_vs_test_other_seeds" in comps[name]
    assert all(v <= 0 for row in res["tables"]["loglik"] for v in row)  # mean log-probabilities
    assert res["n_points"] == 3 and [p["kind"] for p in res["points"]] == ["init", "draw", "draw", "baseline"]
    assert (Path(cfg.output_dir) / "probe-tiny" / "probe" / "probe.png").stat().st_size > 10_000


def test_reference_loglik_matches_a_full_forward(tiny, task):
    import torch

    from mirrorlab.config import TrainConfig
    from mirrorlab.gbmpo import GBMPOTrainer

    model, tok = tiny
    tr = GBMPOTrainer(model, tok, task, None, TrainConfig(compute_dtype="float32"))
    exs = task.val[:5]
    got = tr.reference_loglik(exs, batch_size=2)
    for ex, g in zip(exs, got, strict=True):
        p = tok(task.prompt(ex, tok), add_special_tokens=False)["input_ids"]
        c = tok(task.reference_completion(ex), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].double(), -1)
        want = float(np.mean([lp[len(p) - 1 + i, t].item() for i, t in enumerate(c)]))
        assert g == pytest.approx(want, abs=1e-4)
    per = tr.sampled_scores(exs, 3)
    assert len(per) == 5 and all(len(r) == 3 and set(r) <= {0.0, 1.0} for r in per)


def test_search_vs_random_prediction_by_hand():
    # d = 1 sd, 10 pairs: the textbook 80.3% (G*Power); no effect: the test's level
    assert variance.paired_t_power(1.0, 1.0, 10) == pytest.approx(0.8031, abs=1e-3)
    assert variance.paired_t_power(0.0, 1.0, 10) == pytest.approx(0.05, abs=1e-9)
    c = variance.variance_components(np.array([[0.0, 0.1, 0.0], [0.5, 0.6, 0.4], [1.0, 1.1, 1.05]]))
    p = variance.search_vs_random_prediction(c, budget=8, search_seeds=5, test_seeds=2)
    assert p["max_effect"] == pytest.approx(p["optimum_gain"] - p["random_expected_gain"])
    assert p["optimum_gain"] == pytest.approx(c.signal_sd * variance.expected_max_normal(64))
    assert p["predicted_positive"] == (p["power_upper_bound"] >= 0.8)
    flat = variance.variance_components(np.array([[0.0, 0.1], [0.1, 0.0], [0.05, 0.05]]))
    assert variance.search_vs_random_prediction(flat, 8, 5, 2)["power_upper_bound"] == 0.0


def test_sample_proxies_by_hand():
    from mirrorlab.inner import sample_proxies

    exp, pas = sample_proxies(
        [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.25, 0.5, 0.0, 0.0]]
    )
    assert exp == [0.5, 0.0, 1.0, 0.1875] and pas == [1.0, 0.0, 1.0, 0.5]


def test_perturbation_draws_are_what_one_es_generation_tries(tmp_path):
    cfg = _analytic_cfg(tmp_path, points=5)
    cfg.probe.draw, cfg.probe.sigma = "perturb", 0.3
    space = make_space(cfg.search.space, cfg.divergence.coef)
    pts = draw_points(space, cfg)
    x0 = space.initial(cfg.seed)
    assert [p.id for p in pts] == ["x0", "p0", "p1", "p2", "p3", "p4"]
    steps = np.array([p.theta - x0 for p in pts[1:]]) / 0.3
    assert np.all(np.abs(steps) < 6) and 0.3 < steps.std() < 3  # standard normal steps, scaled by sigma
    assert [p.id for p in draw_points(space, cfg)] == [p.id for p in pts]  # seeded
    np.testing.assert_array_equal(draw_points(space, cfg)[3].theta, pts[3].theta)


def test_a_constant_table_decomposes_to_nothing_without_contradictions():
    c = variance.variance_components(np.zeros((4, 3)))
    assert c.signal_var == 0.0 and c.noise_var == 0.0 and c.icc == 0.0
    assert math.isnan(c.p_points) and all(math.isnan(x) for x in c.icc_ci)


def test_resume_reuses_only_jobs_run_under_the_same_settings(tmp_path):
    cfg = _analytic_cfg(tmp_path, points=2, seeds=2)
    first = Probe(cfg).run()
    assert first["jobs_run"] == 6
    again = Probe(cfg).run(resume=True)
    assert again["jobs_run"] == 0 and again["tables"] == first["tables"]
    cfg.search.evaluator.inner_steps = 2  # another setting: nothing journalled under it is reused
    changed = Probe(cfg).run(resume=True)
    assert changed["jobs_run"] == 6 and changed["jobs_reused"] == 0

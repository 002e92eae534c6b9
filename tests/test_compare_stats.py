"""Statistics, tables and plots of comparisons (no training): fast, pure checks."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from mirrorlab import plots
from mirrorlab.compare import (
    RunResult,
    mean_std,
    paired_comparison,
    results_text,
    sign_flip_pvalue,
    summarise,
    t_two_sided_pvalue,
)


def test_t_pvalue_matches_tables_and_the_paired_test() -> None:
    # textbook critical values: t_{0.975, 4} = 2.7764, t_{0.995, 9} = 3.2498
    assert t_two_sided_pvalue(2.7764451, 4) == pytest.approx(0.05, abs=1e-6)
    assert t_two_sided_pvalue(-3.2498355, 9) == pytest.approx(0.01, abs=1e-6)
    # the paired comparison's p is scipy's paired t-test on the same pairs
    base, vals = {0: 0.50, 1: 0.52, 2: 0.47, 3: 0.55}, {0: 0.53, 1: 0.56, 2: 0.49, 3: 0.55}
    ref = sps.ttest_rel([vals[s] for s in base], [base[s] for s in base]).pvalue
    assert paired_comparison("m", "b", base, vals).t_pvalue == pytest.approx(ref, rel=1e-9)


def test_t_pvalue_edges() -> None:
    assert t_two_sided_pvalue(0.0, 2) == pytest.approx(1.0)
    assert t_two_sided_pvalue(math.inf, 2) == 0.0
    with pytest.raises(ValueError):
        t_two_sided_pvalue(1.0, 0)


@given(st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=8))
@settings(max_examples=100, deadline=None)
def test_sign_flip_exact_properties(diffs: list[float]) -> None:
    p = sign_flip_pvalue(diffs)
    assert 2 / 2 ** len(diffs) - 1e-12 <= p <= 1.0 or all(d == 0 for d in diffs)
    assert sign_flip_pvalue([-d for d in diffs]) == pytest.approx(p)  # symmetric


def test_sign_flip_known_values_and_monte_carlo() -> None:
    assert sign_flip_pvalue([1.0, 2.0, 3.0]) == pytest.approx(0.25)  # 2 of 8 patterns as extreme
    assert sign_flip_pvalue([1.0, -1.0]) == pytest.approx(1.0)
    big = [1.0] * 20
    p = sign_flip_pvalue(big, max_exact=10, samples=4000)
    assert p < 0.01  # Monte Carlo path: all-positive differences are extreme


def test_paired_comparison_verdicts() -> None:
    base = {0: 0.50, 1: 0.60, 2: 0.55}
    better = {0: 0.60, 1: 0.70, 2: 0.66}
    c = paired_comparison("m", "b", base, better, {0: 5, 1: 5, 2: 5}, {0: 4, 1: 4, 2: 4})
    assert c.exceeds_noise and "exceeds seed noise" in c.verdict and "better" in c.verdict
    assert c.mean_diff == pytest.approx(0.10333, abs=1e-4)
    assert c.t_pvalue == pytest.approx(sps.ttest_rel([0.6, 0.7, 0.66], [0.5, 0.6, 0.55]).pvalue)
    assert c.length_diff == pytest.approx(-1.0)
    noisy = {0: 0.60, 1: 0.50, 2: 0.56}
    c2 = paired_comparison("m", "b", base, noisy)
    assert not c2.exceeds_noise and c2.verdict == "within seed noise"
    one = paired_comparison("m", "b", {0: 0.5}, {0: 0.9})
    assert not one.exceeds_noise and math.isnan(one.stderr)
    same = paired_comparison("m", "b", base, dict(base))
    assert same.t_pvalue == 1.0 and not same.exceeds_noise


def test_mean_std() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([4.0]) == (4.0, 0.0)


def _curve(slope: float) -> list[dict[str, float]]:
    return [{"reward_mean": slope * i} for i in range(5)]


def _runs() -> list[RunResult]:
    out = []
    for s in range(3):
        out.append(RunResult("kl", s, 0.40 + 0.01 * s, 0.02, 6.0, 100, curve=_curve(0.1)))
        out.append(RunResult("l2", s, 0.50 + 0.01 * s, 0.02, 5.0, 100, curve=_curve(0.2)))
    return out


def test_summarise_table_and_json(tmp_path) -> None:
    res = summarise(_runs(), ["kl", "l2"], "kl", "accuracy", "test")
    assert [m.label for m in res.methods] == ["kl", "l2"]
    assert res.methods[1].metric_mean == pytest.approx(0.51)
    assert len(res.comparisons) == 1 and res.comparisons[0].method == "l2"
    text = results_text(res)
    assert "kl" in text and "l2" in text and "accuracy" in text and "exceeds seed noise" in text
    p = res.save(tmp_path / "r.json")
    data = json.loads(p.read_text())  # strict JSON (NaN replaced)
    assert data["baseline"] == "kl" and len(data["runs"]) == 6
    with pytest.raises(ValueError):
        summarise(_runs(), ["kl", "l2"], "nope")


def test_plots_write_pngs(tmp_path) -> None:
    hist = [[0.1, 0.2, None], [0.3, float("nan"), 0.25]]
    st_ = plots.fitness_stats(hist)
    assert st_[0]["failures"] == 1 and st_[1]["best_so_far"] == pytest.approx(0.3)
    paths = [
        plots.plot_fitness(hist, tmp_path / "f.png"),
        plots.plot_fitness({0: [0.1], 3: [0.2]}, tmp_path / "f2.png"),
        plots.plot_lineage([
            {"id": "a", "generation": 0, "fitness": 0.1},
            {"id": "b", "generation": 1, "fitness": 0.3, "parent": "a"},
            {"id": "c", "generation": 1, "fitness": None, "parent": "a", "status": "FAILED"},
        ], tmp_path / "l.png"),
        plots.plot_training_curves({"kl": [[0.1, 0.2], [0.2, 0.3, 0.4]], "l2": [[0.3]]}, tmp_path / "c.png",
                                   smooth=2),
        plots.plot_metric_vs_length({"kl": [(5.0, 0.3), (6.0, 0.4)], "l2": [(4.0, 0.5)]}, tmp_path / "a.png"),
        plots.plot_lineage([], tmp_path / "empty.png"),
        plots.plot_lineage([{"id": "a", "generation": 0, "fitness": 0.1},
                            {"id": "b", "generation": 1, "fitness": 0.3}], tmp_path / "la.png", answer="a"),
    ]
    # the registered answer is starred even when another candidate had a higher search fitness
    cands = [{"id": "a", "generation": 0, "fitness": 0.1}, {"id": "b", "generation": 1, "fitness": 0.3},
             {"id": "c", "generation": 1, "fitness": None, "status": "FAILED"}]
    assert plots.lineage_marks(cands, answer="a") == {"answer": "a", "top": "b"}
    assert plots.lineage_marks(cands, answer="b") == {"answer": "b", "top": None}
    assert plots.lineage_marks(cands) == {"answer": "b", "top": None}
    assert plots.lineage_marks([], answer="a") == {"answer": None, "top": None}
    import matplotlib.image as mpimg

    for p in paths:
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(p)
        assert img.shape[0] > 200 and img.shape[1] > 300, p  # a real figure, not a stub
    # something is drawn: the curves' figure has far more distinct colours than an empty one
    n_colours = lambda p: len({tuple(px) for px in mpimg.imread(p).reshape(-1, 4)[::7]})  # noqa: E731
    assert n_colours(tmp_path / "c.png") > 2 * n_colours(tmp_path / "empty.png")


def test_metric_names_from_task_metrics_are_valid_in_mlflow(tmp_path) -> None:
    """Task metric names such as MBPP's `pass@1` become valid MLflow keys (regression: a real
    `mirrorlab train` on MBPP crashed when logging `val_pass@1`)."""
    from mlflow import MlflowClient

    from mirrorlab.compare import log_single_run
    from mirrorlab.config import config_from_dict
    from mirrorlab.tracking import metric_key

    assert metric_key("val_pass@1") == "val_pass_at_1"
    assert metric_key("a/b c:d-e.f_g") == "a/b c:d-e.f_g"
    assert metric_key("acc%") == "acc_"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config_from_dict({"name": "keys", "tracking": {"tracking_uri": uri}})
    rid = log_single_run(cfg, "train", "keys", {"x": 1}, {"val_pass@1": 0.5},
                         curve=[{"step": 1, "pass@1": 0.25}])
    run = MlflowClient(tracking_uri=uri).get_run(rid)
    assert run.data.metrics["val_pass_at_1"] == 0.5
    assert run.data.metrics["train/pass_at_1"] == 0.25
    # a single run's page opens on its result, and values carry no binary noise in the UI
    assert "| val_pass@1 | 0.5000 |" in run.data.tags["mlflow.note.content"]
    rid = log_single_run(cfg, "eval", "noise", {}, {"val_accuracy": 0.1 + 0.2})  # 0.30000000000000004
    assert MlflowClient(tracking_uri=uri).get_run(rid).data.metrics["val_accuracy"] == 0.3


@pytest.mark.slow
def test_compare_in_worker_processes_gives_the_in_process_numbers(tmp_path):
    """compare.workers = 2 (two spawned workers, 1 thread each) against the in-process loop at
    threads = 1: the same metric, length and curve for every (method, seed), the untrained start
    row, and the duplicate arm reusing its twin's run (tagged same_as) in both modes."""
    from mlflow import MlflowClient

    from mirrorlab.compare import run_compare
    from mirrorlab.config import config_from_dict

    def cfg(workers: int):
        return config_from_dict({
            "name": f"w{workers}", "threads": 1, "output_dir": str(tmp_path / "runs"),
            "task": {"name": "arithmetic", "params": {"n_train": 200, "n_val": 20, "n_test": 30}},
            "train": {"steps": 2, "prompts_per_step": 2,
                      "generation": {"num_generations": 2, "max_new_tokens": 6}},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            "compare": {"seeds": [0, 1], "include_start": True, "workers": workers, "methods": [
                {"label": "KL", "divergence": {"name": "kl_k3", "coef": 0.04}},
                {"label": "L2", "divergence": {"name": "prob_l2", "coef": 1.0}},
                {"label": "KL again", "divergence": {"name": "kl_k3", "coef": 0.04}}]},
        })

    one, two = run_compare(cfg(1), progress=False), run_compare(cfg(2), progress=False)

    keep = ("loss", "pg_loss", "reg_loss", "reward_mean", "div_mean", "grad_norm")  # not the timings

    def key(res):
        return sorted((r.method, r.seed, r.metric, r.mean_length, [[row[k] for k in keep] for row in r.curve])
                      for r in res.runs)

    assert len(two.runs) == 8 and key(one) == key(two)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    kids = client.search_runs([client.get_experiment_by_name("w2").experiment_id],
                              filter_string="tags.`mirrorlab.kind` = 'compare-run'")
    assert len(kids) == 8 and sum(k.data.tags.get("mirrorlab.same_as") == "KL" for k in kids) == 2


def test_compare_result_is_written_back_on_the_registered_maps_version(tmp_path):
    """A compared map that came from the registry (`models:/NAME@ALIAS`) gets the comparison's
    verdict on its model version (tags and a description line); the child runs carry the URI."""
    from mlflow import MlflowClient

    from mirrorlab.compare import CompareTracker, RunResult, summarise
    from mirrorlab.config import config_from_dict

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config_from_dict({"name": "wb", "tracking": {"tracking_uri": uri}})
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("wb-map")
    mv = client.create_model_version("wb-map", source=str(tmp_path), description="found by search X")
    client.set_registered_model_alias("wb-map", "best", mv.version)
    ref = "models:/wb-map@best"
    info = {"KL": {"name": "kl_k3", "coef": 0.04}, "searched": {"name": "neural", "coef": 10.0, "map": ref}}
    runs = [RunResult(m, s, metric, 0.02, 5.0, 100) for s, (a, b) in enumerate([(0.40, 0.45), (0.42, 0.43),
                                                                                  (0.41, 0.47)])
            for m, metric in (("KL", a), ("searched", b))]
    tracker = CompareTracker(cfg)
    parent = tracker.start(cfg)
    for r in runs:
        r.run_id = tracker.log_run(r, info[r.method], "test", "accuracy")
    result = summarise(runs, ["KL", "searched"], "KL", "accuracy", "test", info)
    tracker.finish(result, [])
    v = client.get_model_version("wb-map", mv.version)
    key = f"mirrorlab.compare.{parent}"
    diff = (0.05 + 0.01 + 0.06) / 3
    assert float(v.tags[f"{key}.diff_vs_baseline"]) == pytest.approx(diff, abs=1e-4)
    assert v.tags[f"{key}.baseline"] == "KL" and v.tags["mirrorlab.last_compare_run"] == parent
    assert v.tags[f"{key}.verdict"] == result.comparisons[0].verdict
    assert v.description.startswith("found by search X") and f"Compare run {parent}" in v.description
    child = client.get_run(next(r.run_id for r in runs if r.method == "searched"))
    assert child.data.tags["mirrorlab.map_uri"] == ref and child.data.params["divergence.map"] == ref
    assert "mirrorlab.registry_error" not in client.get_run(parent).data.tags

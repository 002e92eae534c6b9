"""The search (outer loop): pure helpers, the analytic evaluator, and tiny real searches
(tiny model, arithmetic, 2 generations x 4 candidates) checked in a real MLflow sqlite store."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow import MlflowClient

from mirrorlab import divergences
from mirrorlab.config import ConfigError, DivergenceConfig, config_from_dict
from mirrorlab.divergences import MixtureDivergence
from mirrorlab.evaluators import generation_seed, val_subset
from mirrorlab.executors import FAILED, FINISHED
from mirrorlab.journal import append_journal, atomic_write_json, read_journal
from mirrorlab.maps import build_divergence, load_map
from mirrorlab.search import Search
from mirrorlab.spaces import MixtureSpace, load_space_map, make_space
from mirrorlab.spaces import spaces as spaces_registry


def tiny_cfg(tmp: Path, name: str, strategy: str = "openai_es", params: dict | None = None,
             executor: str = "local", evaluator: dict | None = None, plots: bool = False,
             prompts: int = 2, plot_scope: str = "all", **search: Any) -> Any:
    """A tiny real search: tiny model, arithmetic, 2 generations x 4 candidates, 3 inner steps."""
    params = params if params is not None else {"sigma": 1.0}
    ev = {"inner_steps": 3, "val_size": 16, **(evaluator or {})}
    return config_from_dict({
        "name": name, "seed": 0, "output_dir": str(tmp / "runs"),
        "train": {"prompts_per_step": prompts, "generation": {"num_generations": 4, "max_new_tokens": 6},
                  "optim": {"lr": 1e-3}},
        "divergence": {"name": "neural", "coef": 1.0},
        "search": {"space": {"kind": "neural", "init_scale": 1.0},
                   "strategy": {"name": strategy, "population": 4, "generations": 2, "params": params},
                   "evaluator": ev, "executor": {"kind": executor, "workers": 1},
                   "checkpoint_dir": str(tmp / f"ckpt-{name}"), **search},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "plots": plots,
                     "plot_scope": plot_scope},
    })


def children(client: MlflowClient, parent_id: str) -> list[Any]:
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


# --------------------------------------------------------------------------- pure helpers
def test_generation_seed_is_shared_within_and_differs_across_generations():
    assert generation_seed(0, 3) == generation_seed(0, 3)
    assert len({generation_seed(0, g) for g in range(20)}) == 20
    assert generation_seed(0, 1, resample=False) == generation_seed(0, 7, resample=False)
    assert generation_seed(1, 0) != generation_seed(0, 0)
    assert 0 <= generation_seed(5, 5) < 2**31


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 300), size=st.integers(1, 400))
def test_val_subset_is_deterministic_sorted_and_unique(seed, n, size):
    a = val_subset(seed, n, size)
    assert a == val_subset(seed, n, size)
    if size >= n:
        assert a is None
    else:
        assert len(a) == size and a == sorted(set(a)) and 0 <= a[0] and a[-1] < n


def test_journal_ignores_a_torn_last_line_and_atomic_write(tmp_path):
    j = tmp_path / "g.jsonl"
    append_journal(j, {"key": "candidate:0:7", "sha": "a"})
    with j.open("a") as f:
        f.write('{"key": "candidate:1:7", "sh')  # a kill during the second append
    assert list(read_journal(j)) == ["candidate:0:7"]
    p = tmp_path / "ck.json"
    atomic_write_json(p, {"x": 1})
    atomic_write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []


def test_mixture_space_is_a_convex_combination_and_round_trips(tmp_path):
    space = MixtureSpace(init="zeros", base_coef=0.04)
    theta = np.array([1.3, math.log(0.2)])
    div = space.divergence(theta)
    w = 1 / (1 + math.exp(-1.3))
    lp, rp = torch.log(torch.tensor([0.3, 0.01, 0.9])), torch.log(torch.tensor([0.5, 0.02, 0.9]))
    a, b = divergences.get("prob_l2"), divergences.get("neg_entropy")
    want = w * a.sampled(lp, rp) + (1 - w) * b.sampled(lp, rp)
    torch.testing.assert_close(div.sampled(lp, rp), want)
    assert float(div.sampled(lp, rp)[2]) == pytest.approx(0.0, abs=1e-7)
    assert space.coef(theta) == pytest.approx(0.2)
    assert isinstance(divergences.get("mixture", weight=0.3), MixtureDivergence)
    back = load_space_map(space.save(theta, tmp_path / "map"))
    assert back.divergence.weight == pytest.approx(w) and back.coef == pytest.approx(0.2)
    # the searched lambda reaches the trainer through the one builder, whatever divergence.coef says
    reg = build_divergence(DivergenceConfig(name="mixture", coef=0.04, map=str(tmp_path / "map")))
    assert reg.coef == pytest.approx(0.2) and reg.divergence.weight == pytest.approx(w)
    np.testing.assert_allclose(space.initial(0), [0.0, math.log(0.04)])


def test_analytic_search_improves_on_its_start_without_tracking(tmp_path):
    cfg = config_from_dict({
        "name": "analytic", "tracking": {"enabled": False},
        "search": {"space": {"kind": "mixture", "init": "zeros"},
                   "strategy": {"name": "openai_es", "population": 8, "generations": 12,
                                "params": {"sigma": 0.3, "lr": 0.3}},
                   "evaluator": {"kind": "analytic", "params": {"target": 1.0}},
                   "checkpoint_dir": str(tmp_path / "ck")},
    })
    s = Search(cfg)
    start = s.evaluator.value(s.space.initial(0))
    res = s.run()
    assert len(res.history) == 12 and all(st == FINISHED for g in res.history for st in g.status)
    assert res.best_fitness > start + 0.5 * abs(start)  # at least halves the distance to the target
    assert (tmp_path / "ck" / "checkpoint.json").is_file()


def test_local_executor_timeout_is_cooperative_and_failures_get_the_failure_value(tmp_path):
    cfg = config_from_dict({
        "name": "faults", "tracking": {"enabled": False},
        "search": {"space": {"kind": "mixture"},
                   "strategy": {"name": "random", "population": 4, "generations": 1},
                   "evaluator": {"kind": "fault_injection", "timeout_s": 0.3, "failure_value": -7.0,
                                 "params": {"inner": "analytic", "inner_params": {"delay_s": 0.05},
                                            "faults": {"0/1": "raise", "0/2": "nan"}}},
                   "checkpoint_dir": str(tmp_path / "ck")},
    })
    s = Search(cfg)
    s.evaluator.inner.delay_s = 0.05
    s.evaluator.faults["0/3"] = "raise"
    res = s.run()
    g = res.history[0]
    assert g.status == [FINISHED, FAILED, FAILED, FAILED]
    assert "injected failure" in g.errors[1] and "non-finite" in g.errors[2]
    assert g.fitness[1:] == [None, None, None]
    # the strategy was told the failure value, never NaN
    ck = json.loads((tmp_path / "ck" / "checkpoint.json").read_text())
    assert ck["completed_generations"] == 1
    # a too-slow analytic evaluation is stopped at the deadline (cooperative, between slices)
    s2 = Search(cfg.model_copy(deep=True))
    s2.evaluator.faults = {}
    s2.evaluator.inner.delay_s = 5.0
    res2 = s2.run()
    assert all("timeout" in e for e in res2.history[0].errors)
    assert res2.timings["compute_s"] < 4 * 1.5


# --------------------------------------------------------------------------- tiny real searches
@pytest.fixture(scope="module")
def tiny_searches(tmp_path_factory):
    """Run the tiny search once per strategy (openai_es, nevergrad OnePlusOne); share the store."""
    tmp = tmp_path_factory.mktemp("search")
    out = {}
    for strategy, params, scope in (("openai_es", {"sigma": 1.0}, "all"),
                                    ("nevergrad", {"optimizer": "OnePlusOne", "sigma": 1.0}, "incumbents")):
        cfg = tiny_cfg(tmp, f"tiny-{strategy}", strategy, params, plots=True, plot_scope=scope)
        out[strategy] = (cfg, Search(cfg).run())
    return tmp, out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["openai_es", "nevergrad"])
def test_tiny_search_is_fully_recorded_in_mlflow(tiny_searches, strategy):
    tmp, out = tiny_searches
    cfg, res = out[strategy]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name(cfg.name)
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`mirrorlab.kind` = 'search'")
    assert len(parents) == 1 and parents[0].info.run_id == res.parent_run_id
    assert parents[0].info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(res.parent_run_id)}
    assert {"config.yaml", "run_record.json", "search_result.json"} <= arts
    kids = children(client, res.parent_run_id)
    assert len(kids) == 8
    by_id = {r.data.tags["mirrorlab.candidate_id"]: r.info.run_id for r in kids}
    incumbents, best = set(), -math.inf  # children that improved on the incumbent
    for g in res.history:
        fs = [f if f is not None else -math.inf for f in g.fitness]
        i = int(np.argmax(fs))
        if fs[i] > best:
            best = fs[i]
            incumbents.add(by_id[g.ids[i]])
    assert res.best_run_id in incumbents
    seen = set()
    for r in kids:
        t, m = r.data.tags, r.data.metrics
        g, c = int(t["mirrorlab.generation"]), int(t["mirrorlab.candidate"])
        seen.add((g, c))
        assert t["mirrorlab.strategy"] == strategy and t["mirrorlab.status"] == FINISHED
        # structured lineage: the strategy's parent ids, and the parent's run when it is a candidate
        pids = res.history[g].parent_ids[c]
        assert json.loads(t["mirrorlab.parent_ids"]) == pids
        assert t["mirrorlab.parent"] == (pids[0] if pids else res.history[g].notes[c])
        assert t.get("mirrorlab.parent_run") == (by_id.get(pids[0]) if pids else None)
        if strategy == "openai_es":
            assert pids == [f"mean@g{g}"]
        assert m["n_seeds"] == 1 and m["budget_inner_steps"] == 3
        # params and theta descriptors for MLflow's parallel-coordinates view
        assert r.data.params["strategy"] == strategy and r.data.params["inner_steps"] == "3"
        assert m["theta/norm"] > 0 and "theta/mean" in m
        theta_sha = t["mirrorlab.theta_sha"]
        assert len(theta_sha) == 64
        assert 0.0 <= m["fitness"] <= 1.0 and m["fitness_stderr"] >= 0.0 and m["mean_length"] > 0
        hist = client.get_metric_history(r.info.run_id, "train/loss")
        assert sorted(h.step for h in hist) == [1, 2, 3]  # the inner training curve
        names = {a.path for a in client.list_artifacts(r.info.run_id, "map")}
        assert {"map/map.safetensors", "map/map.json"} <= names
        plot = {a.path for a in client.list_artifacts(r.info.run_id, "plot")}
        if strategy == "openai_es":  # plot_scope "all"
            assert plot == {"plot/map.png"}
        else:  # plot_scope "incumbents": only children that became the incumbent, drawn afterwards
            assert plot == ({"plot/map.png"} if r.info.run_id in incumbents else set())
    assert seen == {(g, c) for g in (0, 1) for c in range(4)}
    # generation summaries on the parent, and the per-generation history
    assert len(client.get_metric_history(res.parent_run_id, "best_fitness")) == 2
    assert [len(g.fitness) for g in res.history] == [4, 4]
    assert res.best_fitness == max(f for g in res.history for f in g.fitness)
    # the registered best map resolves and is the incumbent's theta
    assert res.registered_uri == f"models:/{cfg.name}-map@best"
    m = load_map(res.registered_uri, tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}").divergence
    np.testing.assert_array_equal(m.theta, res.best_theta)


@pytest.mark.slow
def test_registered_map_trains_on_another_task(tiny_searches):
    """A map found on arithmetic (default mix) trains a run on a differently parametrised task."""
    from mirrorlab.gbmpo import build_trainer

    tmp, out = tiny_searches
    cfg, res = out["openai_es"]
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    div = load_map(res.registered_uri, tracking_uri=uri).divergence
    other = config_from_dict({
        "task": {"name": "arithmetic", "params": {"seed": 123}},
        "train": {"prompts_per_step": 2, "generation": {"num_generations": 2, "max_new_tokens": 4}},
        "divergence": {"name": "neural", "coef": 1.0, "map": res.registered_uri},
    })
    trainer = build_trainer(other, build_divergence(other.divergence, tracking_uri=uri))
    rows = trainer.train(steps=2)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert trainer.divergence.sha == div.sha
    np.testing.assert_array_equal(trainer.divergence.theta, res.best_theta)
    # a file path works as well as the registry URI
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    local = Path(client.download_artifacts(res.best_run_id, "map", str(tmp / "dl")))
    assert load_map(local / "map.safetensors").divergence.sha == div.sha


@pytest.mark.slow
def test_failures_are_recorded_and_the_search_finishes(tmp_path):
    """raise / NaN / timeout candidates are FAILED in MLflow; the timeout kills the worker process."""
    cfg = tiny_cfg(
        tmp_path, "tiny-faults", executor="process",
        # generous limit: a normal candidate takes ~2 s on a quiet machine but over 8 s on a loaded
        # 2-core CI box; only the injected hang may time out
        evaluator={"kind": "fault_injection", "timeout_s": 25.0, "failure_value": -1.0,
                   "params": {"inner": "gbmpo", "faults": {"0/1": "raise", "0/2": "nan", "0/3": "hang"}}},
    )
    search = Search(cfg)
    res = search.run()
    assert [len(g.status) for g in res.history] == [4, 4]
    errs = [g.errors for g in res.history]  # shown if the statuses are not as planned
    assert res.history[0].status == [FINISHED, FAILED, FAILED, FAILED], errs
    assert res.history[1].status == [FINISHED] * 4, errs
    assert search.executor.restarts == 1  # the hung worker was killed and replaced
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    kids = {(int(r.data.tags["mirrorlab.generation"]), int(r.data.tags["mirrorlab.candidate"])): r
            for r in children(client, res.parent_run_id)}
    assert len(kids) == 8
    errors = {c: kids[(0, c)].data.tags.get("mirrorlab.error", "") for c in (1, 2, 3)}
    assert "injected failure" in errors[1] and "non-finite fitness" in errors[2] and "timeout" in errors[3]
    for c in (1, 2, 3):
        r = kids[(0, c)]
        assert r.data.tags["mirrorlab.status"] == FAILED and r.info.status == "FAILED"
        assert "fitness" not in r.data.metrics  # never silently 0
    assert kids[(0, 0)].data.tags["mirrorlab.status"] == FINISHED
    assert client.get_run(res.parent_run_id).info.status == "FINISHED"


def test_incumbent_is_reevaluated_each_generation_with_that_generations_seed(tmp_path):
    cfg = config_from_dict({
        "name": "incumbent", "tracking": {"enabled": False},
        "search": {"space": {"kind": "mixture"},
                   "strategy": {"name": "random", "population": 3, "generations": 3,
                                "params": {"scale": 0.5}},
                   "evaluator": {"kind": "analytic", "reevaluate_incumbent": True,
                                 "params": {"noise": 0.2}},
                   "checkpoint_dir": str(tmp_path / "ck")},
    })
    s = Search(cfg)
    res = s.run()
    assert [len(g.ids) for g in res.history] == [3, 3, 3]  # re-evaluation is its own job, not a candidate
    h0, h1 = res.history[0], res.history[1]
    assert h0.incumbent_reevaluation is None and h1.incumbent_reevaluation is not None
    inc = h0.incumbent_id
    first = h0.fitness[h0.ids.index(inc)]
    # noisy fitness under generation 1's seed differs from the first evaluation of the same theta
    assert h1.incumbent_reevaluation != first
    if h1.incumbent_id == inc:  # kept: its fitness is the running mean of both evaluations
        assert h1.incumbent_fitness == pytest.approx((first + h1.incumbent_reevaluation) / 2)


def test_unknown_evaluator_is_a_config_error():
    with pytest.raises(ConfigError, match=r"search\.evaluator\.kind: unknown evaluator 'nope'"):
        config_from_dict({"search": {"evaluator": {"kind": "nope"}}})


def test_progress_hooks_are_called_in_order(tmp_path):
    calls: list[tuple] = []

    class Recorder:
        def __getattr__(self, name):
            if not name.startswith("on_"):
                raise AttributeError(name)
            return lambda *a, **kw: calls.append((name, *a[:2]))

    cfg = config_from_dict({
        "name": "hooks", "tracking": {"enabled": False},
        "search": {"space": {"kind": "mixture"},
                   "strategy": {"name": "random", "population": 2, "generations": 2},
                   "evaluator": {"kind": "analytic"}, "checkpoint_dir": str(tmp_path / "ck")},
    })
    s = Search(cfg)
    s.progress = Recorder()
    s.run()
    per_gen = ["on_generation_start", "on_candidate_end", "on_candidate_end", "on_generation_end"]
    assert [c[0] for c in calls] == ["on_search_start"] + per_gen * 2 + ["on_search_end"]
    assert calls[0][1:] == (2, 2)  # generations, population
    assert calls[2][1:] == (0, f"g0-0/s{generation_seed(0, 0)}")


def test_neural_raw_space_is_the_papers_parametrisation(tmp_path):
    """theta is the raw vector (init U[0, 0.01)), any theta maps to a convex map (|theta|), and the
    paper's sigma 0.01 moves raw by ~0.01 (in the softplus space it would move it by ~0.5% of that)."""
    from mirrorlab.spaces import NeuralRawSpace, NeuralSpace

    space = NeuralRawSpace(init="random", init_scale=0.01)
    x0 = space.initial(seed=3)
    np.testing.assert_array_equal(x0, divergences.NeuralMirrorMap.random_init(3, 0.01).raw)
    step = 0.01 * np.random.default_rng(0).standard_normal(x0.size)
    m = space.divergence(x0 + step)
    np.testing.assert_allclose(m.raw, np.abs(x0 + step))
    assert np.median(np.abs(m.raw - x0)) > 3e-3
    soft = NeuralSpace(init="random", init_scale=0.01)
    t0 = soft.initial(seed=3)
    moved = np.abs(soft.divergence(t0 + step).raw - soft.divergence(t0).raw)
    assert np.median(moved) < 1e-4
    y, y0 = torch.rand(64, dtype=torch.float64) * 0.9 + 0.05, torch.rand(64, dtype=torch.float64) * 0.9 + 0.05
    assert bool((m.sampled(torch.log(y), torch.log(y0)) >= 0).all())
    loaded = load_space_map(space.save(x0 + step, tmp_path / "m"))
    np.testing.assert_array_equal(loaded.divergence.raw, m.raw)
    cfg = config_from_dict({"search": {"space": {"kind": "neural_raw"}}})
    assert cfg.search.space.kind == "neural_raw"


@pytest.mark.parametrize("kind", spaces_registry.names())
def test_space_contract(kind, tmp_path):
    """Every registered search space (a new one automatically): seeded initial points of its dim,
    a valid divergence (D(y, y) = 0, D >= 0), a hash, save -> load with the same values and
    coefficient, and pickling (executors ship spaces to workers)."""
    import pickle

    from mirrorlab.config import SpaceConfig

    space = make_space(SpaceConfig(kind=kind), 0.04)
    x, other = space.initial(3), space.initial(4)
    assert x.shape == (space.dim,) and np.array_equal(x, space.initial(3)) and not np.array_equal(x, other)
    assert space.sha(x) == space.sha(x.copy()) != space.sha(other)
    g = torch.Generator().manual_seed(0)
    lp = torch.log(torch.rand(64, generator=g, dtype=torch.float64).clamp_min(1e-4))
    rp = torch.log(torch.rand(64, generator=g, dtype=torch.float64).clamp_min(1e-4))
    d = space.divergence(x)
    assert bool((d.sampled(lp, rp) >= -1e-12).all())
    torch.testing.assert_close(d.sampled(lp, lp), torch.zeros_like(lp), rtol=0, atol=1e-12)
    saved = load_space_map(space.save(x, tmp_path / kind))
    torch.testing.assert_close(saved.divergence.sampled(lp, rp), d.sampled(lp, rp), rtol=0, atol=0)
    assert saved.coef == space.coef(x) and saved.kind == kind
    back = pickle.loads(pickle.dumps(space))
    torch.testing.assert_close(back.divergence(x).sampled(lp, rp), d.sampled(lp, rp), rtol=0, atol=0)

"""The `mirrorlab` command as a real subprocess: bad configs fail early; every subcommand runs.

Config-error tests never load a model. End-to-end tests use the cached `tiny` preset with very
short settings and an MLflow sqlite store in a temporary directory, and check the outputs a
researcher looks at: the printed table, results JSON, PNGs and MLflow runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
# Short inner settings shared by the end-to-end tests (tiny model, a few steps).
SHORT = [
    "train.steps=2", "train.prompts_per_step=2", "train.generation.num_generations=2",
    "train.generation.max_new_tokens=6", "task.params.n_train=200", "task.params.n_val=20",
    "task.params.n_test=20",
]


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}", COLUMNS="200",
               MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    return env


def _cmd(*args: str, sets: list[str] = ()) -> list[str]:
    out = [sys.executable, "-m", "mirrorlab.cli", *args]
    for s in sets:
        out += ["--set", s]
    return out


def run_cli(tmp: Path, *args: str, sets: list[str] = (), timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `mirrorlab ARGS` in `tmp` and return the completed process (text output)."""
    return subprocess.run(_cmd(*args, sets=sets), cwd=tmp, env=_env(tmp), capture_output=True, text=True,
                          timeout=timeout)


# --------------------------------------------------------------------------- bad configs
def _bad_configs(tmp: Path) -> list[tuple[list[str], list[str]]]:
    """(argv, fragments the error must contain) for each kind of bad config."""
    gsm = tmp / "gsm_overlap"
    gsm.mkdir()
    row = {"question": "Tom has 2 apples and buys 3. How many?", "answer": "2+3=5\n#### 5"}
    other = {"question": "What is 7 times 6?", "answer": "#### 42"}
    rows = (row, other, other | {"question": "q3?"})
    (gsm / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (gsm / "test.jsonl").write_text(json.dumps(row) + "\n")
    bad_method = tmp / "bad_method.yaml"
    bad_method.write_text(
        "compare:\n  methods:\n    - {label: a, divergence: {name: kl_k3}}\n"
        "    - {label: b, divergence: {name: not_a_divergence}}\n"
    )
    return [
        (["train", "--set", "train.stepz=3"], ["train.stepz", "unknown key", "steps"]),
        (["train", "--set", "train.steps=many"], ["train.steps", "integer"]),
        (["train", "--set", "divergence.name=nope"],
         ["divergence.name", "unknown divergence 'nope'", "kl_k3"]),
        (["eval", "--set", "task.name=nope"], ["task.name", "unknown task 'nope'", "arithmetic"]),
        (["search", "--set", "search.strategy.name=nope"], ["search.strategy.name", "unknown strategy"]),
        (["compare", str(bad_method)], ["compare.methods.1.divergence.name", "not_a_divergence"]),
        (["train", "--set", "task.name=gsm8k", "--set", f"task.params.path={gsm}",
          "--set", "task.params.n_val=1"], ["task", "overlap"]),
        (["train", "--set", "divergence.params.bogus=1"], ["divergence.params", "bogus", "kl_k3"]),
        (["train", str(tmp / "missing.yaml")], ["not found"]),
        # the quickstart's searched map before any search of it has finished
        (["compare", str(QUICKSTART)], ["compare.methods.4.divergence.map", "search:best", "mirrorlab run"]),
    ]


def test_bad_configs_exit_2_before_training(tmp_path: Path) -> None:
    cases = _bad_configs(tmp_path)
    procs = [subprocess.Popen(_cmd(*argv), cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for argv, _ in cases]
    for (argv, frags), p in zip(cases, procs, strict=True):
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 2, (argv, stdout, stderr)
        msg = " ".join(stderr.split())
        assert "config error" in msg, (argv, stderr)
        for f in frags:
            assert f in msg, (argv, f, stderr)
        assert "Traceback" not in stderr
    assert not (tmp_path / "runs").exists()  # nothing was trained or written
    assert not (tmp_path / "mlflow.db").exists()


def test_help_lists_subcommands(tmp_path: Path) -> None:
    r = run_cli(tmp_path, "--help", timeout=120)
    assert r.returncode == 0
    for c in ("train", "search", "eval", "compare", "maps", "run", "quickstart"):
        assert c in r.stdout


# --------------------------------------------------------------------------- maps (no training)
def test_maps_show_plot_export_import_register(tmp_path: Path, monkeypatch, capsys) -> None:
    """`maps` in process (same `main` as the command; no model, so no subprocess needed)."""
    from mirrorlab.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["maps", "export", "random:3", "--raw", "-o", "m.json"]) == 0
    raw = json.loads((tmp_path / "m.json").read_text())["raw"]
    assert len(raw) == 380 and min(raw) >= 0
    assert main(["maps", "import", "m.json", "-o", "m.safetensors"]) == 0
    capsys.readouterr()
    assert main(["maps", "show", "m.safetensors"]) == 0
    shown = capsys.readouterr().out
    assert "NeuralMirrorMap" in shown and "phi_inv" in shown
    assert main(["maps", "plot", "m.safetensors", "kl_k3", "-o", "maps.png"]) == 0
    assert (tmp_path / "maps.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["maps", "export", "m.safetensors", "-o", "theta.npy"]) == 0
    assert (tmp_path / "theta.npy").is_file()
    capsys.readouterr()
    assert main(["maps", "register", "m.safetensors", "--name", "cli-map", "--alias", "champion"]) == 0
    assert "models:/cli-map@champion" in capsys.readouterr().out
    assert main(["maps", "show", "models:/cli-map@champion"]) == 0
    sha = json.loads((tmp_path / "m.json").read_text())["sha"]
    assert sha[:20] in capsys.readouterr().out.replace("\n", "")
    assert main(["maps", "show", "no_such_map.safetensors"]) == 2
    assert "no_such_map" in capsys.readouterr().err
    assert main(["maps", "import", "m.json", "--theta", "-o", "x.txt"]) == 2  # wrong suffix


# --------------------------------------------------------------------------- end to end (tiny model)
def _mlflow_runs(tmp: Path, experiment: str) -> list:
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    return c.search_runs([exp.experiment_id], max_results=1000)


@pytest.mark.slow
def test_train_then_eval(tmp_path: Path) -> None:
    r = run_cli(tmp_path, "train", sets=[*SHORT, "name=t", "train.eval_size=10"])
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout and "val" in r.stdout
    d = tmp_path / "runs" / "t" / "train"
    res = json.loads((d / "results.json").read_text())
    assert res["n"] == 10 and 0.0 <= res["metric"] <= 1.0 and len(res["curve"]) == 2
    assert list(d.glob("train_*.png")) and (d / "checkpoint").is_dir()
    r = run_cli(tmp_path, "eval", "--checkpoint", str(d / "checkpoint"), "--n", "8",
                sets=[*SHORT, "name=t"])
    assert r.returncode == 0, r.stderr
    ev = json.loads((tmp_path / "runs" / "t" / "eval" / "results.json").read_text())
    assert ev["n"] == 8 and ev["split"] == "test"
    runs = _mlflow_runs(tmp_path, "t")
    kinds = sorted(run.data.tags.get("mirrorlab.kind", "") for run in runs)
    assert kinds == ["eval", "train"]
    assert res["regulariser"]["placement"] == "loss"
    from mlflow import MlflowClient

    train_run = next(run for run in runs if run.data.tags["mirrorlab.kind"] == "train")
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    tables = {f.path for f in c.list_artifacts(train_run.info.run_id, "completions")}
    assert tables == {"completions/step_0001.json", "completions/step_0002.json", "completions/eval_val.json"}


@pytest.mark.slow
def test_compare_two_methods_two_seeds(tmp_path: Path) -> None:
    cfg = tmp_path / "cmp.yaml"
    cfg.write_text(
        "name: cmp\ncompare:\n  seeds: [0, 1]\n  eval_size: 10\n  methods:\n"
        "    - {label: KL, divergence: {name: kl_k3, coef: 0.04}}\n"
        "    - {label: L2, divergence: {name: prob_l2, coef: 1.0}}\n"
    )
    r = run_cli(tmp_path, "compare", str(cfg), sets=SHORT)
    assert r.returncode == 0, r.stderr
    flat = " ".join(r.stdout.split())
    assert "KL" in flat and "L2" in flat and "+-" in flat and ("seed noise" in flat)
    d = tmp_path / "runs" / "cmp" / "compare"
    res = json.loads((d / "results.json").read_text())
    assert len(res["runs"]) == 4 and res["baseline"] == "KL" and res["comparisons"][0]["n"] == 2
    assert (d / "metric_vs_length.png").is_file() and (d / "curves_reward.png").is_file()
    runs = _mlflow_runs(tmp_path, "cmp")
    assert sum(run.data.tags.get("mirrorlab.kind") == "compare-run" for run in runs) == 4
    assert sum(run.data.tags.get("mirrorlab.kind") == "compare" for run in runs) == 1
    parent = next(run for run in runs if run.data.tags.get("mirrorlab.kind") == "compare")
    note = parent.data.tags["mlflow.note.content"]  # the table with its verdicts, on the first screen
    assert "| KL |" in note and "| L2 |" in note and "seed noise" in note
    assert "?workflowType=machine_learning" in r.stdout  # the link that opens MLflow's runs view


@pytest.mark.slow
def test_search_and_resume(tmp_path: Path) -> None:
    sets = [*SHORT, "name=s", "search.strategy.name=openai_es", "search.strategy.population=2",
            "search.strategy.generations=2", "search.evaluator.inner_steps=1", "search.evaluator.val_size=8"]
    r = run_cli(tmp_path, "search", sets=sets)
    assert r.returncode == 0, r.stderr
    d = tmp_path / "runs" / "s" / "search"
    for f in ("fitness.png", "lineage.png", "maps.png", "search.json"):
        assert (d / f).is_file(), f
    summary = json.loads((d / "search.json").read_text())
    assert len(summary["generations"]) == 2 and "gen 1" in r.stderr
    assert (d / "best_map").is_dir()
    r2 = run_cli(tmp_path, "search", "--resume", sets=sets)  # already complete: nothing re-run
    assert r2.returncode == 0, r2.stderr
    assert json.loads((d / "search.json").read_text())["best_fitness"] == summary["best_fitness"]
    # `mirrorlab compare` after the search: `map: search:best` is the map it found
    methods = ('compare.methods=[{"label": "KL", "divergence": {"name": "kl_k3", "coef": 0.04}}, '
               '{"label": "searched", "divergence": {"name": "neural", "map": "search:best"}}]')
    r3 = run_cli(tmp_path, "compare", sets=[*sets, "compare.seeds=[0]", "compare.eval_size=8", methods])
    assert r3.returncode == 0, r3.stderr
    res = json.loads((tmp_path / "runs" / "s" / "compare" / "results.json").read_text())
    searched = next(m for m in res["methods"] if m["label"] == "searched")
    assert searched["divergence"]["map_path"] == str((d / "best_map").resolve())


@pytest.mark.slow
def test_quickstart_shortened(tmp_path: Path) -> None:
    sets = [*SHORT, "search.strategy.population=2", "search.strategy.generations=1",
            "search.evaluator.inner_steps=1", "search.evaluator.val_size=8", "compare.seeds=[0,1]",
            "compare.eval_size=8", "search.evaluator.confirm.val_size=8", "search.executor.workers=1"]
    r = run_cli(tmp_path, "run", str(QUICKSTART), sets=sets)
    assert r.returncode == 0, r.stderr
    flat = " ".join(r.stdout.split())
    for label in ("untrained start", "KL (k3)", "no regulariser (lambda 0)", "ProbL2", "neural (random init)",
                  "neural (searched)", "confirmation"):
        assert label in flat
    d = tmp_path / "runs" / "quickstart"
    res = json.loads((d / "compare" / "results.json").read_text())
    assert len(res["runs"]) == 12 and len(res["comparisons"]) == 5
    search = json.loads((d / "search" / "search.json").read_text())
    assert search["confirmed"] and len(search["confirmation"]["rows"]) == 2  # top 2 re-scored
    assert search["best_fitness"] == next(r["fitness"] for r in search["confirmation"]["rows"]
                                          if r["id"] == search["best_id"])
    searched = next(m for m in res["methods"] if m["label"] == "neural (searched)")
    # the searched map is named by its registry URI (loadable anywhere), its local file beside it
    assert searched["divergence"]["map"] == "models:/quickstart-map@best"
    assert searched["divergence"]["map_path"].endswith("best_map")
    assert (d / "search" / "fitness.png").is_file() and (d / "compare" / "metric_vs_length.png").is_file()
    assert json.loads((d / "run.json").read_text())["wall_s"] > 0


def test_plugin_example_registers_divergence_task_strategy(tmp_path: Path, monkeypatch, capsys) -> None:
    """The documented plugin: its names validate and run (analytic evaluator: no model needed)."""
    from mirrorlab.cli import main

    plugin = str(REPO / "experiments" / "plugins" / "example_plugins.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["-p", plugin, "maps", "show", "quartic"]) == 0
    assert "PotentialDivergence" in capsys.readouterr().out
    assert main(["-p", plugin, "search", "--set", "name=plug", "--set", "task.name=double",
                 "--set", "search.strategy.name=hill_climb", "--set", "search.evaluator.kind=analytic",
                 "--set", "search.strategy.population=3", "--set", "search.strategy.generations=2"]) == 0
    summary = json.loads((tmp_path / "runs" / "plug" / "search" / "search.json").read_text())
    assert len(summary["generations"]) == 2 and summary["best_fitness"] is not None
    assert main(["-p", str(tmp_path / "nope.py"), "maps", "show", "kl_k3"]) == 2
    assert "nope.py" in capsys.readouterr().err


def test_progress_callbacks_record_and_print() -> None:
    """The live displays are plain callbacks: they count failures and print one line per generation."""
    import io

    from rich.console import Console

    from mirrorlab.progress import SearchProgress, TrainProgress

    buf = io.StringIO()
    con = Console(file=buf, width=120)
    with TrainProgress(3, "train", console=con) as tp:
        for s in range(1, 4):
            tp.on_step(s, {"reward_mean": 0.1 * s, "loss": 1.0})
        tp.on_eval(3, {"metric": 0.5})
    assert tp.last["reward_mean"] == pytest.approx(0.3)
    with SearchProgress(console=con) as sp:
        sp.on_search_start(2, 2)
        for g in range(2):
            sp.on_generation_start(g, 2)
            sp.on_candidate_end(g, f"g{g}-0", 0.2 + g, "FINISHED")
            sp.on_candidate_end(g, f"g{g}-1", None, "FAILED")
            sp.on_generation_end(g, 0.2 + g, 0.2 + g, 1)
    assert sp.failures == 2 and sp.best_so_far == pytest.approx(1.2)
    text = buf.getvalue()
    assert "gen 0: best 0.200" in text and "gen 1: best 1.200" in text and "failures 1" in text


def test_lineage_records_resolve_parents() -> None:
    """Structured parent ids: ES perturbations point at the virtual node `mean@gK`, elites at the
    candidate they copy; a real search's strategies produce exactly these."""
    from mirrorlab import strategies
    from mirrorlab.journal import GenerationRecord, lineage_records

    es = strategies.get("gbmpo_es", dim=3, population=6, seed=0, generations=3)
    c0 = es.ask()
    es.tell(c0, [-10.0] * 6)  # the population mean beats -inf: a step
    c1 = es.ask()
    es.tell(c1, [-20.0] * 6)  # worse than the best so far: elites are kept
    c2 = es.ask()

    def rec(g, cands, fits, status):
        n = len(cands)
        return GenerationRecord(
            generation=g, ids=[c.id for c in cands], parent_ids=[list(c.parent_ids) for c in cands],
            notes=[c.note for c in cands], shas=[""] * n, status=status, fitness=fits, stderr=[None] * n,
            n_seeds=[1] * n, budget_steps=[1] * n, errors=[None] * n, best_fitness=None, mean_fitness=None,
            incumbent_id=None, incumbent_fitness=None, incumbent_reevaluation=None, seeds=[0],
            reused_jobs=0, wall_s=0.0, compute_s=0.0)

    hist = [rec(0, c0, [0.3, None] + [0.1] * 4, ["FINISHED", "FAILED"] + ["FINISHED"] * 4),
            rec(1, c1, [0.31] * 6, ["FINISHED"] * 6), rec(2, c2, [0.2] * 6, ["FINISHED"] * 6)]
    recs = {r["id"]: r for r in lineage_records(hist)}
    assert recs["g0-0"]["parent"] == "mean@g0"
    elite = next(c for c in c2 if c.note == "elite")
    assert recs[elite.id]["parent"] == elite.parent_ids[0] and elite.parent_ids[0].startswith("g1-")
    assert recs["g0-1"]["status"] == "FAILED" and recs["g1-1"]["generation"] == 1

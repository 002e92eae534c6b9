"""A comparison journals each finished (method, seed) run as it returns: kill -9 a real `mirrorlab
compare` with two workers, resume it with `--resume`, and get the uninterrupted table's numbers with
the journalled runs reused, not trained again; a changed setting makes a journalled run stale."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pytest
from _helpers import assert_killed, kill9_when, killable, wait_group_gone
from test_cli import _cmd, run_cli

from mirrorlab.compare import JOURNAL, CompareJournal, run_compare
from mirrorlab.config import config_from_dict, dump_config
from mirrorlab.journal import read_journal

KEEP = ("loss", "pg_loss", "reg_loss", "reward_mean", "div_mean", "grad_norm")  # not the timings


def tiny(tmp_path: Path, name: str, workers: int, steps: int = 2) -> dict:
    return {
        "name": name, "threads": 1, "output_dir": str(tmp_path / "runs"),
        "task": {"name": "arithmetic", "params": {"n_train": 200, "n_val": 20, "n_test": 30}},
        "train": {"steps": steps, "prompts_per_step": 2,
                  "generation": {"num_generations": 2, "max_new_tokens": 6}},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "compare": {"seeds": [0, 1, 2], "include_start": True, "workers": workers, "methods": [
            {"label": "KL", "divergence": {"name": "kl_k3", "coef": 0.04}},
            {"label": "L2", "divergence": {"name": "prob_l2", "coef": 1.0}},
            {"label": "KL again", "divergence": {"name": "kl_k3", "coef": 0.04}}]},
    }


def table(runs: list[dict]) -> list:
    """Every run's method, seed, metric, length and training curve (the timings left out)."""
    return sorted((r["method"], r["seed"], r["metric"], r["mean_length"],
                   [[row[k] for k in KEEP] for row in r["curve"]]) for r in runs)


def test_journal_reuses_a_run_only_under_the_same_settings(tmp_path: Path) -> None:
    cfg = config_from_dict(tiny(tmp_path, "j", 1))
    path = tmp_path / JOURNAL
    j = CompareJournal(path, cfg)
    arm = {"metric": 0.25, "stderr": float("nan"), "curve": [{"loss": 1.5}], "start": None}
    j.add('{"name": "kl_k3"}', 3, "KL", arm)
    # resumed under the same settings: the run comes back as it was written (NaN included)
    back = CompareJournal(path, cfg, resume=True).get('{"name": "kl_k3"}', 3)
    assert back is not None and back["metric"] == 0.25 and back["curve"] == [{"loss": 1.5}]
    assert CompareJournal(path, cfg, resume=True).get('{"name": "kl_k3"}', 4) is None  # another seed
    assert CompareJournal(path, cfg, resume=True).get('{"name": "prob_l2"}', 3) is None  # another arm
    # the first method's run must also hold the untrained start (methods reordered: trained again)
    assert CompareJournal(path, cfg, resume=True).get('{"name": "kl_k3"}', 3, need_start=True) is None
    # another training length, or the seed of the config's own train section (compare sets it)
    longer = config_from_dict(tiny(tmp_path, "j", 1, steps=3))
    stale = CompareJournal(path, longer, resume=True)
    assert stale.stale == 1 and stale.get('{"name": "kl_k3"}', 3) is None
    d = tiny(tmp_path, "j", 1)
    reseeded = config_from_dict({**d, "train": {**d["train"], "seed": 9}})
    assert CompareJournal(path, reseeded, resume=True).get('{"name": "kl_k3"}', 3) is not None
    # nor whether the frozen trunk is shared (the same bits, faster): a journal written before the
    # field existed has the same settings digest
    unshared = config_from_dict({**d, "train": {**d["train"], "share_trunk": False}})
    assert CompareJournal(path, unshared, resume=True).get('{"name": "kl_k3"}', 3) is not None
    # without resume the journal starts empty
    assert not CompareJournal(path, cfg).done and not read_journal(path)


@pytest.mark.slow
def test_kill9_compare_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    ref = run_compare(config_from_dict(tiny(tmp_path, "ref", 1)), out_dir=tmp_path / "ref", progress=False)
    ref_runs = json.loads((tmp_path / "ref" / "results.json").read_text())["runs"]
    assert len(ref.runs) == 12  # 3 methods + the start row, 3 seeds

    cfg = config_from_dict(tiny(tmp_path, "killed", 2))
    cfg_file = tmp_path / "killed.yaml"
    cfg_file.write_text(dump_config(cfg))
    out = tmp_path / "runs" / "killed" / "compare"
    journal = out / JOURNAL
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": cfg.tracking.tracking_uri}
    with killable(_cmd("compare", str(cfg_file)), cwd=tmp_path, env=env) as proc:
        kill9_when(proc, lambda: journal.is_file() and bool(read_journal(journal)), timeout_s=300)
        assert wait_group_gone(proc.pid, 60), "workers of the killed compare are still running"
    assert_killed(proc)
    done = read_journal(journal)
    # 6 distinct (regulariser, seed) runs: "KL again" shares KL's
    assert 1 <= len(done) < 6, "the kill must land between the first and the last run"
    assert not (out / "results.json").exists()

    r = run_cli(tmp_path, "compare", str(cfg_file), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"({len(done)} runs reused from the journal)" in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["resumed_runs"] == len(done)
    parent = mlflow.MlflowClient(cfg.tracking.tracking_uri).get_run(res["meta"]["mlflow_run_id"])
    assert parent.data.tags["mirrorlab.resumed_runs"] == str(len(done))
    assert table(res["runs"]) == table(ref_runs)  # each run as without the kill
    assert len(read_journal(journal)) == 6

    # a plain compare (no --resume) starts afresh: nothing reused
    r = run_cli(tmp_path, "compare", str(cfg_file), sets=["compare.seeds=[0]"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reused" not in r.stdout and len(read_journal(journal)) == 2


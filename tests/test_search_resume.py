"""Kill -9 a tiny real search in the middle of a generation, resume it, and get exactly the result
of an uninterrupted run with the same seed (best theta, fitness history, one child per candidate)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from test_search import children, tiny_cfg

from mirrorlab.config import dump_config
from mirrorlab.search import Search, read_journal

RUNNER = """
import sys, torch
torch.set_num_threads(1)
from mirrorlab.config import load_config
from mirrorlab.search import Search
Search(load_config(sys.argv[1])).run(resume=False)
"""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "process"])
def test_kill9_mid_generation_then_resume_matches_uninterrupted(tmp_path, executor):
    # 4 prompts x 4 inner steps, 32 val problems: enough for candidates' fitness to differ
    big = {"evaluator": {"inner_steps": 4, "val_size": 32}, "prompts": 4}
    ref = Search(tiny_cfg(tmp_path, "resume-ref", **big)).run()
    assert len(set(ref.history[0].fitness)) > 1, "candidates should differ for the comparison to bite"

    cfg = tiny_cfg(tmp_path, "resume-killed", executor=executor, **big)
    cfg_file = tmp_path / "killed.yaml"
    cfg_file.write_text(dump_config(cfg))
    ckpt = Path(cfg.search.checkpoint_dir)
    journal = ckpt / "generation_0001.journal.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(cfg_file)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not read_journal(journal) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of generation 1
        proc.wait(30)
        # orphaned process workers notice the closed pipe and exit by themselves (their current
        # candidate finishes first); nothing of the killed search lingers
        end = time.monotonic() + 60
        while _group_alive(proc.pid) and time.monotonic() < end:
            time.sleep(0.1)
        assert not _group_alive(proc.pid), "workers of the killed search are still running"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = read_journal(journal)
    assert 1 <= len(done) < 4, "the kill must land inside generation 1"


    ck = json.loads((ckpt / "checkpoint.json").read_text())
    # generation 0's checkpoint is written in the background after its child runs are logged, so
    # the kill may land before it: then generation 0 is replayed from its own journal
    assert ck["completed_generations"] in (0, 1)
    if ck["completed_generations"] == 0:
        assert (ckpt / "generation_0000.journal.jsonl").is_file()

    res = Search(cfg).run(resume=True)
    np.testing.assert_array_equal(res.best_theta, ref.best_theta)
    assert res.best_fitness == ref.best_fitness
    assert res.fitness_history() == ref.fitness_history()
    assert [g.shas for g in res.history] == [g.shas for g in ref.history]
    assert res.parent_run_id == ck["parent_run_id"]

    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    kids = children(client, res.parent_run_id)
    keys = sorted((int(r.data.tags["mirrorlab.generation"]), int(r.data.tags["mirrorlab.candidate"]))
                  for r in kids)
    assert keys == [(g, c) for g in (0, 1) for c in range(4)]  # partial children replaced, none doubled
    assert all(r.info.status == "FINISHED" for r in kids)
    # jobs journalled before the kill were reused, not re-run
    assert res.history[1].reused_jobs == len(done) and ref.history[1].reused_jobs == 0
    assert res.history[0].reused_jobs == (4 if ck["completed_generations"] == 0 else 0)
    assert client.get_run(res.parent_run_id).info.status == "FINISHED"

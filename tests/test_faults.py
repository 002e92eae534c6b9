"""No data lost under faults: concurrent writers on one sqlite MLflow store, a worker killed from
outside mid-candidate, an output directory that is read-only or full, and a corrupt checkpoint or
journal. Every fault is real: real processes, real SIGKILL, real read-only and full file systems
(tmpfs mounts inside a private mount namespace), real MLflow."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _helpers import assert_killed, kill9_when, killable
from mlflow import MlflowClient
from test_cli import _env

from mirrorlab.config import config_from_dict
from mirrorlab.evaluators import AnalyticEvaluator
from mirrorlab.executors import FAILED, FINISHED, Job, ProcessExecutor, make_executor
from mirrorlab.journal import CheckpointError, journal_path, read_journal
from mirrorlab.search import Search

RAY_MISSING = "the ray executor needs the ray extra: pip install -e '.[ray]'"
needs_ray = pytest.mark.skipif(__import__("importlib").util.find_spec("ray") is None, reason=RAY_MISSING)
CLI = [sys.executable, "-m", "mirrorlab.cli"]


# --------------------------------------------------------------------------- concurrent writers
@pytest.mark.slow
def test_two_searches_and_a_comparison_on_one_new_sqlite_store_lose_no_run(tmp_path):
    """Three processes open the same (new) sqlite store at once: every parent and child run lands.
    (Before the store lock, two of them died in MLflow's schema migration.)"""
    db = tmp_path / "mlflow.db"
    search = {"search": {"strategy": {"name": "openai_es", "population": 8, "generations": 3},
                         "evaluator": {"kind": "analytic", "params": {"delay_s": 0.01}}}}
    compare = {"train": {"steps": 1, "prompts_per_step": 2, "generation": {"num_generations": 2,
                                                                          "max_new_tokens": 4}},
               "task": {"name": "arithmetic", "params": {"n_train": 100, "n_val": 20, "n_test": 20}},
               "compare": {"seeds": [0, 1, 2], "eval_size": 8, "methods": [
                   {"label": "kl", "divergence": {"name": "kl_k3"}},
                   {"label": "l2", "divergence": {"name": "prob_l2"}}]}}
    (tmp_path / "s.yaml").write_text(json.dumps(search))
    (tmp_path / "c.yaml").write_text(json.dumps(compare))
    env = {**_env(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    cmds = [[*CLI, "search", "s.yaml", "--set", "name=s1"], [*CLI, "search", "s.yaml", "--set", "name=s2"],
            [*CLI, "compare", "c.yaml", "--set", "name=cmp"]]
    procs = [subprocess.Popen(c, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in cmds]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    for name, kids in (("s1", 24), ("s2", 24), ("cmp", 6)):
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(parents) == 1 and len(children) == kids, name
        assert all(r.info.status == "FINISHED" for r in runs), name


# --------------------------------------------------------------------------- killed workers
def _kill_when_started(pid_dir: Path, job: Job, timeout_s: float = 600.0) -> threading.Thread:
    """A thread that SIGKILLs the process running `job` as soon as its pid file appears (waiting up
    to `timeout_s`: Ray's start on a 2-core machine busy with other jobs took over 120 s once)."""

    def run() -> None:
        f = pid_dir / f"{job.generation}-{job.index}.pid"
        end = time.monotonic() + timeout_s
        while not f.exists() and time.monotonic() < end:
            time.sleep(0.01)
        os.kill(int(f.read_text()), signal.SIGKILL)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _check_killed_map(outs: list, restarts: int, error_fragment: str) -> None:
    assert outs[0].status == FAILED and error_fragment in (outs[0].error or ""), outs[0].error
    assert [o.status for o in outs[1:]] == [FINISHED] * (len(outs) - 1)  # the others, and the replacement
    assert restarts == 1


def test_process_worker_killed_from_outside_is_failed_and_replaced(tmp_path):
    ev = AnalyticEvaluator(delay_s=0.3, pid_dir=str(tmp_path))
    jobs = [Job(0, i, np.zeros(3), seed=1) for i in range(4)]
    with ProcessExecutor(ev, workers=1) as ex:
        killer = _kill_when_started(tmp_path, jobs[0])
        outs = ex.map(jobs)
        killer.join(5)
        _check_killed_map(outs, ex.restarts, "worker died (exit code -9)")
        assert ex.map([Job(1, 0, np.zeros(3), seed=1)])[0].status == FINISHED  # the pool still works


_LONG_JOB = """
import sys
import numpy as np
from mirrorlab.evaluators import AnalyticEvaluator
from mirrorlab.executors import Job, ProcessExecutor
with ProcessExecutor(AnalyticEvaluator(delay_s=300, pid_dir=sys.argv[1]), workers=1) as ex:
    ex.map([Job(0, 0, np.zeros(3), seed=1)])
"""


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (a container's init may not reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_process_worker_exits_when_its_parent_is_killed_mid_job(tmp_path):
    """SIGKILL of the process that owns the pool (a killed search or compare) ends its workers
    within seconds, not after their current job (here a 300 s one): no orphan trains on."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pid_file = tmp_path / "0-0.pid"
    with killable([sys.executable, "-c", _LONG_JOB, str(tmp_path)], cwd=tmp_path, env=env) as proc:
        kill9_when(proc, pid_file.is_file, timeout_s=120)
        worker = int(pid_file.read_text())
        assert worker != proc.pid
        end = time.monotonic() + 30
        while not _gone(worker) and time.monotonic() < end:
            time.sleep(0.1)
        assert _gone(worker), "the worker outlived its killed parent"
    assert_killed(proc)


@pytest.mark.slow
@needs_ray
def test_ray_worker_killed_from_outside_is_failed_and_replaced(tmp_path):
    ev = AnalyticEvaluator(delay_s=0.3, pid_dir=str(tmp_path))
    jobs = [Job(0, i, np.zeros(3), seed=1) for i in range(4)]
    ex = make_executor("ray", ev, workers=1, num_cpus=1)
    try:
        killer = _kill_when_started(tmp_path, jobs[0])
        outs = ex.map(jobs)
        killer.join(5)
        _check_killed_map(outs, ex.restarts, "ray worker failed")
    finally:
        ex.close()


def test_a_search_records_the_killed_candidate_as_failed(tmp_path):
    """Through the search: the killed candidate is FAILED with the reason in its record and the
    strategy is told `failure_value`; the generation completes."""
    cfg = config_from_dict({
        "name": "killed", "output_dir": str(tmp_path / "runs"), "tracking": {"enabled": False},
        "search": {"strategy": {"name": "openai_es", "population": 4, "generations": 1},
                   "executor": {"kind": "process", "workers": 1},
                   "evaluator": {"kind": "analytic", "params": {"delay_s": 0.3, "pid_dir": str(tmp_path)}},
                   "checkpoint_dir": str(tmp_path / "ck")}})
    killer = _kill_when_started(tmp_path, Job(0, 1, np.zeros(1), seed=0))
    res = Search(cfg).run()
    killer.join(5)
    (g,) = res.history
    assert g.status[1] == FAILED and "worker died" in g.errors[1]
    assert [s for i, s in enumerate(g.status) if i != 1] == [FINISHED] * 3


# --------------------------------------------------------------------------- output directories
def _in_private_mount(tmp_path: Path, options: str, argv: list[str]) -> subprocess.CompletedProcess:
    """Run the CLI with `tmp_path/out` a fresh tmpfs mounted with `options`, in a private mount
    namespace (nothing leaks to the host)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare for a private tmpfs mount")
    out = tmp_path / "out"
    out.mkdir()
    script = f"mount -t tmpfs -o {options} none {out} && exec \"$@\""
    r = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *argv], cwd=tmp_path, env=_env(tmp_path),
                       capture_output=True, text=True, timeout=300)
    if "mount:" in r.stderr and "permission denied" in r.stderr.lower():
        pytest.skip(f"tmpfs mounts not permitted here: {r.stderr.strip()}")
    return r


@pytest.mark.parametrize(("options", "fragment"), [("ro,size=1m", "Read-only file system"),
                                                   ("size=64k", "MB free")], ids=["read-only", "full"])
def test_unwritable_output_directory_fails_before_training(tmp_path, options, fragment):
    r = _in_private_mount(tmp_path, options, [*CLI, "train", "--set", f"output_dir={tmp_path / 'out'}"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert "output_dir:" in r.stderr and str(tmp_path / "out") in r.stderr and fragment in r.stderr
    assert "Traceback" not in r.stderr and "step" not in r.stdout  # refused before any model work


# --------------------------------------------------------------------------- corrupt checkpoints
def _analytic_search(tmp_path: Path, generations: int = 2) -> object:
    return config_from_dict({
        "name": "ck", "output_dir": str(tmp_path / "runs"), "tracking": {"enabled": False},
        "search": {"strategy": {"name": "openai_es", "population": 4, "generations": generations},
                   "evaluator": {"kind": "analytic"}, "checkpoint_dir": str(tmp_path / "ck")}})


def _corruptions(raw: str) -> dict[str, str]:
    ck = json.loads(raw)
    edited = dict(ck, steps_spent=ck["steps_spent"] + 1)  # a plausible edit, with the old sha256
    other = dict(ck, version=2)
    return {"truncated": raw[: len(raw) // 2], "edited": json.dumps(edited),
            "other version": json.dumps(other), "not json": "\x00\x01garbage", "empty": ""}


@pytest.mark.parametrize("kind", list(_corruptions('{"steps_spent": 0}')))
def test_corrupt_checkpoint_is_refused_and_nothing_is_loaded(tmp_path, kind):
    cfg = _analytic_search(tmp_path)
    Search(cfg).run()
    path = Path(cfg.search.checkpoint_dir) / "checkpoint.json"
    path.write_text(_corruptions(path.read_text())[kind])
    s = Search(cfg)
    fresh = json.dumps(s.strategy.state_dict())
    with pytest.raises(CheckpointError, match=str(path).replace(".", r"\.")):
        s.run(resume=True)
    assert s.history == [] and s.incumbent is None and json.dumps(s.strategy.state_dict()) == fresh
    # the CLI says so in one line and exits 2 (no traceback)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.model_dump(mode="json")))
    r = subprocess.run([*CLI, "search", str(cfg_file), "--resume"], cwd=tmp_path, env=_env(tmp_path),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "cannot resume" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_journal_torn_last_line_is_dropped_but_an_edited_line_is_refused(tmp_path, caplog):
    cfg = _analytic_search(tmp_path, generations=1)
    s = Search(cfg)
    s.run()
    j = journal_path(Path(cfg.search.checkpoint_dir), 5)
    rec = s.recorder
    from mirrorlab.records import Outcome

    for i in range(3):
        rec.journal(5, f"candidate:{i}:7", f"sha{i}", Outcome(5, i, FINISHED, fitness=0.1 * i))
    good = read_journal(j)
    assert sorted(good) == ["candidate:0:7", "candidate:1:7", "candidate:2:7"]
    lines = j.read_text().splitlines(keepends=True)
    j.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # a kill during the last append
    assert sorted(read_journal(j)) == ["candidate:0:7", "candidate:1:7"]
    assert "torn last line" in caplog.text
    e = json.loads(lines[1])
    e["outcome"]["fitness"] = 9.0  # edited
    j.write_text(lines[0] + json.dumps(e) + "\n")
    with pytest.raises(CheckpointError, match="line 2: entry does not match its sha256"):
        read_journal(j)
    j.write_text(lines[0] + "not json\n" + lines[2])
    with pytest.raises(CheckpointError, match="line 2: not a journal entry"):
        read_journal(j)

"""Executors: `process` and `local` agree on results and order; the `ray` executor on a real local
Ray instance (2 CPUs) runs the tiny real search to completion."""

from __future__ import annotations

import importlib.util
import os
import time

import numpy as np
import pytest
from mlflow import MlflowClient
from test_search import children, tiny_cfg

from mirrorlab.evaluators import AnalyticEvaluator
from mirrorlab.executors import FAILED, FINISHED, Job, LocalExecutor, ProcessExecutor, make_executor
from mirrorlab.search import Search

RAY_MISSING = "the ray executor needs the ray extra: pip install -e '.[ray]'"
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason=RAY_MISSING)


def _jobs(n: int) -> list[Job]:
    rng = np.random.default_rng(0)
    return [Job(0, i, rng.normal(size=5), seed=11) for i in range(n)]


def test_process_executor_matches_local_and_keeps_job_order():
    ev = AnalyticEvaluator(noise=0.1, delay_s=0.01)
    with LocalExecutor(ev) as ex:
        local = ex.map(_jobs(6))
    seen = []
    with ProcessExecutor(ev, workers=2) as ex:
        proc = ex.map(_jobs(6), on_result=lambda j, o: seen.append(j.index))
        assert len({o.worker for o in proc}) == 2  # both workers took jobs
        again = ex.map(_jobs(2))  # workers are long-lived: reused, not restarted
        assert ex.restarts == 0
    assert sorted(seen) == list(range(6))
    assert [o.index for o in proc] == list(range(6))
    assert [o.fitness for o in proc] == [o.fitness for o in local]
    assert [o.fitness for o in again] == [o.fitness for o in local[:2]]
    assert all(o.status == FINISHED and o.stderr == 0.1 for o in proc)


def test_make_executor_rejects_unknown_kind():
    with pytest.raises(ValueError, match="allowed: local, process, ray"):
        make_executor("threads", AnalyticEvaluator())


@pytest.mark.slow
@needs_ray
def test_ray_executor_runs_the_tiny_search(tmp_path):
    cfg = tiny_cfg(tmp_path, "tiny-ray", executor="ray")
    cfg.search.executor.workers = 2
    cfg.search.executor.cpus_per_worker = 1.0

    class BothReady(Search):
        """Waits for both actors' set-up before the first generation, so both take a candidate.

        Without it an actor takes work as soon as its own set-up is done, and on a loaded machine
        the first one can finish all 8 tiny candidates before the second has imported torch
        (CI: one worker seen); that scheduling is right, but it makes "two workers ran" a race."""

        def _make_executor(self):
            ex = super()._make_executor()
            ex.start()
            return ex

    search = BothReady(cfg)
    res = search.run()
    assert [g.status for g in res.history] == [[FINISHED] * 4] * 2
    workers = {r.data.tags["mirrorlab.worker"] for r in children(MlflowClient(cfg.tracking.tracking_uri),
                                                                    res.parent_run_id)}
    assert all(w.startswith("ray-") for w in workers) and len(workers) == 2
    import ray

    assert not ray.is_initialized()  # the executor started a local instance and shut it down
    # same numbers as the local executor (same seeds, same inner runs)
    ref = Search(tiny_cfg(tmp_path, "tiny-ray-ref")).run()
    assert res.fitness_history() == ref.fitness_history()
    np.testing.assert_array_equal(res.best_theta, ref.best_theta)


_HEAD = """
import sys, ray
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
print(ray.get_runtime_context().gcs_address, ray.get_runtime_context().get_node_id(), flush=True)
sys.stdin.read()  # the cluster lives until the test closes our stdin
ray.shutdown()
"""


@pytest.mark.slow
@needs_ray
def test_ray_executor_joins_a_running_cluster_and_leaves_it_up(tmp_path):
    """A separate driver owns a real 2-CPU Ray cluster; the search joins it by address."""
    import subprocess
    import sys

    import ray

    head = subprocess.Popen([sys.executable, "-c", _HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        address, node_id = head.stdout.readline().split()
        # candidate 0/1 raises, 0/2 hangs until the 4 s limit: its actor is killed and replaced
        # (setting up while the other actor goes on); generation 1 runs on the new actor too
        faults = {"kind": "fault_injection", "timeout_s": 4.0, "failure_value": -9.0,
                  "params": {"inner": "analytic", "inner_params": {"delay_s": 0.2},
                             "faults": {"0/1": "raise", "0/2": "hang"}}}
        cfg = tiny_cfg(tmp_path, "ray-join", evaluator=faults, executor="ray")
        cfg.search.executor.workers = 2
        cfg.search.executor.ray_address = address
        search = Search(cfg)
        res = search.run()
        assert [g.status for g in res.history] == [[FINISHED, FAILED, FAILED, FINISHED], [FINISHED] * 4]
        assert "injected failure" in res.history[0].errors[1] and "timeout" in res.history[0].errors[2]
        assert search.executor.restarts == 1
        assert not ray.is_initialized()  # the executor disconnected its driver
        ray.init(address=address, log_to_driver=False)
        try:  # the cluster is still up, and it is the head's (one node, 2 CPUs), not a new one
            assert [n["NodeID"] for n in ray.nodes() if n["Alive"]] == [node_id]
            assert ray.cluster_resources()["CPU"] == 2
        finally:
            ray.shutdown()
    finally:
        head.stdin.close()
        head.wait(60)
    assert head.returncode == 0


class EnvEvaluator:
    """Reports the worker's CUDA_VISIBLE_DEVICES as its fitness (spawned workers import this module)."""

    def setup(self) -> None:
        """Nothing to load."""

    def evaluate(self, job: Job) -> dict:
        """The pinned device id, as a number."""
        return {"fitness": float(os.environ["CUDA_VISIBLE_DEVICES"])}


def test_process_workers_are_pinned_one_gpu_each(monkeypatch):
    """CUDA_VISIBLE_DEVICES is set per worker before it starts, round-robin over the visible ids;
    the search process's own environment is left as it was."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with ProcessExecutor(EnvEvaluator(), workers=3) as ex:
        outs = ex.map([Job(0, i, np.zeros(2), seed=0) for i in range(3)])
        pinned = {ex._workers[s].proc.pid: ex._env(s)["CUDA_VISIBLE_DEVICES"] for s in range(3)}
    assert all(o.status == FINISHED for o in outs)
    assert sorted(pinned.values()) == ["3", "3", "5"]
    for o in outs:  # what each worker saw is what it was pinned to
        assert str(int(o.fitness)) == pinned[int(o.worker.split("-")[1])]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"


class GatedEvaluator(EnvEvaluator):
    """The worker pinned to `slow` cannot finish set-up until `gate` exists (at most 60 s)."""

    def __init__(self, gate: str, slow: str) -> None:
        self.gate, self.slow = gate, slow

    def setup(self) -> None:
        """Block the slow worker's set-up on the gate file."""
        if os.environ["CUDA_VISIBLE_DEVICES"] == self.slow:
            end = time.monotonic() + 60
            while not os.path.exists(self.gate) and time.monotonic() < end:
                time.sleep(0.05)


def test_process_workers_take_jobs_as_soon_as_they_are_ready(tmp_path, monkeypatch):
    """No start-up barrier: while worker "1" is still setting up, worker "0" runs every job."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    gate = tmp_path / "gate"
    ex = ProcessExecutor(GatedEvaluator(str(gate), slow="1"), workers=2)
    try:
        outs = ex.map([Job(0, i, np.zeros(2), seed=0) for i in range(4)])
        assert [o.fitness for o in outs] == [0.0] * 4 and all(o.status == FINISHED for o in outs)
        assert not ex._workers[1].ready
        gate.touch()  # now the slow worker comes up and takes its share
        ex.start()
        assert all(w.ready for w in ex._workers.values())
    finally:
        gate.touch()
        ex.close()


class BrokenSetupEvaluator(EnvEvaluator):
    """Its set-up fails, as a worker whose node lacks the model would."""

    def setup(self) -> None:
        """Fail loudly."""
        raise FileNotFoundError("no model at /nowhere")


@pytest.mark.parametrize("kind", ["process", pytest.param("ray", marks=[pytest.mark.slow, needs_ray])])
def test_a_worker_whose_setup_fails_stops_the_map_with_the_reason(kind):
    """A set-up failure would fail every candidate: it is raised, not recorded per candidate."""
    ex = make_executor(kind, BrokenSetupEvaluator(), workers=1, num_cpus=1)
    try:
        with pytest.raises(RuntimeError,
                           match="(?s)failed to set up the evaluator.*FileNotFoundError: no model at"):
            ex.map([Job(0, 0, np.zeros(2), seed=0)])
    finally:
        ex.close()

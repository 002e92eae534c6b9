"""Executors: `process` and `local` agree on results and order; the `ray` executor on a real local
Ray instance (2 CPUs) runs the tiny real search to completion."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow import MlflowClient
from test_search import children, tiny_cfg

from mirrorlab.executors import FINISHED, Job, LocalExecutor, ProcessExecutor, make_executor
from mirrorlab.search import AnalyticEvaluator, Search


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
def test_ray_executor_runs_the_tiny_search(tmp_path):
    cfg = tiny_cfg(tmp_path, "tiny-ray", executor="ray")
    cfg.search.executor.workers = 2
    cfg.search.executor.cpus_per_worker = 1.0
    search = Search(cfg)
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

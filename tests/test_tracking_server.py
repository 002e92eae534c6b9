"""The tiny search against a real `mlflow server` on loopback (sqlite backend, proxied artifacts),
started by the test on a free port and stopped afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from mlflow import MlflowClient
from test_search import children, tiny_cfg

from mirrorlab.maps import load_map
from mirrorlab.search import Search


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed in the finaliser
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (tmp_path / "server.log").read_text()[-3000:]
                raise RuntimeError("mlflow server did not start:\n" + tail)
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
    assert proc.returncode is not None


@pytest.mark.slow
def test_tiny_search_against_a_real_mlflow_server(tmp_path, mlflow_server):
    cfg = tiny_cfg(tmp_path, "tiny-server")
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"tracking_uri": mlflow_server})})
    res = Search(cfg).run()
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("tiny-server")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`mirrorlab.kind` = 'search'")
    assert [p.info.run_id for p in parents] == [res.parent_run_id]
    kids = children(client, res.parent_run_id)
    assert len(kids) == 8
    for r in kids:
        t = r.data.tags
        want = {"mirrorlab.generation", "mirrorlab.candidate", "mirrorlab.parent", "mirrorlab.theta_sha"}
        assert want <= set(t)
        assert t["mirrorlab.status"] == "FINISHED"
        assert {"fitness", "fitness_stderr"} <= set(r.data.metrics)
        assert "map/map.safetensors" in {a.path for a in client.list_artifacts(r.info.run_id, "map")}
    # artifacts went through the server into its artifact store, and the alias resolves remotely
    assert any((tmp_path / "server-artifacts").rglob("map.safetensors"))
    m = load_map(res.registered_uri, tracking_uri=mlflow_server).divergence
    np.testing.assert_array_equal(m.theta, res.best_theta)

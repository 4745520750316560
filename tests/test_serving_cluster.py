"""``coinfer serve --address`` against a cluster started with ``ray start --head`` on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from coinfer import Bundle, Code, build_model, encode

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ARCH = {"name": "mlp", "kwargs": {"in_features": 8, "hidden": [8], "num_classes": 3}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM, wait_s: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    models = [build_model(ARCH) for _ in range(2)]
    code = Code(2, 1)
    coded = encode(models, code, torch.randn(16, 8), method="average")
    path = tmp_path_factory.mktemp("cluster-bundle")
    Bundle(ARCH, code, models, list(coded), (8,), None, coded.info).save(path)
    return path


def test_serve_joins_a_cluster_started_with_ray_start_head(bundle_dir, tmp_path):
    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    gcs_port = _free_port()
    # Ray 2.60's `ray start` turns on token authentication; head and driver must agree on it
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--num-cpus=2",
            "--include-dashboard=false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    serve = None
    try:
        port, admin_port = _free_port(), _free_port()
        coinfer = str(Path(sys.executable).parent / "coinfer")
        log = open(tmp_path / "serve.log", "w")
        time.sleep(3)  # let the head's GCS come up before joining
        serve = subprocess.Popen(
            [
                coinfer,
                "serve",
                str(bundle_dir),
                f"--address=127.0.0.1:{gcs_port}",
                f"--port={port}",
                f"--admin-port={admin_port}",
                "--no-baselines",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, (
                "server did not come up: " + (tmp_path / "serve.log").read_text()[-3000:]
            )
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
        reply = httpx.post(url + "/v1/predict", json={"inputs": x.tolist()}, timeout=30).json()
        want = Bundle.load(bundle_dir).predict(torch.from_numpy(x), [0, 1])
        for j, out in enumerate(reply["outputs"]):
            if not out["reconstructed"]:  # a decoded output of the untrained "average" parity may differ
                np.testing.assert_allclose(out["probabilities"], want[j].numpy(), atol=1e-5)
        assert httpx.get(url + "/v1/models").json()["n"] == 3
    finally:
        if serve is not None:
            _stop(serve, signal.SIGINT)
            assert serve.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
        _stop(head)
        # `ray start` records the cluster for later `ray.init()` calls; forget ours once it is gone
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip().endswith(f":{gcs_port}"):
            current.unlink()

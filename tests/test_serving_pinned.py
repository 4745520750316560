"""Pinned workers on a real local Ray: a bundle changed on disk after the server
verified it is refused by the restarted worker, which stays down with the
reason, while the other workers keep answering (its output reconstructed)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from coinfer import Bundle, Code, build_model, encode

from .conftest import init_local_ray

ARCH = {"name": "mlp", "kwargs": {"in_features": 16, "hidden": [8], "num_classes": 5}}


@pytest.fixture
def server(tmp_path):
    ray = pytest.importorskip("ray")
    from coinfer.serving.runtime import ServeConfig
    from coinfer.serving.server import serve_bundle

    torch.manual_seed(0)
    models = [build_model(ARCH) for _ in range(2)]
    coded = encode(models, Code(2, 1), torch.randn(32, 16), method="average")
    path = Bundle(ARCH, Code(2, 1), models, list(coded), (16,)).save(tmp_path / "bundle")
    init_local_ray(3)
    try:
        with serve_bundle(ServeConfig(path, timeout_s=3.0, baselines=False)) as srv:
            yield srv, path
    finally:
        ray.shutdown()


@pytest.mark.ray
def test_a_worker_restarted_on_a_changed_bundle_refuses_it_and_stays_down(server):
    from coinfer import Client
    from coinfer.serving.client import AdminClient, ServerError

    srv, path = server
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    b = Bundle.load(path)
    outs = b.predict(torch.from_numpy(x))
    want = [outs[0], outs[1]]
    # what the frontend must answer for model 0 with worker 0 down: decoded from workers 1 and 2
    decoded0 = b.code.decode({1: outs[1], 2: outs[2]}, project=True)[0].numpy()
    original = (path / "data_0.safetensors").read_bytes()
    # the bundle changes on disk: data_0 now holds model 1 (valid weights, the wrong model)
    shutil.copyfile(path / "data_1.safetensors", path / "data_0.safetensors")
    admin = AdminClient(srv.admin_url)
    with Client(srv.url) as client:
        admin.kill(0)
        with pytest.raises(ServerError) as ei:
            admin.restart(0)
        assert ei.value.status == 409 and ei.value.reason == "worker_refused"
        assert "sha256 mismatch" in ei.value.detail and "data_0.safetensors" in ei.value.detail
        down = {w["worker"]: w["down"] for w in admin.state()["workers"]}
        assert "sha256 mismatch" in down[0] and down[1] is None and down[2] is None
        assert srv.runtime.pool.addresses(0) == []  # kept down: no process of worker 0 left running
        assert client.health()["down"] == [0]
        for _ in range(3):
            reply = client.predict(x)
            assert reply["outputs"][0]["reconstructed"] and not reply["outputs"][1]["reconstructed"]
            np.testing.assert_allclose(reply["outputs"][1]["probabilities"], want[1].numpy(), atol=1e-5)
            # decoded from the verified model 1 and parity, not served by the swapped file
            np.testing.assert_allclose(reply["outputs"][0]["probabilities"], decoded0, atol=1e-5)
        # the operator puts the verified file back: restart redeploys the worker, pinned as before
        (path / "data_0.safetensors").write_bytes(original)
        assert admin.restart(0)["worker"] == 0
        reply = client.predict(x, mode="uncoded")  # needs worker 0 (coded mode may not wait for it)
        assert not reply["outputs"][0]["reconstructed"]
        np.testing.assert_allclose(reply["outputs"][0]["probabilities"], want[0].numpy(), atol=1e-5)
    admin.close()

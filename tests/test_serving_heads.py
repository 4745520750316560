"""A heads parity end to end: encode -> save -> load -> serve over HTTP ->
kill a data worker -> the reconstructed answers agree with the killed model
at the rate measured offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coinfer import Bundle, Code, encode

from .conftest import digits_specialists, init_local_ray

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def specialists(tmp_path_factory):
    arch, models, ds, calib = digits_specialists()
    code = Code(2, 1)
    coded = encode(models, code, calib, method="heads", trunk="average")
    path = tmp_path_factory.mktemp("heads-bundle")
    Bundle(arch, code, models, list(coded), (64,), ds.class_names, coded.info).save(path)
    return path, ds.x_test.numpy().astype(np.float32)


def test_heads_bundle_served_with_a_killed_worker_reconstructs_at_the_offline_rate(specialists):
    ray = pytest.importorskip("ray")
    from coinfer import Client
    from coinfer.serving.client import AdminClient
    from coinfer.serving.runtime import ServeConfig
    from coinfer.serving.server import serve_bundle

    path, x = specialists
    b = Bundle.load(path)
    assert b.manifest["parities"][0]["kind"] == "heads"
    with torch.no_grad():
        xt = torch.from_numpy(x)
        probs = b.predict(xt)
        offline = b.code.decode({1: probs[1], 2: probs[2]})[0].argmax(-1).numpy()
        truth = probs[0].argmax(-1).numpy()
    offline_rate = float((offline == truth).mean())
    assert offline_rate > 0.9

    init_local_ray(4)
    try:
        srv = serve_bundle(ServeConfig(path, timeout_s=5.0, max_batch=64, max_body_bytes=2_000_000))
    except BaseException:
        ray.shutdown()
        raise
    try:
        admin = AdminClient(srv.admin_url)
        with Client(srv.url) as client:
            admin.kill(0)
            served = []
            for s in range(0, len(x), 60):
                reply = client.predict(x[s : s + 60])
                out0 = reply["outputs"][0]
                assert out0["reconstructed"]
                served.extend(out0["top1"])
            served = np.array(served)
        admin.close()
    finally:
        srv.close()
        ray.shutdown()
    # the served reconstruction is the offline one (same parity, same decoder)
    assert float((served == offline).mean()) > 0.995
    assert abs(float((served == truth).mean()) - offline_rate) < 0.005

"""End to end on a real local Ray instance: HTTP round trip, killed workers,
malformed requests, modes, injection, metrics. One server for the module."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import torch

from coinfer import Bundle, Code, build_model, encode

from .conftest import local_ray_server

pytestmark = pytest.mark.ray

ARCH = {"name": "mlp", "kwargs": {"in_features": 64, "hidden": [16], "num_classes": 10}}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    torch.manual_seed(0)
    models = [build_model(ARCH) for _ in range(2)]
    code = Code(2, 1)
    calib = torch.randn(64, 64)
    coded = encode(models, code, calib, method="average")
    names = [f"c{i}" for i in range(10)]
    path = tmp_path_factory.mktemp("bundle")
    Bundle(ARCH, code, models, list(coded), (64,), names, coded.info).save(path)
    return path


@pytest.fixture(scope="module")
def server(bundle_dir):
    with local_ray_server(bundle_dir, timeout_s=3.0, max_batch=64, max_body_bytes=200_000) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from coinfer import Client

    with Client(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def admin(server):
    from coinfer.serving.client import AdminClient

    a = AdminClient(server.admin_url)
    yield a
    a.close()


@pytest.fixture
def restore(server, admin):
    """Bring every killed worker back and clear injections after a test."""
    yield
    admin.clear()
    for w in list(server.runtime.down):
        admin.restart(w)


def _expected(bundle_dir, x):
    b = Bundle.load(bundle_dir)
    return b.predict(torch.from_numpy(x), range(b.code.k))


def test_round_trip_through_http_matches_the_models(client, bundle_dir):
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    reply = client.predict(x)
    want = _expected(bundle_dir, x)
    assert reply["batch"] == 5 and len(reply["outputs"]) == 2
    for j, out in enumerate(reply["outputs"]):
        p = np.array(out["probabilities"])
        assert p.shape == (5, 10)
        # received outputs are exact; a reconstructed one is decoded from the average parity
        if not out["reconstructed"]:
            np.testing.assert_allclose(p, want[j].numpy(), atol=1e-5)
        assert out["labels"] == [f"c{t}" for t in out["top1"]]
    assert client.predict(x[0].tolist(), binary=False)["batch"] == 1


def test_models_health_and_openapi(client, server):
    info = client.models()
    assert (info["k"], info["r"], info["n"]) == (2, 1, 3)
    assert info["input_shape"] == [64] and info["class_names"][0] == "c0"
    assert [w["kind"] for w in info["workers"]] == ["data", "data", "coded", "replica"]
    assert client.health()["status"] == "ok"
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/predict" in spec["paths"] and "requestBody" in spec["paths"]["/v1/predict"]["post"]


@pytest.mark.parametrize("mode", ["coded", "uncoded", "replicated", "hedged"])
def test_every_mode_answers_with_the_models_outputs(client, bundle_dir, mode):
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    reply = client.predict(x, mode=mode)
    assert reply["mode"] == mode
    want = _expected(bundle_dir, x)
    for j, out in enumerate(reply["outputs"]):
        if not out["reconstructed"]:
            np.testing.assert_allclose(np.array(out["probabilities"]), want[j].numpy(), atol=1e-5)
    if mode != "coded":
        assert not any(o["reconstructed"] for o in reply["outputs"])
        assert "2" not in reply["workers"]["used"]  # the coded worker is not asked


@pytest.mark.parametrize(
    "content,status,words",
    [
        (b"{bad json", 400, "not valid JSON"),
        (b'{"npy": "%%%"}', 400, "not valid base64"),
        (b'{"inputs": [[1, 2, 3]]}', 422, "expected (B, 64)"),
        (b'{"inputs": [["a", "b"]]}', 422, "dtype"),
        (("{" + '"inputs": [[' + ",".join(["NaN"] * 64) + "]]}").encode(), 422, "NaN"),
        (
            b'{"inputs": [' + b",".join([b"[" + b",".join([b"0"] * 64) + b"]"] * 65) + b"]}",
            413,
            "limit of 64",
        ),
        (b'{"inputs": [' + b"1.0," * 60000 + b"1.0]}", 413, "larger than the limit"),
        (b'{"inputs": [' + b",".join([b"0"] * 64) + b'], "mode": "fastest"}', 422, "mode must be one of"),
    ],
)
def test_malformed_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_answering(
    server, client, content, status, words
):
    resp = httpx.post(
        server.url + "/v1/predict", content=content, headers={"content-type": "application/json"}
    )
    assert resp.status_code == status, resp.text
    assert words in resp.json()["detail"]
    assert client.predict(np.zeros((1, 64), dtype=np.float32))["batch"] == 1


def test_a_killed_worker_leaves_every_request_of_a_burst_answered_and_reconstructed(
    server, client, admin, restore
):
    from coinfer.serving.loadgen import run_load, summarize

    killed = admin.kill(0)
    assert killed["killed_replicas"] == 1
    assert client.health()["down"] == [0]
    x = np.random.default_rng(3).standard_normal((16, 64)).astype(np.float32)
    res = run_load(server.url, x, rate=100, requests=60, duration_s=5, mode="coded", k=2)
    s = summarize(res)
    assert s["answered"] == s["sent"] == len(res.status)
    assert res.reconstructed_outputs[:, 0].all() and not res.reconstructed_outputs[:, 1].any()
    assert "coinfer_worker_failures_total" in client.metrics()
    # the replicated mode also survives it; uncoded cannot and says which worker is missing
    assert client.predict(x[:1], mode="replicated")["batch"] == 1
    resp = httpx.post(server.url + "/v1/predict", json={"inputs": x[:1].tolist(), "mode": "uncoded"})
    assert resp.status_code == 503 and "workers [0]" in resp.json()["detail"]


def test_more_than_r_killed_workers_give_a_prompt_clear_error(server, client, admin, restore):
    from coinfer.serving.client import ServerError

    admin.kill(0)
    admin.kill(2)
    t0 = time.perf_counter()
    with pytest.raises(ServerError) as ei:
        client.predict(np.zeros((1, 64), dtype=np.float32))
    assert time.perf_counter() - t0 < 2.0  # well under the 3 s request timeout
    assert ei.value.status == 503 and ei.value.reason == "no_decodable_set"
    assert "workers [0, 2]" in ei.value.detail and "killed" in ei.value.detail
    assert client.health()["status"] == "degraded"


def test_restart_brings_a_killed_worker_back(server, client, admin):
    admin.kill(1)
    info = admin.restart(1)
    assert info["worker"] == 1 and 1 not in server.runtime.down
    reply = client.predict(np.zeros((1, 64), dtype=np.float32), mode="uncoded")
    assert not any(o["reconstructed"] for o in reply["outputs"])


def test_a_slow_worker_is_decoded_around_and_timeouts_name_the_silent_workers(server, client, admin, restore):
    admin.inject([0], kind="constant", ms=400)
    x = np.zeros((1, 64), dtype=np.float32)
    t0 = time.perf_counter()
    reply = client.predict(x, mode="coded")
    assert time.perf_counter() - t0 < 0.35
    assert reply["outputs"][0]["reconstructed"] and reply["workers"]["late"] == [0]
    admin.config(timeout_s=0.15)
    try:
        resp = httpx.post(server.url + "/v1/predict", json={"inputs": x.tolist(), "mode": "uncoded"})
        assert resp.status_code == 504 and "workers [0] did not answer" in resp.json()["detail"]
    finally:
        admin.config(timeout_s=3.0)
    assert 'coinfer_timeouts_total{mode="uncoded"} 1' in client.metrics()


def test_injected_failures_are_survived_in_coded_mode(client, admin, restore):
    admin.inject([1], fail_prob=1.0)
    for _ in range(5):
        reply = client.predict(np.zeros((2, 64), dtype=np.float32))
        assert reply["outputs"][1]["reconstructed"]
        if "1" in reply["workers"]["failed"]:
            assert reply["workers"]["failed"]["1"].startswith("InjectedFailure: injected failure in worker 1")
    deadline = time.time() + 5
    while 'coinfer_worker_failures_total{worker="1"}' not in client.metrics():
        assert time.time() < deadline, "worker 1's failures are not in /metrics"
        time.sleep(0.1)


def test_admin_api_refuses_non_loopback_clients(server):
    from fastapi.testclient import TestClient

    from coinfer.serving.app import build_admin_app

    tc = TestClient(build_admin_app(server.runtime), client=("10.1.2.3", 5000))
    assert tc.get("/admin/state").status_code == 403
    assert httpx.get(server.admin_url + "/admin/state").status_code == 200


def test_a_burst_of_1000_concurrent_requests_is_answered_200_or_503_and_the_server_stays_healthy(
    server, client
):
    import json

    from coinfer.serving.client import encode_npy
    from coinfer.serving.loadgen import burst

    body = {"npy": encode_npy(np.zeros((1, 64), dtype=np.float32)), "return_probabilities": False}
    limit = server.runtime.config.inflight_limit
    replies = burst(server.url, json.dumps(body).encode(), 1000, timeout_s=60.0)
    codes = [r.status for r in replies]
    assert set(codes) <= {200, 503}, sorted(set(codes))
    shed = [r for r in replies if r.status == 503]
    assert shed and codes.count(200) >= limit  # at least one full window was admitted
    assert all(r.error == "overloaded" and r.retry_after == "1" for r in shed)
    assert f"coinfer_overloaded_total {float(len(shed))}" in client.metrics()
    assert client.health()["status"] == "ok"
    assert client.predict(np.zeros((1, 64), dtype=np.float32))["batch"] == 1


def test_healthz_turns_degraded_when_recent_failures_leave_no_decodable_set_and_recovers(
    server, client, admin, restore
):
    from coinfer.serving.client import ServerError

    x = np.zeros((1, 64), dtype=np.float32)
    admin.inject([0, 1], fail_prob=1.0)
    for _ in range(4):
        with pytest.raises(ServerError) as ei:
            client.predict(x)
        assert ei.value.reason == "no_decodable_set"
    health = httpx.get(server.url + "/healthz")
    assert health.status_code == 503
    rep = health.json()
    assert rep["status"] == "degraded" and rep["failing"] == [0, 1] and rep["down"] == []
    assert "injected failure in worker 1" in rep["unavailable"]["1"]
    admin.clear()
    for _ in range(3):
        assert client.predict(x)["batch"] == 1
    assert httpx.get(server.url + "/healthz").json()["status"] == "ok"


def test_worker_outputs_that_are_not_probabilities_get_a_502_never_a_200(server, client, admin):
    # finite but huge inputs overflow inside the models: data model 1 answers NaN (the other
    # two saturate to one-hot vectors); a 200 must never carry it
    x = np.full((1, 64), 3e38, dtype=np.float32)
    replies = {}
    for mode in ("coded", "uncoded"):
        resp = httpx.post(server.url + "/v1/predict", json={"inputs": x.tolist(), "mode": mode})
        body = replies[mode] = resp.json()
        if resp.status_code == 200:
            p = np.array([o["probabilities"] for o in body["outputs"]])
            assert np.isfinite(p).all() and np.allclose(p.sum(-1), 1, atol=1e-3)
            assert any(r.startswith("bad_output: non-finite") for r in body["workers"]["failed"].values())
        else:
            assert resp.status_code == 502 and body["error"] == "bad_worker_output", body
            assert "bad_output: non-finite values" in body["detail"]
    # uncoded mode has nothing to decode from: the NaN data row gives the 502
    assert replies["uncoded"]["error"] == "bad_worker_output"
    assert replies["uncoded"]["failed"] == {"1": "bad_output: non-finite values (10 of 10)"}
    assert client.predict(np.zeros((1, 64), dtype=np.float32))["outputs"][0]["probabilities"] is not None


def test_decode_slack_is_set_through_the_admin_api_and_late_calls_are_cancelled(
    server, client, admin, restore
):
    assert admin.config(decode_slack="auto")["decode_slack"] == "auto"
    resp = httpx.post(server.admin_url + "/admin/config", json={"decode_slack": "soon"})
    assert resp.status_code == 422 and "decode slack must be 'auto' or milliseconds" in resp.json()["detail"]
    admin.inject([0], kind="constant", ms=300)
    try:
        admin.config(decode_slack=100)
        t0 = time.perf_counter()
        reply = client.predict(np.zeros((1, 64), dtype=np.float32), mode="coded")
        assert 0.09 < time.perf_counter() - t0 < 0.29  # waited the 100 ms slack, not the 300 ms worker
        assert reply["outputs"][0]["reconstructed"] and reply["workers"]["late"] == [0]
    finally:
        admin.config(decode_slack="auto")
    assert 'coinfer_worker_cancelled_total{worker="0"}' in client.metrics()


def test_a_worker_sigkilled_under_a_paced_load_loses_no_request(server, client, admin, restore):
    import threading

    from coinfer.serving.loadgen import run_load, summarize

    x = np.random.default_rng(4).standard_normal((8, 64)).astype(np.float32)
    out = {}
    load = threading.Thread(
        target=lambda: out.update(res=run_load(server.url, x, rate=40, requests=120, duration_s=6, k=2))
    )
    load.start()
    time.sleep(1.0)  # mid-load
    assert admin.kill(0)["killed_replicas"] == 1
    load.join(60)
    s = summarize(out["res"])
    assert s["answered"] == s["sent"] == 120, s
    assert out["res"].reconstructed_outputs[-20:, 0].all()  # after the kill: decoded from the parity

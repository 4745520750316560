"""Admission (load shedding), the worker-health tracker and /healthz, without Ray:
the app runs on a Runtime whose predict is replaced by a fake, over ASGI."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import torch

from coinfer.errors import CoinferError
from coinfer.serving.app import build_app
from coinfer.serving.collector import CollectError, Collection
from coinfer.serving.runtime import Runtime, ServeConfig, WorkerHealth

from .conftest import offline_runtime


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _runtime(tmp_path, **config) -> Runtime:
    return offline_runtime(tmp_path, class_names=[f"c{i}" for i in range(3)], **config)


def test_tracker_flags_a_worker_after_threshold_consecutive_failures_and_one_answer_clears_it():
    clock = Clock()
    h = WorkerHealth(threshold=3, window_s=10.0, clock=clock)
    h.success(0)
    h.failure(0, "InjectedFailure: boom")
    h.failure(0, "InjectedFailure: boom")
    assert h.failing() == {}  # two failures after an answer: not yet
    h.failure(0, "TimeoutError: no answer")
    assert list(h.failing()) == [0] and "latest: TimeoutError: no answer" in h.failing()[0]
    h.success(0)
    assert h.failing() == {}
    for _ in range(3):
        h.failure(1, "x")
    assert list(h.failing()) == [1]
    clock.t += 11.0  # the failures are no longer recent
    assert h.failing() == {}
    for _ in range(3):
        h.failure(2, "x")
    h.forget(2)
    assert h.failing() == {}
    with pytest.raises(CoinferError):
        WorkerHealth(threshold=0)


def _record(rt: Runtime, answered=(), failed=None, silent=()) -> None:
    """One request's accounting: workers that answered, failed (worker: reason), or were silent at a timeout."""
    import time

    from coinfer.serving.collector import CollectTimeout

    exc = (CollectTimeout if silent else CollectError)("no decodable set", failed or {}, list(silent))
    exc.latency_s = {w: 0.001 for w in answered}
    rt._account("coded", 1, time.perf_counter(), exc)


def test_health_report_is_degraded_when_the_usable_workers_cannot_decode(tmp_path):
    rt = _runtime(tmp_path)
    assert rt.health_report()["status"] == "ok"
    for _ in range(3):
        _record(rt, failed={0: "InjectedFailure: injected failure in worker 0"})
    rep = rt.health_report()
    assert rep["status"] == "ok" and rep["failing"] == [0] and rep["usable_rows"] == [1, 2]
    for _ in range(3):
        _record(rt, (2,), {1: "InjectedFailure: injected failure in worker 1"})
    rep = rt.health_report()
    assert rep["status"] == "degraded" and rep["failing"] == [0, 1]
    assert set(rep["unavailable"]) == {"0", "1"} and "worker 1" in rep["unavailable"]["1"]
    _record(rt, (0, 1))  # one answer each clears them
    assert rt.health_report()["status"] == "ok"
    # killed workers count too; a worker silent at a timeout is a failure
    rt.down[2] = "killed"
    for _ in range(3):
        _record(rt, silent=(1,))
    rep = rt.health_report()
    assert rep["status"] == "degraded" and rep["down"] == [2]
    assert rep["unavailable"]["2"] == "down (killed)" and "timeout" in rep["unavailable"]["1"]


def test_inflight_limit_default_and_validation(tmp_path):
    assert ServeConfig(tmp_path).inflight_limit == 64
    assert ServeConfig(tmp_path, max_batch_size=8, replicas=3).inflight_limit == 48
    assert ServeConfig(tmp_path, max_inflight=5).inflight_limit == 5
    with pytest.raises(CoinferError, match="max_inflight"):
        ServeConfig(tmp_path, max_inflight=0)
    # body readers: by default 4 x the admission bound, so slow senders cannot fill it
    assert ServeConfig(tmp_path).body_reader_limit == 256
    assert ServeConfig(tmp_path, max_inflight=5).body_reader_limit == 20
    assert ServeConfig(tmp_path, max_inflight=5, max_body_readers=3).body_reader_limit == 3
    for bad in (0, -1, 2.5, True):
        with pytest.raises(CoinferError, match="max_body_readers must be an integer >= 1"):
            ServeConfig(tmp_path, max_body_readers=bad)


def _gated_runtime(tmp_path, limit: int) -> tuple[Runtime, asyncio.Event]:
    rt = _runtime(tmp_path, max_inflight=limit)
    gate = asyncio.Event()
    outputs = torch.softmax(torch.randn(2, 1, 3, generator=torch.Generator().manual_seed(0)), -1)

    async def predict(x: np.ndarray, mode: str | None = None) -> Collection:
        await gate.wait()
        if x[0, 0] < 0:  # a request whose workers all fail
            raise CollectError("cannot decode: workers [0, 1] failed", {0: "boom", 1: "boom"}, [2])
        return Collection(outputs, [False, True], {0: 0, 2: 2}, {0: 0.001, 2: 0.001}, {1: "boom"}, [], [])

    rt.predict = predict  # type: ignore[method-assign]
    return rt, gate


def test_requests_over_the_inflight_limit_get_a_fast_503_with_retry_after(tmp_path):
    async def main() -> None:
        rt, gate = _gated_runtime(tmp_path, limit=3)
        transport = httpx.ASGITransport(app=build_app(rt))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            body = {"inputs": [0.0, 1.0, 2.0, 3.0]}
            held = [asyncio.ensure_future(client.post("/v1/predict", json=body)) for _ in range(3)]
            await asyncio.sleep(0.05)  # the three are admitted and wait at the gate
            shed = await asyncio.gather(*(client.post("/v1/predict", json=body) for _ in range(5)))
            for resp in shed:
                assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
                assert resp.json()["error"] == "overloaded" and resp.json()["limit"] == 3
            gate.set()
            for resp in await asyncio.gather(*held):
                assert resp.status_code == 200
                reply = resp.json()
                assert reply["outputs"][1]["reconstructed"] and reply["outputs"][0]["labels"][0][0] == "c"
                assert reply["workers"] == {"used": {"0": 0, "2": 2}, "failed": {"1": "boom"}, "late": []}
            # the slots are free again, also after an error reply
            bad = await client.post("/v1/predict", json={"inputs": [-1.0, 0.0, 0.0, 0.0]})
            assert bad.status_code == 503 and bad.json()["error"] == "no_decodable_set"
            resps = await asyncio.gather(*(client.post("/v1/predict", json=body) for _ in range(3)))
            assert [r.status_code for r in resps] == [200] * 3
            assert "coinfer_overloaded_total 5" in (await client.get("/metrics")).text

    asyncio.run(main())


def test_the_predict_reply_keeps_its_openapi_schema(tmp_path):
    rt, _ = _gated_runtime(tmp_path, limit=3)
    spec = build_app(rt).openapi()
    op = spec["paths"]["/v1/predict"]["post"]
    schema = op["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/PredictResponse"}
    assert "overloaded" in op["responses"]["503"]["description"]


def test_a_default_mode_that_needs_missing_replicas_is_refused_at_start(tmp_path):
    from coinfer.errors import CoinferError

    with pytest.raises(CoinferError, match="needs the baseline replicas"):
        _runtime(tmp_path, mode="hedged", baselines=False)


def test_only_coded_mode_feeds_cancelled_calls_to_the_decode_slack_tracker(tmp_path):
    rt = _runtime(tmp_path)
    cancelled = CollectError("cut off", {}, [])
    cancelled.cancelled_s = {0: 0.005}
    for _ in range(30):  # a data worker cut off because its replica answered first
        rt._account("replicated", 1, 0.0, cancelled)
    assert 0 not in rt.latency.snapshot()
    for _ in range(30):  # cut off by the decode slack: a lower bound of its latency
        rt._account("coded", 1, 0.0, cancelled)
    assert rt.latency.snapshot()[0]["samples"] == 30


def test_while_degraded_a_request_gives_up_after_the_degraded_timeout_not_the_full_one(tmp_path):
    """More than r workers slow: once health says no decodable set can be formed, requests
    still go out (so a recovery is noticed) but answer 503 within degraded_timeout_s."""
    rt = _runtime(tmp_path, timeout_s=1.5, degraded_timeout_s=0.2)
    silent: list[asyncio.Future] = []

    def never_answers(w, x, inject=True):
        fut = asyncio.get_running_loop().create_future()
        silent.append(fut)
        return fut

    rt._call = never_answers
    for _ in range(3):  # workers 0 and 1 timed out three times: failing, so degraded
        _record(rt, silent=(0, 1))
    assert rt.health_report()["status"] == "degraded"

    async def one() -> float:
        t0 = time.perf_counter()
        with pytest.raises(CollectError) as ei:
            await rt.predict(np.zeros((1, 4), np.float32))
        elapsed = time.perf_counter() - t0
        assert not isinstance(ei.value, CollectTimeout)  # a 503 no_decodable_set, not a 504
        assert "degraded" in str(ei.value) and "0.2s degraded timeout" in str(ei.value)
        # the calls go on (a slow but recovered worker may still answer) up to the full timeout
        assert not any(f.cancelled() for f in silent)
        await asyncio.sleep(1.5)
        return elapsed

    import time

    from coinfer.serving.collector import CollectTimeout

    assert asyncio.run(one()) < 1.0
    assert len(silent) == 3  # every worker was still asked
    assert all(f.cancelled() for f in silent)  # and cancelled at the full request timeout


def test_settings_are_checked_by_one_validator_at_start_and_at_run_time(tmp_path):
    with pytest.raises(CoinferError, match="hedge_ms must be >= 0"):
        ServeConfig(tmp_path, hedge_ms=-5)
    rt = _runtime(tmp_path)
    with pytest.raises(CoinferError, match="hedge_ms must be >= 0"):
        rt.configure(hedge_ms=-5)
    with pytest.raises(CoinferError, match="timeout_s must be > 0"):
        rt.configure(mode="uncoded", timeout_s=0)
    assert rt.mode == "coded"  # nothing changed: all or none
    rt.configure(mode="uncoded", decode_slack="12")
    assert rt.mode == "uncoded" and rt.decode_slack == 12.0

"""Review of the degraded path and the worker's queue accounting (i14-review2), without Ray."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from coinfer.serving.collector import CollectError, CollectTimeout
from coinfer.serving.runtime import Runtime

from .conftest import offline_runtime


def _runtime(tmp_path, **config) -> Runtime:
    return offline_runtime(tmp_path, **config)


def _degrade(rt: Runtime) -> None:
    for _ in range(3):  # workers 0 and 1 did not answer three requests in time
        rt._account("coded", 1, time.perf_counter(), CollectTimeout("no decodable set", {}, [0, 1]), 5.0)
    assert rt.health_report()["status"] == "degraded"


def _answers_in(seconds: float):
    def call(w, x, inject=True):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        p = np.full((len(x), 3), 1 / 3, np.float32)
        loop.call_later(seconds, lambda: fut.done() or fut.set_result(p))
        return fut

    return call


def _cancelled_count(rt: Runtime, w: int) -> float:
    v = rt.metrics.registry.get_sample_value("coinfer_worker_cancelled_total", {"worker": str(w)})
    return v or 0.0


def test_a_degraded_call_that_runs_on_is_neither_counted_cancelled_nor_fed_twice_to_the_tracker(tmp_path):
    """While degraded, a request gives up after 0.2 s but its calls run on and answer at 0.3 s.
    Each call is one call: it was not cancelled (the worker answered it), and the decode-slack
    tracker gets its one latency (0.3 s), not also the 0.2 s lower bound of a cut-off call
    (which makes a slow worker look faster than it is)."""
    rt = _runtime(tmp_path, timeout_s=5.0, degraded_timeout_s=0.2)
    _degrade(rt)
    rt._call = _answers_in(0.3)

    async def main() -> None:
        try:
            await rt.predict(np.zeros((1, 4), np.float32))
        except CollectError:
            pass
        await asyncio.sleep(0.3)

    asyncio.run(main())
    snap = rt.latency.snapshot()
    for w in (0, 1, 2):
        assert snap[w]["samples"] == 1, (w, snap)
        assert snap[w]["median_s"] >= 0.29, (w, snap)
        assert _cancelled_count(rt, w) == 0, w


def test_a_degraded_call_cut_off_at_the_full_timeout_still_counts_as_cancelled(tmp_path):
    rt = _runtime(tmp_path, timeout_s=0.4, degraded_timeout_s=0.1)
    _degrade(rt)
    rt._call = _answers_in(10.0)

    async def main() -> None:
        try:
            await rt.predict(np.zeros((1, 4), np.float32))
        except CollectError:
            pass
        await asyncio.sleep(0.45)

    asyncio.run(main())
    for w in (0, 1, 2):
        assert _cancelled_count(rt, w) == 1, w
    assert rt.latency.snapshot()[0]["samples"] == 1  # coded: the time it ran, a lower bound


def test_a_late_answer_to_a_degraded_request_that_was_cancelled_is_still_recorded(tmp_path):
    """The request's task is cancelled (e.g. the server stops, a caller's wait_for) while its
    calls run on: their answers arrive later and are recorded like any late answer."""
    rt = _runtime(tmp_path, timeout_s=5.0, degraded_timeout_s=0.2)
    _degrade(rt)
    rt._call = _answers_in(0.15)

    async def main() -> None:
        task = asyncio.ensure_future(rt.predict(np.zeros((1, 4), np.float32)))
        await asyncio.sleep(0.05)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        await asyncio.sleep(0.2)

    asyncio.run(main())
    assert rt.health_report()["status"] == "ok"
    assert set(rt.latency.snapshot()) == {0, 1, 2}


def test_cancelled_and_abandoned_queued_calls_stop_counting_against_the_worker_queue_bound():
    """Calls cancelled (CANCEL) or left by a closed connection while a long batch runs are
    dropped: they must not keep counting as queued rows until the batch ends, or the
    worker refuses live calls as 'overloaded' for a queue that holds nothing to run (the
    frontend cancels stragglers' calls at exactly the workers that are slow)."""
    import numpy as np

    from coinfer.serving.channel import Channel
    from coinfer.serving.worker import INLINE_ROWS, WorkerServer

    shape = (3, 2)

    def slow(x):
        time.sleep(0.3)
        return np.full((len(x), 2), 0.5, np.float32)

    async def main():
        srv = WorkerServer(slow, shape, max_rows=64)
        host, port = await srv.start("127.0.0.1")
        ch, other = Channel(host, port, 1 << 20), Channel(host, port, 1 << 20)
        blocker = await ch._connect() and ch.submit(np.zeros((INLINE_ROWS + 1, *shape), np.float32))
        await asyncio.sleep(0.05)  # the model thread runs it
        srv.max_queued_rows = 2
        a = ch.submit(np.zeros((1, *shape), np.float32))
        await other._connect()
        b = other.submit(np.zeros((1, *shape), np.float32))
        await asyncio.sleep(0.02)  # both queued
        a.cancel()
        await other.aclose()
        await asyncio.sleep(0.02)  # the CANCEL and the close reached the worker
        try:
            live = await ch.call(np.zeros((1, *shape), np.float32))
        finally:
            await blocker
            await ch.aclose()
            await srv.close()
        assert "WorkerLost" in str(b.exception())  # its channel closed
        return live

    assert asyncio.run(main()).shape == (1, 2)

"""Review of the data plane (issue 14): failure cases found in review, without Ray.

A WorkerServer (or a hand-written fake worker) and a Channel run in one event
loop over loopback, as in test_serving_wire.py."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from coinfer.serving import wire
from coinfer.serving.channel import Channel, WorkerCallError
from coinfer.serving.worker import INLINE_ROWS, WorkerServer

from .conftest import offline_runtime

SHAPE = (3, 2)


def _softmaxish(x: np.ndarray) -> np.ndarray:
    s = x.reshape(len(x), -1).sum(-1, keepdims=True)
    return np.concatenate([1 / (1 + np.exp(-s)), 1 - 1 / (1 + np.exp(-s))], -1).astype(np.float32)


async def _fake_worker(answer):
    """A worker that reads one PREDICT per request and writes ``answer(rid)`` back."""

    async def serve(reader, writer):
        while True:
            frame = await wire.read_frame(reader, 1 << 20)
            if frame is None:
                break
            if frame.kind == wire.PREDICT:
                writer.writelines(answer(frame.rid))
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(
    "answer",
    [
        # a RESULT that carries no float32 array (dtype 0)
        pytest.param(lambda rid: wire.pack(wire.RESULT, rid, text="not an array"), id="raw-result"),
        # a frame of a kind a worker never sends back
        pytest.param(lambda rid: wire.pack(wire.CANCEL, rid), id="cancel-from-worker"),
        pytest.param(
            lambda rid: wire.pack(wire.PREDICT, rid, np.zeros((1, 2), np.float32)), id="predict-from-worker"
        ),
    ],
)
def test_a_malformed_answer_for_a_pending_call_fails_it_instead_of_leaving_it_pending(answer):
    """The reader pops the call's future before it looks at the frame; a frame it does not
    resolve the future with must still fail the call, not leave it waiting forever."""

    async def main():
        server, port = await _fake_worker(answer)
        ch = Channel("127.0.0.1", port, max_payload=1 << 20)
        try:
            with pytest.raises(WorkerCallError):
                await asyncio.wait_for(ch.call(np.zeros((1, *SHAPE), np.float32)), 2.0)
        finally:
            await ch.aclose()
            server.close()

    asyncio.run(main())


async def _serve(run=_softmaxish, **kw):
    srv = WorkerServer(run, SHAPE, max_rows=64, **kw)
    host, port = await srv.start("127.0.0.1")
    return srv, Channel(host, port, max_payload=1 << 20)


def test_a_connection_attempt_whose_callers_were_all_cancelled_is_not_reused_once_stale():
    """The collector cancels calls it no longer needs, also while their channel is still
    connecting. That attempt's finished future must not be handed to a later call after
    its connection has gone (its writer is closed: the call would be written nowhere)."""

    async def main():
        srv, ch = await _serve()
        x = np.zeros((1, *SHAPE), np.float32)
        first = ch.submit(x)  # not connected yet: a task that connects first
        await asyncio.sleep(0)  # ... and is now waiting for the connection
        first.cancel()
        await asyncio.sleep(0.1)  # the connection is made all the same
        assert ch._writer is not None
        for c in list(srv._conns):  # then the worker's end of it goes away
            c.writer.transport.abort()
        await asyncio.sleep(0.1)
        try:
            return await asyncio.wait_for(ch.call(x), 2.0)  # must reconnect and answer
        finally:
            await ch.aclose()
            await srv.close()

    assert asyncio.run(main()).shape == (1, 2)


def test_a_connection_made_after_aclose_is_not_left_open():
    """aclose() while a connection attempt is under way: the attempt must not leave an open
    connection (and a reader task) behind on a channel that says it is closed."""

    async def main():
        srv, ch = await _serve()
        call = ch.submit(np.zeros((1, *SHAPE), np.float32))
        await asyncio.sleep(0)  # connecting
        await ch.aclose()
        with pytest.raises(WorkerCallError):
            await asyncio.wait_for(call, 2.0)
        await asyncio.sleep(0.05)
        left = ch._writer is not None and not ch._writer.is_closing()
        conns = len(srv._conns)
        await srv.close()
        return left, conns

    assert asyncio.run(main()) == (False, 0)


@pytest.mark.parametrize("rows", [1, INLINE_ROWS], ids=["inline", "model-thread"])
def test_a_model_answer_short_of_rows_fails_its_batch_and_the_worker_goes_on(rows):
    """Two queued requests run as one batch and the model answers fewer rows than it was
    given (a batch-dependent bug in a custom architecture): the split leaves the second
    request an empty slice, which must not stop the worker's batcher. Otherwise every
    later request to this worker is queued forever, and in coded mode, where its calls
    are cancelled rather than failed, nothing ever marks the worker failing."""
    calls = {"n": 0}

    def run(x):
        calls["n"] += 1
        if calls["n"] == 1:
            time.sleep(0.05)  # the next two queue behind this one and run together
        if calls["n"] == 2:
            return _softmaxish(x)[: len(x) // 2]
        return _softmaxish(x)

    async def main():
        srv, ch = await _serve(run)
        x = np.zeros((rows, *SHAPE), np.float32)
        try:
            first = ch.submit(np.zeros((INLINE_ROWS + 1, *SHAPE), np.float32))  # model thread
            await asyncio.sleep(0.02)
            pair = [asyncio.ensure_future(ch.call(x)) for _ in range(2)]
            await asyncio.wait_for(first, 2.0)
            outs = await asyncio.wait_for(asyncio.gather(*pair, return_exceptions=True), 2.0)
            for out in outs:  # an error, never a wrong-sized or someone else's answer
                assert isinstance(out, WorkerCallError), out
            return await asyncio.wait_for(ch.call(x), 2.0)  # the worker still serves
        finally:
            await ch.aclose()
            await srv.close()

    assert asyncio.run(main()).shape == (rows, 2)


def test_degraded_recovers_once_the_workers_answer_within_the_request_timeout(tmp_path):
    """Degraded (more than r workers timed out) is left as soon as the workers answer again in
    time. Workers that recovered but answer in 0.3 s (e.g. a large batch) are within the 5 s
    request timeout, yet every degraded request gives up after the 0.2 s degraded timeout,
    cancels their calls (no success recorded) and counts each as another failure: the
    server keeps answering 503 for as long as requests keep coming."""
    from coinfer.serving.collector import CollectError, CollectTimeout

    rt = offline_runtime(tmp_path, timeout_s=5.0, degraded_timeout_s=0.2)

    def answers_in_300ms(w, x, inject=True):
        fut = asyncio.get_running_loop().create_future()
        p = np.full((len(x), 3), 1 / 3, np.float32)
        asyncio.get_running_loop().call_later(0.3, lambda: fut.done() or fut.set_result(p))
        return fut

    rt._call = answers_in_300ms
    for _ in range(3):  # a transient: workers 0 and 1 did not answer three requests in time
        exc = CollectTimeout("no decodable set", {}, [0, 1])
        rt._account("coded", 1, time.perf_counter(), exc, 5.0)
    assert rt.health_report()["status"] == "degraded"

    async def traffic() -> list[str]:
        outcomes = []
        for _ in range(6):
            try:
                await rt.predict(np.zeros((1, 4), np.float32))
                outcomes.append("ok")
            except CollectError:
                outcomes.append("503")
        return outcomes

    outcomes = asyncio.run(traffic())
    assert "ok" in outcomes, outcomes
    assert rt.health_report()["status"] == "ok"


def test_two_restarts_of_one_worker_at_once_leave_no_process_running_unowned(monkeypatch):
    """Two /admin/restart calls for the same worker run pool.restart in two threads: the
    first thread's new processes must not be forgotten (never killed) when the second
    thread's replace them. Ray is faked: actors are objects, ray.kill records them."""
    import threading

    import ray

    from coinfer.serving.pool import WorkerPool, WorkerSpec

    spawned, killed = [], []
    lock = threading.Lock()

    class Actor:
        def __init__(self) -> None:
            self.address = self

        def remote(self):
            def ref():
                time.sleep(0.2)  # the process starts and reports its address
                return {"host": "127.0.0.1", "port": 1, "pid": id(self)}

            return ref

    def spawn(w):
        a = Actor()
        with lock:
            spawned.append(a)
        return [a]

    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref())
    monkeypatch.setattr(ray, "kill", lambda a, no_restart=True: killed.append(a))
    pool = WorkerPool({0: WorkerSpec(0, 0, "data")}, num_cpus=1, num_gpus=0)
    monkeypatch.setattr(pool, "_spawn", spawn)
    pool.start()
    threads = [threading.Thread(target=pool.restart, args=(0,)) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    running = [a for a in spawned if a not in killed]
    assert running == pool._actors[0], (len(spawned), len(killed))


def test_a_kill_issued_while_a_restart_is_under_way_is_not_undone_by_it(tmp_path):
    """/admin/kill during /admin/restart of the same worker: the kill comes last, so the
    worker must end down with its processes killed, not back in service."""
    import threading

    rt = offline_runtime(tmp_path)

    class Pool:  # WorkerPool's bookkeeping, with processes that start in 0.3 s
        def __init__(self) -> None:
            self.running: dict[int, int] = {0: 1}
            self.lock = threading.Lock()

        def kill(self, w):
            with self.lock:
                return self.running.pop(w, 0)

        def restart(self, w):
            self.kill(w)
            time.sleep(0.3)
            with self.lock:
                self.running[w] = 1
            return {"pids": [1]}

        def addresses(self, w):
            return [("127.0.0.1", 1)] if w in self.running else []

    rt.pool = Pool()

    def answers(w, x, inject=True):
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(np.full((len(x), 3), 1 / 3, np.float32))
        return fut

    rt._call = answers

    async def main():
        restart = asyncio.ensure_future(rt.restart(0))
        await asyncio.sleep(0.1)  # the new process is starting
        rt.kill(0)
        try:
            await restart
        except Exception:  # refusing the restart is fine too
            pass

    asyncio.run(main())
    assert 0 in rt.down and 0 not in rt.pool.running, (rt.down, rt.pool.running)

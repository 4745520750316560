"""The data plane without Ray: frames, a WorkerServer and Channels over loopback in one loop."""

from __future__ import annotations

import asyncio
import struct
import time

import numpy as np
import pytest

from coinfer.serving import wire
from coinfer.serving.channel import Channel, WorkerCallError
from coinfer.serving.worker import INLINE_ROWS, WorkerServer

SHAPE = (3, 2)


def _reader(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r


def _read(data: bytes, max_payload: int = 1 << 20):
    return asyncio.run(_read_async(data, max_payload))


async def _read_async(data: bytes, max_payload: int):
    return await wire.read_frame(_reader(data), max_payload)


def test_a_frame_round_trips_its_array_and_header_fields():
    x = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    f = _read(b"".join(bytes(b) for b in wire.pack(wire.PREDICT, 7, x, flags=wire.FLAG_FAIL, delay_us=1500)))
    assert (f.kind, f.rid, f.shape, f.flags, f.delay_us) == (wire.PREDICT, 7, (2, 3, 2), wire.FLAG_FAIL, 1500)
    np.testing.assert_array_equal(f.array(), x)
    assert f.array().flags.writeable
    err = _read(b"".join(bytes(b) for b in wire.pack(wire.ERROR, 9, text="Boom: no")))
    assert err.text() == "Boom: no" and err.shape == ()
    assert _read(b"") is None  # a clean end between frames


def _header(**kw) -> bytes:
    f = {"magic": wire.MAGIC, "kind": wire.PREDICT, "dtype": 1, "ndim": 1, "flags": 0, "delay": 0, "rid": 1}
    f.update(kw)
    nbytes = kw.get("nbytes", 16)
    return wire.HEADER.pack(
        f["magic"], f["kind"], f["dtype"], f["ndim"], f["flags"], f["delay"], f["rid"], nbytes
    )


@pytest.mark.parametrize(
    "data,words",
    [
        (_header(magic=b"HTTP"), "not a coinfer frame"),
        (_header(kind=99), "unknown frame kind"),
        (_header(dtype=7), "unknown dtype"),
        (_header(ndim=40), "at most 8"),
        (_header(nbytes=2**62) + struct.pack("<I", 2**30), "over the limit"),  # refused before any read
        (_header(nbytes=12) + struct.pack("<I", 4) + b"x" * 12, "does not match shape"),
        (_header(nbytes=16) + struct.pack("<I", 4) + b"x" * 5, "ended inside a frame"),
        (_header()[:10], "inside a frame header"),
    ],
)
def test_broken_frames_are_named_wire_errors(data, words):
    with pytest.raises(wire.WireError, match=words):
        _read(data, max_payload=1 << 20)


def _softmaxish(x: np.ndarray) -> np.ndarray:
    """(B, 3, 2) -> (B, 2) probabilities that depend on each row alone."""
    s = x.reshape(len(x), -1).sum(-1, keepdims=True)
    return np.concatenate([1 / (1 + np.exp(-s)), 1 - 1 / (1 + np.exp(-s))], -1).astype(np.float32)


async def _serve(run=_softmaxish, **kw):
    srv = WorkerServer(run, SHAPE, max_rows=64, **kw)
    host, port = await srv.start("127.0.0.1")
    return srv, Channel(host, port, max_payload=1 << 20)


def test_answers_match_the_model_row_for_row_and_queued_requests_run_as_one_batch():
    calls = []

    def slow(x):
        calls.append(len(x))
        time.sleep(0.05)
        return _softmaxish(x)

    async def main():
        srv, ch = await _serve(slow, max_batch_size=32)
        rng = np.random.default_rng(0)
        xs = [rng.standard_normal((b, *SHAPE)).astype(np.float32) for b in (1, 2, 1, 3)]
        first = asyncio.ensure_future(ch.call(xs[0]))
        await asyncio.sleep(0.02)  # the model is busy with the first: the others queue
        rest = await asyncio.gather(*(ch.call(x) for x in xs[1:]))
        outs = [await first, *rest]
        for x, out in zip(xs, outs, strict=True):
            np.testing.assert_allclose(out, _softmaxish(x), rtol=1e-6)
        await ch.aclose()
        await srv.close()
        return srv.stats

    stats = asyncio.run(main())
    assert calls == [1, 6]  # the first alone at once, the three queued ones together
    assert stats["batches"] == 2 and stats["largest_batch"] == 6 and stats["requests"] == 4


def test_a_batch_over_max_batch_size_splits_at_request_boundaries():
    seen = []

    def run(x):
        seen.append(len(x))
        time.sleep(0.03)
        return _softmaxish(x)

    async def main():
        srv, ch = await _serve(run, max_batch_size=4)
        block = asyncio.ensure_future(ch.call(np.zeros((1, *SHAPE), np.float32)))
        await asyncio.sleep(0.01)
        xs = [np.full((b, *SHAPE), b, np.float32) for b in (3, 3, 10)]
        outs = await asyncio.gather(*(ch.call(x) for x in xs))
        await block
        for x, out in zip(xs, outs, strict=True):
            assert out.shape == (len(x), 2)
            np.testing.assert_allclose(out, _softmaxish(x), rtol=1e-6)
        await ch.aclose()
        await srv.close()

    asyncio.run(main())
    assert seen == [1, 3, 3, 10]  # 3 + 3 > 4 rows; a 10-row request runs alone


def test_a_cancelled_queued_call_is_dropped_and_never_run():
    rows = []

    def run(x):
        rows.append(x[:, 0, 0].tolist())
        time.sleep(0.1)
        return _softmaxish(x)

    async def main():
        srv, ch = await _serve(run)
        # a batch over INLINE_ROWS runs in the model thread, so this loop goes on meanwhile
        busy = asyncio.ensure_future(ch.call(np.zeros((INLINE_ROWS + 1, *SHAPE), np.float32)))
        await asyncio.sleep(0.02)
        late = ch.submit(np.full((1, *SHAPE), 5, np.float32))
        kept = ch.submit(np.full((1, *SHAPE), 7, np.float32))
        await asyncio.sleep(0.01)
        late.cancel()  # sends CANCEL while the model is still busy with the first call
        await busy
        await kept
        await asyncio.sleep(0.05)
        await ch.aclose()
        await srv.close()
        return srv.stats

    stats = asyncio.run(main())
    assert stats["dropped"] == 1 and rows == [[0.0] * (INLINE_ROWS + 1), [7.0]]


def test_injected_failures_and_delays_are_applied_by_the_worker():
    async def main():
        srv, ch = await _serve(worker=3)
        x = np.zeros((1, *SHAPE), np.float32)
        with pytest.raises(WorkerCallError, match="InjectedFailure: injected failure in worker 3"):
            await ch.call(x, fail=True)
        t0 = time.perf_counter()
        await ch.call(x, delay_s=0.15)
        waited = time.perf_counter() - t0
        await ch.aclose()
        await srv.close()
        return waited

    assert asyncio.run(main()) >= 0.15


def test_the_worker_refuses_wrong_shapes_and_batches_by_name_and_keeps_serving():
    async def main():
        srv, ch = await _serve()
        with pytest.raises(WorkerCallError, match=r"inputs of shape \(1, 2, 3\), expected \(B, 3, 2\)"):
            await ch.call(np.zeros((1, 2, 3), np.float32))
        # a payload over the worker's limit is refused from the header; the connection closes
        with pytest.raises(WorkerCallError, match="payload of 1560 bytes, over the limit of 1536"):
            await ch.call(np.zeros((65, *SHAPE), np.float32))
        out = await ch.call(np.zeros((2, *SHAPE), np.float32))
        await ch.aclose()
        await srv.close()
        return out

    assert asyncio.run(main()).shape == (2, 2)


def test_a_model_error_is_the_batchs_answer_and_the_worker_goes_on():
    state = {"fail": True}

    def run(x):
        if state.pop("fail", False):
            raise RuntimeError("CUDA out of memory\nmore lines")
        return _softmaxish(x)

    async def main():
        srv, ch = await _serve(run)
        x = np.zeros((INLINE_ROWS + 1, *SHAPE), np.float32)  # the model thread's path
        with pytest.raises(WorkerCallError, match="RuntimeError: CUDA out of memory$"):
            await ch.call(x)
        out = await ch.call(x)
        await ch.aclose()
        await srv.close()
        return out

    assert asyncio.run(main()).shape == (INLINE_ROWS + 1, 2)


def test_a_lost_connection_fails_pending_calls_at_once_and_the_next_call_reconnects():
    async def main():
        srv, ch = await _serve(lambda x: (time.sleep(0.05), _softmaxish(x))[1])
        x = np.zeros((1, *SHAPE), np.float32)
        await ch.call(x)
        pending = ch.submit(x, delay_s=5.0)  # held back by the worker
        await asyncio.sleep(0.1)
        for c in list(srv._conns):  # the worker's end goes away
            c.writer.transport.abort()
        t0 = time.perf_counter()
        with pytest.raises(WorkerCallError, match="WorkerLost"):
            await pending
        assert time.perf_counter() - t0 < 1.0
        out = await ch.call(x)  # a new connection
        await srv.close()
        with pytest.raises(WorkerCallError, match="WorkerLost|WorkerUnreachable"):
            await ch.call(x)
            await asyncio.sleep(0.05)
            await ch.call(x)
        await ch.aclose()
        return out

    assert asyncio.run(main()).shape == (1, 2)


def test_a_worker_that_is_not_listening_is_unreachable_by_name():
    async def main():
        ch = Channel("127.0.0.1", 1, max_payload=1024)
        with pytest.raises(WorkerCallError, match="WorkerUnreachable: 127.0.0.1:1"):
            await ch.call(np.zeros((1, *SHAPE), np.float32))

    asyncio.run(main())


def test_a_call_cancelled_while_its_batch_runs_gets_no_answer_and_queued_rows_are_bounded():
    def slow(x):
        time.sleep(0.1)
        return _softmaxish(x)

    async def main():
        srv, ch = await _serve(slow)
        big = ch.submit(np.zeros((INLINE_ROWS + 1, *SHAPE), np.float32))  # runs in the model thread
        await asyncio.sleep(0.03)
        big.cancel()
        ok = await ch.call(np.zeros((1, *SHAPE), np.float32))
        blocker = ch.submit(np.zeros((INLINE_ROWS + 1, *SHAPE), np.float32))
        await asyncio.sleep(0.03)
        srv.max_queued_rows = 2  # a peer that floods the queue is refused, by name
        queued = [ch.submit(np.zeros((1, *SHAPE), np.float32)) for _ in range(3)]
        results = await asyncio.gather(*queued, return_exceptions=True)
        await blocker
        await ch.aclose()
        await srv.close()
        return ok, results, srv.stats

    ok, results, stats = asyncio.run(main())
    assert stats["discarded"] == 1 and stats["dropped"] == 0  # computed, its answer not sent
    assert ok.shape == (1, 2)
    assert [isinstance(r, np.ndarray) for r in results] == [True, True, False]
    assert "overloaded: 2 rows queued, the limit is 2" in str(results[2])

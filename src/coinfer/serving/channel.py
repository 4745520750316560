"""The frontend's end of the data plane: one TCP connection to one worker process.

Plain asyncio, no Ray. A :class:`Channel` multiplexes concurrent calls over one
connection by request id; a reader task resolves each call as its answer
arrives, in whatever order. Cancelling a call (the collector does so for calls
it no longer waits for) sends ``CANCEL`` so the worker drops the queued work.
A lost connection fails every pending call at once with :class:`WorkerCallError`
(the collector then decodes around the worker); the next call reconnects.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import socket

import numpy as np

from coinfer.errors import CoinferError
from coinfer.serving import wire

__all__ = ["Channel", "WorkerCallError"]


def _keepalive(sock: socket.socket) -> None:
    """Notice a worker whose node vanished without closing the connection: keepalive
    probes after 10 s idle, and unacknowledged data failing the connection after 30 s
    (Linux options; skipped where missing)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", 10),
        ("TCP_KEEPINTVL", 5),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", 30_000),
    ):
        opt = getattr(socket, name, None)
        if opt is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, opt, value)
            except OSError:
                pass


class WorkerCallError(CoinferError):
    """A call that a worker answered with an error, or that its connection lost.
    ``reason`` is the text the collector reports (e.g. ``InjectedFailure: ...``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Channel:
    """Calls to the worker listening on ``host:port``.

    Args:
        host, port: the worker's data-plane address.
        max_payload: largest answer accepted (bytes).
        connect_timeout_s: how long a (re)connection may take.
    """

    def __init__(self, host: str, port: int, max_payload: int, connect_timeout_s: float = 2.0) -> None:
        self.host, self.port = host, port
        self.max_payload = max_payload
        self.connect_timeout_s = connect_timeout_s
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._connecting: asyncio.Future | None = None
        self.closed = False

    @property
    def pending(self) -> int:
        """Calls sent and not answered yet."""
        return len(self._pending)

    async def _connect(self) -> asyncio.StreamWriter:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        if self._connecting is None or self._connecting.done():  # one attempt for all the calls
            # that need it; a finished one is stale (its callers were all cancelled before it ended)
            self._connecting = asyncio.ensure_future(self._open())
        fut = self._connecting
        try:
            return await asyncio.shield(fut)
        finally:
            if fut.done():
                self._connecting = None

    async def _open(self) -> asyncio.StreamWriter:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.connect_timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise WorkerCallError(
                f"WorkerUnreachable: {self.host}:{self.port}: {exc or type(exc).__name__}"
            ) from None
        if self.closed:  # aclose() while connecting: leave nothing open behind
            writer.close()
            raise WorkerCallError("WorkerLost: channel closed")
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _keepalive(sock)
        self._writer = writer
        self._reader_task = asyncio.ensure_future(self._read(reader, writer))
        return writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        why = "connection closed by the worker"
        try:
            while True:
                frame = await wire.read_frame(reader, self.max_payload)
                if frame is None:
                    break
                if frame.kind not in (wire.RESULT, wire.ERROR) or (
                    frame.kind == wire.RESULT and frame.dtype != wire.FLOAT32
                ):  # raised before its call is popped, so that the call fails with the others
                    raise wire.WireError(
                        f"unexpected {wire.KINDS[frame.kind]} frame (dtype {frame.dtype}) for request {frame.rid}"
                    )
                fut = self._pending.pop(frame.rid, None)
                if frame.kind == wire.ERROR and frame.rid == 0 and fut is None:
                    why = f"worker closed the connection: {frame.text()}"
                    continue
                if fut is None or fut.done():
                    continue  # an answer nobody waits for any more (cancelled)
                if frame.kind == wire.RESULT:
                    fut.set_result(frame.array())
                elif frame.kind == wire.ERROR:
                    fut.set_exception(WorkerCallError(frame.text()))
        except wire.WireError as exc:
            why = f"bad frame from the worker: {exc}"
        except (ConnectionError, OSError) as exc:
            why = f"connection lost: {exc}"
        except asyncio.CancelledError:
            why = "channel closed"
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            self._fail_all(why)

    def _fail_all(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(WorkerCallError(f"WorkerLost: {why}"))

    def submit(self, x: np.ndarray, *, fail: bool = False, delay_s: float = 0.0) -> asyncio.Future:
        """Send ``x`` now and return the future of the worker's ``(B, C)`` float32
        probabilities (no task is made while the connection is open). Cancelling the
        future sends ``CANCEL``, so the worker drops the call if it has not run it.
        ``fail`` and ``delay_s`` are injected on purpose (the worker fails the call,
        or holds its answer back that long after computing it).

        The future fails with :class:`WorkerCallError` when the worker answers an
        error or the connection fails."""
        writer = self._writer
        if self.closed or writer is None or writer.is_closing():
            return asyncio.ensure_future(self.call(x, fail=fail, delay_s=delay_s))
        return self._send(writer, x, fail, delay_s)

    def _send(
        self, writer: asyncio.StreamWriter, x: np.ndarray, fail: bool, delay_s: float
    ) -> asyncio.Future:
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        delay_us = max(0, min(int(delay_s * 1e6), 2**32 - 1))
        writer.writelines(
            wire.pack(wire.PREDICT, rid, x, flags=wire.FLAG_FAIL if fail else 0, delay_us=delay_us)
        )
        fut.add_done_callback(functools.partial(self._done, rid, writer))
        return fut

    def _done(self, rid: int, writer: asyncio.StreamWriter, fut: asyncio.Future) -> None:
        if fut.cancelled() and self._pending.pop(rid, None) is not None:
            if self._writer is writer and not writer.is_closing():
                writer.writelines(wire.pack(wire.CANCEL, rid))

    async def call(self, x: np.ndarray, *, fail: bool = False, delay_s: float = 0.0) -> np.ndarray:
        """:meth:`submit`, connecting first if needed, and await the answer.

        Raises:
            WorkerCallError: the worker answered an error, or the connection failed.
        """
        if self.closed:
            raise WorkerCallError("WorkerLost: channel closed")
        writer = await self._connect()
        return await self._send(writer, x, fail, delay_s)

    async def aclose(self) -> None:
        """Close the connection; pending calls fail with ``WorkerLost``."""
        self.closed = True
        task = self._reader_task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        elif self._writer is not None:
            self._writer.close()
        self._fail_all("channel closed")

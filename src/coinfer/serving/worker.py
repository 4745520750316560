"""A worker: one model of a bundle behind a TCP socket, with worker-side batching.

Two layers, so the data plane is tested without Ray:

* :class:`WorkerServer` — plain asyncio: accepts connections, reads frames
  (:mod:`coinfer.serving.wire`), validates each request's dtype, shape and size
  before any work, and runs the model. A request that finds the model idle runs
  at once (no batch wait); requests that arrive while it runs queue and then run
  together, up to ``max_batch_size`` rows. A ``CANCEL`` for a queued request
  drops it before it runs (and a reply held back by an injected delay is not
  sent). Batches of more than :data:`INLINE_ROWS` rows run in one thread of
  their own, so the event loop keeps reading requests and cancellations
  meanwhile; smaller ones run on the loop's thread (no hand-off).
* :class:`ModelWorker` — the Ray actor: Ray places the process (``num_cpus`` /
  ``num_gpus``) and restarts or kills it; the actor loads its pinned model file
  and runs a :class:`WorkerServer` on its node's address, which the frontend
  asks for with :meth:`ModelWorker.address` and then talks to directly.

A worker is *pinned* to what the frontend verified at start: it receives the
expected sha256 of its model file, the architecture and its parity structure,
never re-reads the manifest, and refuses a file whose bytes differ — so a
process started after the bundle changed on disk does not serve another model's
outputs. A refusal is reported by :meth:`ModelWorker.address` (``refused``).
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coinfer.serving import wire

__all__ = ["INLINE_ROWS", "ModelWorker", "WorkerServer"]

#: Batches of at most this many rows run on the event loop's thread; larger ones in the
#: model thread (a hand-off costs about as much as a small model's batch of one here).
INLINE_ROWS = 8


@dataclass(eq=False)
class _Conn:
    writer: asyncio.StreamWriter
    queued: dict[int, _Job] = field(default_factory=dict)  # rid -> job not run yet
    running: dict[int, _Job] = field(default_factory=dict)  # rid -> job in the batch being run
    held: dict[int, asyncio.TimerHandle] = field(default_factory=dict)  # rid -> delayed reply
    closed: bool = False

    def send(self, buffers: list[bytes | memoryview]) -> None:
        if not self.closed:
            self.writer.writelines(buffers)


@dataclass(eq=False)
class _Job:
    conn: _Conn
    rid: int
    x: np.ndarray
    delay_s: float
    cancelled: bool = False


class WorkerServer:
    """The data plane of one worker (see the module docstring).

    Args:
        run: ``run(x)`` -> ``(B, C)`` float32 probabilities for a ``(B, *input_shape)`` float32 batch.
        input_shape: the shape of one input.
        max_rows: largest batch one request may carry (the frontend's limit).
        max_batch_size: most rows run together (a single larger request still runs alone).
        worker: this worker's index (named in error messages).
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        input_shape: Sequence[int],
        max_rows: int,
        max_batch_size: int = 32,
        worker: int = 0,
    ) -> None:
        self.run = run
        self.input_shape = tuple(int(s) for s in input_shape)
        self.max_rows = int(max_rows)
        self.max_batch_size = max(1, int(max_batch_size))
        self.worker = worker
        self.max_payload = 4 * self.max_rows * math.prod(self.input_shape)
        self.stats = {
            "requests": 0,
            "batches": 0,
            "rows": 0,
            "largest_batch": 0,
            "dropped": 0,
            "discarded": 0,
            "refused": 0,
        }
        self._queue: deque[_Job] = deque()
        self._queued_rows = 0
        #: most rows queued at once over all connections (a peer that never reads cannot grow it)
        self.max_queued_rows = 16 * max(self.max_rows, self.max_batch_size)
        self._wake: asyncio.Event | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task] = set()
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix=f"coinfer-w{worker}-model")
        self._batcher: asyncio.Task | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on ``host:port`` (0: a free port); return the bound address."""
        self._wake = asyncio.Event()
        self._server = await asyncio.start_server(self._serve, host, port)
        self._batcher = asyncio.ensure_future(self._batches())
        sock = self._server.sockets[0].getsockname()
        return host, int(sock[1])

    async def close(self) -> None:
        """Stop listening, close every connection and wait for their handlers to end."""
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            c.closed = True
            c.writer.close()
        handlers = [t for t in self._handlers if not t.done()]
        if handlers:
            await asyncio.wait(handlers, timeout=1.0)
        if self._batcher is not None:
            self._batcher.cancel()
        self._model_thread.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- connections
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer)
        self._conns.add(conn)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        try:
            while True:
                try:
                    frame = await wire.read_frame(reader, self.max_payload)
                except wire.WireError as exc:  # the stream cannot be resynchronised: say why, close
                    conn.send(wire.pack(wire.ERROR, 0, text=f"WireError: {exc}"))
                    return
                if frame is None:
                    return
                if frame.kind == wire.PREDICT:
                    self._accept(conn, frame)
                elif frame.kind == wire.CANCEL:
                    self._cancel(conn, frame.rid)
                else:
                    conn.send(
                        wire.pack(
                            wire.ERROR, frame.rid, text=f"WireError: unexpected frame kind {frame.kind}"
                        )
                    )
                    return
        except (ConnectionError, OSError):
            return
        finally:
            conn.closed = True
            self._conns.discard(conn)
            for job in conn.queued.values():  # dropped now: no longer counted as queued
                job.cancelled = True
                self._queued_rows -= len(job.x)
            conn.queued.clear()
            for h in conn.held.values():
                h.cancel()
            writer.close()

    def _refuse(self, conn: _Conn, rid: int, why: str) -> None:
        self.stats["refused"] += 1
        conn.send(wire.pack(wire.ERROR, rid, text=f"BadRequest: worker {self.worker}: {why}"))

    def _accept(self, conn: _Conn, frame: wire.Frame) -> None:
        if frame.dtype != wire.FLOAT32:
            return self._refuse(conn, frame.rid, "inputs must be float32")
        if len(frame.shape) != 1 + len(self.input_shape) or frame.shape[1:] != self.input_shape:
            return self._refuse(
                conn,
                frame.rid,
                f"inputs of shape {frame.shape}, expected (B, {', '.join(map(str, self.input_shape))})",
            )
        if not 1 <= frame.shape[0] <= self.max_rows:
            return self._refuse(conn, frame.rid, f"batch of {frame.shape[0]}, expected 1..{self.max_rows}")
        if frame.rid in conn.queued or frame.rid in conn.held or frame.rid in conn.running:
            return self._refuse(conn, frame.rid, f"request id {frame.rid} is already in use")
        if self._queued_rows + frame.shape[0] > self.max_queued_rows:
            return self._refuse(
                conn,
                frame.rid,
                f"overloaded: {self._queued_rows} rows queued, the limit is {self.max_queued_rows}",
            )
        if len(conn.held) >= self.max_queued_rows:
            return self._refuse(conn, frame.rid, f"overloaded: {len(conn.held)} answers held back")
        self.stats["requests"] += 1
        if frame.flags & wire.FLAG_FAIL:  # injected before any work, like a crash of the call
            conn.send(
                wire.pack(
                    wire.ERROR, frame.rid, text=f"InjectedFailure: injected failure in worker {self.worker}"
                )
            )
            return
        job = _Job(conn, frame.rid, frame.array(), frame.delay_us / 1e6)
        conn.queued[frame.rid] = job
        self._queue.append(job)
        self._queued_rows += len(job.x)
        assert self._wake is not None
        self._wake.set()

    def _cancel(self, conn: _Conn, rid: int) -> None:
        job = conn.queued.pop(rid, None)
        if job is not None:  # it stays in the batcher's queue, skipped there; not counted from now
            job.cancelled = True
            self._queued_rows -= len(job.x)
            self.stats["dropped"] += 1
        running = conn.running.get(rid)
        if running is not None:  # its answer (or held-back answer) is not sent
            running.cancelled = True
        held = conn.held.pop(rid, None)
        if held is not None:
            held.cancel()

    # ---------------------------------------------------------------- batching
    def _take(self) -> list[_Job]:
        """The jobs of the next batch: queued, not cancelled, up to max_batch_size rows (at least one job)."""
        jobs: list[_Job] = []
        rows = 0
        while self._queue:
            job = self._queue[0]
            if job.cancelled:  # no longer counted in _queued_rows (see _cancel, _serve)
                self._queue.popleft()
                continue
            if jobs and rows + len(job.x) > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_rows -= len(job.x)
            job.conn.queued.pop(job.rid, None)
            job.conn.running[job.rid] = job
            jobs.append(job)
            rows += len(job.x)
        return jobs

    async def _batches(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                jobs = self._take()
                if not jobs:
                    break
                x = jobs[0].x if len(jobs) == 1 else np.concatenate([j.x for j in jobs])
                try:
                    if len(x) <= INLINE_ROWS:  # short: no hand-off to the model thread and back
                        out = self.run(x)
                        for _ in range(2):  # let the readers take in what arrived meanwhile (cancels)
                            await asyncio.sleep(0)
                    else:  # long: the loop keeps reading requests and cancellations meanwhile
                        out = await loop.run_in_executor(self._model_thread, self.run, x)
                    if not isinstance(out, np.ndarray) or out.ndim < 1 or len(out) != len(x):
                        # split by rows below: a short answer would hand rows to the wrong request
                        raise ValueError(
                            f"the model answered {getattr(out, 'shape', type(out).__name__)} "
                            f"for a batch of {len(x)}"
                        )
                    error = None
                except Exception as exc:  # the model's failure is this batch's answer, the server goes on
                    out, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                self.stats["batches"] += 1
                self.stats["rows"] += len(x)
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(x))
                start = 0
                for job in jobs:
                    n = len(job.x)
                    job.conn.running.pop(job.rid, None)
                    if job.cancelled:  # cancelled while it ran: nobody waits for its answer
                        self.stats["discarded"] += 1
                    elif error is None:
                        try:
                            self._reply(loop, job, out[start : start + n])
                        except Exception as exc:  # e.g. an answer the wire cannot carry: this call's
                            # error; the batcher must go on (else every later request waits forever)
                            job.conn.send(wire.pack(wire.ERROR, job.rid, text=f"{type(exc).__name__}: {exc}"))
                    else:
                        job.conn.send(wire.pack(wire.ERROR, job.rid, text=error))
                    start += n

    def _reply(self, loop: asyncio.AbstractEventLoop, job: _Job, out: np.ndarray) -> None:
        if job.cancelled or job.conn.closed:
            return
        buffers = wire.pack(wire.RESULT, job.rid, out)
        if job.delay_s <= 0:
            job.conn.send(buffers)
            return

        def send() -> None:
            job.conn.held.pop(job.rid, None)
            job.conn.send(buffers)

        job.conn.held[job.rid] = loop.call_later(job.delay_s, send)


class ModelWorker:
    """The Ray actor of one worker: loads row ``row`` of the bundle and serves it on a socket.

    Args:
        bundle_path: the bundle directory (must be readable where the worker runs).
        row: the generator row, i.e. which model: data ``0..k-1``, coded ``k..n-1``.
        worker: this worker's index in the frontend (replicas have their own).
        k: the bundle's number of data models (names the file of ``row``).
        sha256: the sha256 of the model file that the frontend verified.
        architecture: the architecture spec the frontend verified.
        input_shape: the shape of one input.
        parity: the row's parity structure the frontend verified (None: a model of the architecture).
        trust_code: the operator's opt-in to a ``package.module:factory`` architecture.
        device: ``cpu`` or ``cuda``.
        num_threads: torch intra-op threads.
        max_rows: largest batch of one request; max_batch_size: most rows run together.
        host: the address to listen on (``None``: this node's Ray address).
    """

    def __init__(
        self,
        bundle_path: str,
        row: int,
        worker: int,
        *,
        k: int,
        sha256: str,
        architecture: dict[str, Any],
        input_shape: Sequence[int],
        parity: dict[str, Any] | None = None,
        trust_code: bool = False,
        device: str = "cpu",
        num_threads: int = 1,
        max_rows: int = 1024,
        max_batch_size: int = 32,
        host: str | None = None,
    ) -> None:
        self.row, self.worker, self.device = row, worker, device
        self.refused: str | None = None
        self._address: tuple[str, int] | None = None
        try:
            self._load(bundle_path, k, sha256, architecture, parity, trust_code, num_threads)
        except Exception as exc:  # reported by address(), without a traceback in every log
            self.refused = f"{type(exc).__name__}: {exc}"
            return
        if host is None:
            import ray

            host = ray.util.get_node_ip_address()
        self.server = WorkerServer(self._run, input_shape, max_rows, max_batch_size, worker)
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._address = self._loop.run_until_complete(self.server.start(host))
            except BaseException as exc:
                failure.append(exc)
                return
            finally:
                started.set()
            self._loop.run_forever()

        threading.Thread(target=serve, name=f"coinfer-w{worker}-io", daemon=True).start()
        started.wait()
        if failure:
            self.refused = f"cannot listen on {host}: {failure[0]}"

    def _load(self, bundle_path, k, sha256, architecture, parity, trust_code, num_threads) -> None:
        import torch

        from coinfer.bundle import Bundle, load_model

        torch.set_num_threads(max(1, num_threads))
        path = Path(bundle_path) / Bundle.filename(self.row, k)
        model = load_model(architecture, path, parity, trust_code=trust_code, sha256=sha256)
        self._torch = torch
        self._dev = torch.device(self.device)
        self.model = model.to(self._dev).eval()

    def _run(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            t = torch.from_numpy(x).to(self._dev)
            return torch.softmax(self.model(t), dim=-1).float().cpu().numpy()

    def address(self) -> dict[str, Any]:
        """``{"host", "port", "pid"}`` of the data-plane socket, or ``{"refused": reason}``."""
        if self.refused is not None:
            return {"refused": self.refused, "pid": os.getpid()}
        assert self._address is not None
        return {"host": self._address[0], "port": self._address[1], "pid": os.getpid()}

    def info(self) -> dict[str, Any]:
        """Process id, row, device and the batching counters (also a health probe)."""
        stats = dict(self.server.stats) if self.refused is None else {}
        return {"pid": os.getpid(), "row": self.row, "worker": self.worker, "device": self.device, **stats}

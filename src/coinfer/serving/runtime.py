"""The serving runtime: the request path (plan, fan-out, collect, decode, accounting)
over a pool of worker processes, and the admin actions.

Two planes (see ``docs/serving.md``):

* control — :class:`coinfer.serving.pool.WorkerPool` places the worker processes
  on Ray (local, or a cluster joined with ``address``), kills and replaces them,
  and tells the runtime where each one listens;
* data — each request goes straight to the workers' sockets
  (:class:`coinfer.serving.channel.Channel`, frames of :mod:`coinfer.serving.wire`),
  and :func:`coinfer.serving.collector.collect` answers from the first
  decodable set, cancelling the calls it no longer waits for.

Workers ``0..n-1`` serve the bundle's rows (data models, then coded models);
with ``baselines=True`` workers ``n..n+r-1`` are second replicas of data models
``0..r-1``, used by the ``replicated`` and ``hedged`` modes so that every mode
runs on the same runtime with the same resources.

:meth:`Runtime.start` validates the manifest and verifies every file's sha256
once; each worker is then *pinned* to that verification (it gets the sha256 of
its file, the architecture and its parity structure, and refuses a file that
differs). :meth:`Runtime.restart` reports such a refusal at once and keeps the
worker down with the reason.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import random
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from coinfer.architectures import check_trusted
from coinfer.bundle import MANIFEST, Bundle
from coinfer.errors import BundleError, CoinferError
from coinfer.serving.admin import AdminActions
from coinfer.serving.channel import Channel, WorkerCallError
from coinfer.serving.collector import (
    CollectError,
    Collection,
    CollectTimeout,
    LatencyTracker,
    Plan,
    SlackPolicy,
    collect,
)
from coinfer.serving.config import MODES, ServeConfig, check_settings, parse_decode_slack
from coinfer.serving.health import WorkerHealth
from coinfer.serving.injection import Injection
from coinfer.serving.metrics import Metrics
from coinfer.serving.pool import RayHandle, WorkerPool, WorkerRefused, WorkerSpec, start_ray

__all__ = [
    "MODES",
    "ServeConfig",
    "Runtime",
    "ServedBundle",
    "WorkerSlot",
    "WorkerRefused",
    "WorkerHealth",
    "parse_decode_slack",
]

log = logging.getLogger("coinfer.serving")


@dataclass(frozen=True)
class ServedBundle:
    """What the runtime needs of a validated manifest (instead of the raw dict).

    Attributes:
        path: the bundle directory.
        manifest: the raw manifest, as read (``/v1/models`` shows parts of it).
        architecture, code: from :meth:`Bundle.check_manifest`.
        input_shape: the shape of one input.
        class_names: one per output column, or None.
        files: file name -> sha256, verified once at start (workers are pinned to it).
    """

    path: Any
    manifest: Mapping[str, Any]
    architecture: dict[str, Any]
    code: Any
    input_shape: tuple[int, ...]
    class_names: list[str] | None
    files: dict[str, str]

    @classmethod
    def check(cls, config: ServeConfig, manifest: Mapping[str, Any]) -> ServedBundle:
        """Validate ``manifest`` (see :meth:`Bundle.check_manifest`); builds and imports nothing."""
        architecture, code = Bundle.check_manifest(manifest, config.bundle / MANIFEST, config.max_condition)
        return cls(
            path=config.bundle,
            manifest=manifest,
            architecture=architecture,
            code=code,
            input_shape=tuple(int(s) for s in manifest["input_shape"]),
            class_names=manifest.get("class_names"),
            files=dict(manifest["files"]),
        )

    def parity(self, row: int) -> dict[str, Any] | None:
        return Bundle.parity_structure(self.manifest, row, self.code)

    def pin(self, row: int) -> str:
        return self.files[Bundle.filename(row, self.code.k)]


@dataclass
class WorkerSlot:
    """One worker: its index, the code row it serves and its kind."""

    index: int
    row: int
    kind: str  # "data", "coded" or "replica"


class Runtime(AdminActions):
    """Worker pool + request path + admin. Create with :meth:`start`; close with
    :meth:`shutdown` (or use it as a context manager)."""

    def __init__(self, config: ServeConfig, manifest: dict[str, Any]) -> None:
        self.config = config
        self.bundle = ServedBundle.check(config, manifest)
        self.metrics = Metrics()
        self.mode = config.mode
        self.timeout_s = config.timeout_s
        self.hedge_ms = config.hedge_ms
        self.decode_slack: float | str = config.decode_slack  # ms or "auto"
        self.latency = LatencyTracker()  # recent worker-call latencies, for the auto slack
        self.injections: dict[int, Injection] = dict(config.injections)
        self.down: dict[int, str] = {}
        self.health = WorkerHealth()
        self.slots: dict[int, WorkerSlot] = {}
        k, r, n = self.code.k, self.code.r, self.code.n
        if config.verify is not None and r < 2:
            raise CoinferError(
                f"--verify needs r >= 2 parities to locate a corrupt output (k + 2 outputs); this bundle has r = {r}"
            )
        for i in range(n):
            self.slots[i] = WorkerSlot(i, i, "data" if i < k else "coded")
        if config.baselines:
            for j in range(min(r, k)):
                self.slots[n + j] = WorkerSlot(n + j, j, "replica")
        self.row_of = {w: s.row for w, s in self.slots.items()}
        self.plan(self.mode)  # e.g. a default mode that needs the baseline replicas, without them
        self.pool: WorkerPool | None = None
        self._ray: RayHandle | None = None
        self._rngs = {w: random.Random(config.seed * 1_000_003 + w) for w in self.slots}
        self._turn = itertools.count()
        #: event loop -> {(host, port): Channel}; a channel belongs to the loop that opened it
        self._channels: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._refreshing: dict[int, float] = {}
        self._kills: dict[int, int] = {}  # worker -> kills so far (a later kill beats a restart)
        classes = len(self.class_names) if self.class_names else 1 << 16
        self.max_answer_bytes = 4 * config.max_batch * classes

    # the validated bundle's parts, as the HTTP app and the admin actions read them
    manifest = property(lambda self: self.bundle.manifest)
    architecture = property(lambda self: self.bundle.architecture)
    code = property(lambda self: self.bundle.code)
    input_shape = property(lambda self: self.bundle.input_shape)
    class_names = property(lambda self: self.bundle.class_names)

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def start(cls, config: ServeConfig) -> Runtime:
        """Verify the bundle, start or join Ray, start every worker process and wait
        until each answers one input through the data plane.

        Raises:
            BundleError: the manifest or a file is refused, a worker refused its file,
                or a worker's answer does not fit the class names.
        """
        manifest = Bundle.read_manifest(config.bundle)
        rt = cls(config, manifest)  # validates the manifest
        check_trusted(rt.architecture, config.trust_code, source=f"bundle {config.bundle}")
        checks = Bundle.check_files(config.bundle, manifest)
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise BundleError(f"bundle {config.bundle}: files {bad} are missing or do not match their sha256")
        need = config.worker_cpus * config.replicas * len(rt.slots) + 1
        rt._ray = start_ray(config.address, config.num_cpus, need, gpus=config.worker_gpus > 0)
        try:
            rt.pool = WorkerPool(rt._specs(), config.worker_cpus, config.worker_gpus, config.replicas)
            try:
                rt.pool.start()
            except WorkerRefused as exc:
                raise BundleError(f"bundle {config.bundle}: {exc}") from None
            asyncio.run(rt._check_outputs())
        except BaseException:
            rt.shutdown()
            raise
        return rt

    def _specs(self) -> dict[int, WorkerSpec]:
        c, b = self.config, self.bundle
        common = {
            "bundle_path": str(c.bundle.resolve()),
            "k": self.code.k,
            "architecture": b.architecture,
            "input_shape": list(b.input_shape),
            "trust_code": c.trust_code,
            "device": "cuda" if c.worker_gpus > 0 else "cpu",
            "num_threads": max(1, int(c.worker_cpus)),
            "max_rows": c.max_batch,
            "max_batch_size": c.max_batch_size,
            "host": c.worker_host or ("127.0.0.1" if self._ray is not None and self._ray.local else None),
        }
        return {
            w: WorkerSpec(w, s.row, s.kind, {**common, "sha256": b.pin(s.row), "parity": b.parity(s.row)})
            for w, s in self.slots.items()
        }

    async def _check_outputs(self) -> None:
        """One zero input through every worker's socket: each must answer ``(1, C)`` with
        C = the number of class names (a manifest whose class names do not fit its
        models would otherwise fail every request with a 502)."""
        x = np.zeros((1, *self.input_shape), dtype=np.float32)
        try:
            for w in sorted(self.slots):
                try:
                    out = await asyncio.wait_for(self._call(w, x, inject=False), 120)
                except (WorkerCallError, TimeoutError) as exc:
                    raise BundleError(
                        f"bundle {self.config.bundle}: worker {w} does not answer: {exc}"
                    ) from None
                classes = len(self.class_names) if self.class_names else out.shape[-1]
                if out.ndim != 2 or out.shape != (1, classes):
                    raise BundleError(
                        f"bundle {self.config.bundle}: worker {w} answers shape {out.shape} for one input, "
                        f"expected (1, {classes})"
                        + (" (one column per class name)" if self.class_names else "")
                    )
        finally:
            await self.close_channels()

    async def close_channels(self) -> None:
        """Close the running event loop's connections to the workers."""
        chans = self._channels.pop(asyncio.get_running_loop(), {})
        await asyncio.gather(*(ch.aclose() for ch in chans.values()), return_exceptions=True)

    def shutdown(self) -> None:
        """Stop every worker process; stop Ray if this runtime started it (removing
        its session folders). Safe to call twice."""
        try:
            if self.pool is not None:
                self.pool.shutdown()
        finally:
            if self._ray is not None:
                self._ray.stop()
                self._ray = None

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ requests
    def plan(self, mode: str) -> Plan:
        """The workers a request in ``mode`` goes to."""
        k, n = self.code.k, self.code.n
        replicas = {s.row: w for w, s in self.slots.items() if s.kind == "replica"}
        if mode == "coded":
            return Plan(tuple(range(n)))
        if mode == "uncoded":
            return Plan(tuple(range(k)))
        if not replicas:
            raise CoinferError(f"mode {mode!r} needs the baseline replicas; start the server with baselines")
        if mode == "replicated":
            return Plan(tuple(range(k)) + tuple(sorted(replicas.values())))
        if mode == "hedged":
            return Plan(tuple(range(k)), backups=replicas, hedge_after_s=self.hedge_ms / 1000.0)
        raise CoinferError(f"mode must be one of {list(MODES)}, got {mode!r}")

    def _channel(self, w: int) -> Channel:
        """A connection to one of worker ``w``'s processes (round robin), for the running loop."""
        addresses = self.pool.addresses(w) if self.pool is not None else []
        if not addresses:
            raise WorkerCallError(f"WorkerDown: worker {w} has no running process")
        addr = addresses[next(self._turn) % len(addresses)]
        loop = asyncio.get_running_loop()
        chans = self._channels.get(loop)
        if chans is None:
            chans = self._channels[loop] = {}
        ch = chans.get(addr)
        if ch is None or ch.closed:
            ch = chans[addr] = Channel(addr[0], addr[1], self.max_answer_bytes)
        return ch

    def _call(self, w: int, x: np.ndarray, inject: bool = True) -> asyncio.Future:
        """Send ``x`` to worker ``w`` now; the future of its answer (cancel it to cancel the call)."""
        inj = self.injections.get(w) if inject else None
        fail, delay = False, 0.0
        if inj is not None and inj.active:
            rng = self._rngs[w]
            fail = inj.sample_failure(rng)
            delay = 0.0 if fail else inj.sample_delay_s(rng)
        try:
            fut = self._channel(w).submit(x, fail=fail, delay_s=delay)
        except WorkerCallError as exc:
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(exc)
            return fut
        fut.add_done_callback(functools.partial(self._after_call, w))
        if inj is not None and inj.corrupt != "none":
            return self._corrupted(w, x, fut, inj.corrupt)
        return fut

    def _corrupted(self, w: int, x: np.ndarray, fut: asyncio.Future, kind: str) -> asyncio.Future:
        """Worker ``w``'s call ``fut``, its answer replaced on arrival by a well-formed wrong
        one (injected): random probabilities, or the answer of another data worker to ``x``
        (row j + 1's for data row j, row 0's for a parity). Cancelling it cancels both calls."""
        loop = asyncio.get_running_loop()
        out = loop.create_future()
        other = None
        if kind == "other":
            row = self.row_of[w]
            src = (row + 1) % self.code.k if row < self.code.k else 0
            try:
                other = self._channel(src).submit(x)
            except WorkerCallError:  # nothing to corrupt with: its own answer (as when it fails later)
                return fut
        seed = self._rngs[w].getrandbits(32)

        def finish(_: asyncio.Future) -> None:
            if out.done() or not fut.done():
                return
            if fut.cancelled() or fut.exception() is not None:  # the worker's own failure stands
                if fut.cancelled():
                    out.cancel()
                else:
                    out.set_exception(fut.exception())
                if other is not None:
                    other.cancel()
                return
            if other is None:
                shape = np.shape(fut.result())
                e = np.random.default_rng(seed).exponential(size=shape).astype(np.float32)
                out.set_result(e / e.sum(axis=-1, keepdims=True))
            elif other.done():
                if other.cancelled() or other.exception() is not None:
                    out.set_result(fut.result())  # nothing to corrupt with: its own answer
                else:
                    out.set_result(np.array(other.result(), dtype=np.float32, copy=True))

        fut.add_done_callback(finish)
        if other is not None:
            other.add_done_callback(finish)

        def cancelled(o: asyncio.Future) -> None:
            if o.cancelled():
                fut.cancel()
                if other is not None:
                    other.cancel()

        out.add_done_callback(cancelled)
        return out

    def _after_call(self, w: int, fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if isinstance(exc, WorkerCallError) and exc.reason.startswith(("WorkerUnreachable", "WorkerLost")):
            self._refresh_soon(w)

    def _refresh_soon(self, w: int) -> None:
        """Ask the pool for worker ``w``'s addresses again (Ray may have restarted its
        process on another port), at most once a second, off the event loop."""
        now = time.monotonic()
        if self.pool is None or w in self.down or now - self._refreshing.get(w, 0.0) < 1.0:
            return
        self._refreshing[w] = now
        pool = self.pool
        asyncio.get_running_loop().run_in_executor(None, pool.refresh, w)

    def _late(self, w: int, seconds: float, exc: BaseException | None, rows: int = 1) -> None:
        self.metrics.worker(w, seconds, failed=exc is not None)
        if exc is None:
            self.latency.observe(w, seconds, rows)
            self.health.success(w)
        else:
            self.health.failure(w, f"late call failed: {type(exc).__name__}")

    def set_decode_slack(self, value: float | str) -> None:
        """Set the decode slack: milliseconds >= 0 or ``"auto"``."""
        self.decode_slack = parse_decode_slack(value)

    def configure(self, **settings: Any) -> None:
        """Change live settings (:data:`coinfer.serving.config.LIVE_SETTINGS`; ``None``: unchanged),
        validated by :func:`coinfer.serving.config.check_settings`, all or none."""
        checked = check_settings(**settings)
        if "mode" in checked:
            self.plan(checked["mode"])  # e.g. a mode that needs baseline replicas that are not there
        for name, value in checked.items():
            setattr(self, name, value)

    def slack_policy(self) -> SlackPolicy:
        """The collector's decode-slack policy for the current setting."""
        fixed = None if self.decode_slack == "auto" else float(self.decode_slack) / 1000.0
        return SlackPolicy(
            fixed_s=fixed,
            tracker=self.latency,
            max_s=self.config.decode_slack_max_ms / 1000.0,
            worker_of_row={j: j for j in range(self.code.k)},
        )

    async def predict(self, x: np.ndarray, mode: str | None = None) -> Collection:
        """Send ``x`` (``(B, *input_shape)`` float32) to the mode's workers; collect and decode.

        While the usable workers cannot decode (``/healthz`` degraded), the request
        still goes out (so a recovered worker is noticed) but gives up after
        ``degraded_timeout_s`` with a :class:`CollectError` (HTTP 503), not a
        full-timeout wait.

        Raises:
            CollectError / CollectTimeout: no decodable set (the message names the workers).
        """
        mode = mode or self.mode
        plan = self.plan(mode)
        rows = len(x)
        degraded = not self._can_decode(plan)
        timeout = min(self.timeout_s, self.config.degraded_timeout_s) if degraded else self.timeout_s
        t0 = time.perf_counter()
        ended = [False]
        probes: dict[int, asyncio.Future] = {}  # a degraded request's calls, which outlive it
        call = (
            (lambda w: self._probe(w, x, mode, t0, rows, ended, probes))
            if degraded
            else (lambda w: self._call(w, x))
        )
        try:
            res = await collect(
                self.code,
                self.row_of,
                call,
                plan,
                timeout,
                down=self.down,
                on_late=lambda w, s, exc: self._late(w, s, exc, rows),
                slack=self.slack_policy(),
                shape=(rows, len(self.class_names) if self.class_names else None),
                verify=self.config.verify if mode == "coded" else None,
            )
        except CollectError as exc:
            self._account(mode, rows, t0, exc, timeout, _running(probes))
            if degraded and isinstance(exc, CollectTimeout):
                fast = CollectError(
                    f"no decodable set: the usable workers cannot decode (health degraded: "
                    f"{self.health_report()['unavailable']}), and none answered within the "
                    f"{timeout:g}s degraded timeout ({exc})",
                    exc.failed,
                    exc.pending,
                )
                fast.latency_s, fast.cancelled_s = exc.latency_s, exc.cancelled_s
                raise fast from None
            raise
        finally:  # also when the request itself is cancelled: its calls' outcomes are still recorded
            ended[0] = True
        self._account(mode, rows, t0, res, timeout, _running(probes))
        return res

    def _probe(
        self,
        w: int,
        x: np.ndarray,
        mode: str,
        t0: float,
        rows: int,
        ended: list[bool],
        probes: dict[int, asyncio.Future],
    ) -> asyncio.Future:
        """A call of a degraded request: the request gives up after the degraded timeout,
        but the call itself runs on up to the full request timeout, and its outcome after
        the request ended is recorded here, once (the request's own accounting leaves it
        out): an answer or failure as a late one (health, latency), so recovered workers
        that answer slower than the degraded timeout end the degraded state; a call cut
        off at the full timeout as a cancelled call that did not answer in time."""
        inner = self._call(w, x)
        if inner.done():  # failed at once (no process): the collector records it
            return inner
        started = time.perf_counter()
        probes[w] = inner
        loop = asyncio.get_running_loop()
        limit = loop.call_later(max(0.0, self.timeout_s - (started - t0)), inner.cancel)

        def done(f: asyncio.Future) -> None:
            limit.cancel()
            if not ended[0]:  # the collector records it
                return
            seconds = time.perf_counter() - started
            if not f.cancelled():
                self._late(w, seconds, f.exception(), rows)
                return
            self.metrics.cancelled(w)  # cut off at the full request timeout
            if mode == "coded":  # as _account: a lower bound of its latency
                self.latency.observe(w, seconds, rows)
            if w not in self.down:
                self.health.failure(w, f"no answer within the {self.timeout_s:g}s request timeout")

        inner.add_done_callback(done)
        return asyncio.shield(inner)

    def _account(
        self,
        mode: str,
        rows: int,
        t0: float,
        outcome: Collection | CollectError,
        timeout_s: float | None = None,
        running_on: frozenset[int] = frozenset(),
    ) -> None:
        """All the bookkeeping of one request, answered or not: the request metrics, each
        worker's latency and failure metrics, the decode-slack tracker and worker health.

        A cancelled call is neither a success nor a failure; in ``coded`` mode the time
        it had run is a lower bound of its latency and is fed to the decode-slack
        tracker (so cutting a straggler off never makes it look faster). In the other
        modes a data worker is cancelled when its replica or backup won, at the
        winner's time, which says nothing about its own latency: not fed.

        ``running_on``: workers whose calls the collector let go but that still run (a
        degraded request's, see :meth:`_probe`, which records their outcome): neither
        cancelled nor timed out here."""
        m = self.metrics
        if isinstance(outcome, Collection):
            m.request(mode, "ok", time.perf_counter() - t0)
            m.reconstructed(mode, sum(outcome.reconstructed))
            if outcome.verified is False:
                m.unverified(mode)
        elif isinstance(outcome, CollectTimeout):
            m.timeout(mode)
            m.request(mode, "timeout")
        else:
            m.request(mode, "failed")
        corrupt = getattr(outcome, "corrupt", {})
        for w, s in outcome.latency_s.items():
            m.worker(w, s)
            self.latency.observe(w, s, rows)
            if w not in corrupt:  # an answer located as corrupt is not a success
                self.health.success(w)
        for w, s in outcome.cancelled_s.items():
            if w in running_on:
                continue
            m.cancelled(w)
            if mode == "coded":
                self.latency.observe(w, s, rows)
        for w, reason in outcome.failed.items():
            m.worker(w, None, failed=True)
            if w not in self.down:  # down workers are not asked; /healthz reports them apart
                self.health.failure(w, reason)
        for w, count in corrupt.items():
            m.byzantine(w, count)
            # a call is a health failure when most of its inputs were located as corrupt: one
            # input of a batch is within the threshold's false-alarm rate (~1 % per input)
            if 2 * count >= rows:
                self.health.failure(w, f"corrupt output located on {count} of {rows} inputs")
        if isinstance(outcome, CollectTimeout):
            for w in outcome.pending:
                if w in running_on:
                    continue
                self.health.failure(
                    w, f"no answer within the {timeout_s or self.timeout_s:g}s request timeout"
                )

    def _usable(self, plan: Plan) -> tuple[list[int], dict[int, str]]:
        """The rows of ``plan``'s workers that are neither down nor failing, and why the others are not."""
        asked = sorted(set(plan.primary) | set(plan.backups.values()))
        failing = self.health.failing()
        reasons = {w: f"down ({self.down[w]})" for w in asked if w in self.down}
        reasons.update({w: failing[w] for w in asked if w in failing and w not in reasons})
        rows = sorted({self.row_of[w] for w in asked if w not in reasons})
        return rows, reasons

    def _can_decode(self, plan: Plan) -> bool:
        return self.code.can_decode(self._usable(plan)[0])

    def health_report(self) -> dict[str, Any]:
        """Whether requests in the default mode can still be decoded, and why not.

        Workers that are down (killed) or recently failing (see :class:`WorkerHealth`)
        are left out; the status is ``ok`` while the rows of the remaining workers
        of the default mode's plan still form a decodable set (for an MDS code,
        any k distinct rows), else ``degraded``."""
        rows, reasons = self._usable(self.plan(self.mode))
        failing = self.health.failing()
        ok = self.code.can_decode(rows)
        return {
            "status": "ok" if ok else "degraded",
            "mode": self.mode,
            "down": sorted(self.down),
            "failing": sorted(w for w in failing if w not in self.down),
            "unavailable": {str(w): r for w, r in sorted(reasons.items())},
            "usable_rows": rows,
            "detail": (
                f"rows {rows} of the {self.mode} mode's workers are usable"
                + ("" if ok else f"; a ({self.code.n}, {self.code.k}) code needs any {self.code.k} rows")
            ),
        }


def _running(probes: dict[int, asyncio.Future]) -> frozenset[int]:
    """The workers of ``probes`` whose calls have not ended."""
    return frozenset(w for w, f in probes.items() if not f.done())

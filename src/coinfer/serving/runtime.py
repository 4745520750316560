"""The serving runtime: Ray, the worker deployments, the modes and the admin actions.

Workers are Ray Serve deployments (one Serve application per worker, so one can
be killed or redeployed alone) reached through ``DeploymentHandle`` s; the
fan-out and the first-decodable-set logic (:func:`coinfer.serving.collector.collect`)
run in the frontend process. Serve's HTTP proxy is not used (``proxy_location
="Disabled"``): the frontend's own FastAPI app is the ingress (see
``docs/serving.md`` for why).

Workers ``0..n-1`` serve the bundle's rows (data models, then coded models);
with ``baselines=True`` workers ``n..n+r-1`` are second replicas of data models
``0..r-1``, used by the ``replicated`` and ``hedged`` modes so that every mode
runs on the same runtime with the same resources.

:meth:`Runtime.start` validates the manifest and verifies every file's sha256
once; each worker is then *pinned* to that verification (it gets the sha256 of
its file, the architecture and its parity structure, and refuses a file that
differs). :meth:`Runtime.restart` notices a refused replica from Serve's
deployment status, takes the worker's application down and marks the worker
down with the reason, instead of waiting for a worker that will never answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from coinfer.architectures import check_trusted
from coinfer.bundle import MANIFEST, Bundle
from coinfer.errors import BundleError, CoinferError
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
from coinfer.serving.injection import Injection
from coinfer.serving.metrics import Metrics

__all__ = [
    "MODES",
    "ServeConfig",
    "Runtime",
    "WorkerSlot",
    "WorkerRefused",
    "WorkerHealth",
    "parse_decode_slack",
]

log = logging.getLogger("coinfer.serving")


def _quiet_cancellations(record: logging.LogRecord) -> bool:
    """Drop Serve's INFO lines about cancelled calls: the collector cancels the calls
    it does not wait for on most requests (they are counted in the metrics instead)."""
    return record.levelno > logging.INFO or "cancel" not in str(record.msg).lower()


class WorkerHealth:
    """Recent outcomes of each worker's calls, for a ``/healthz`` that tells the truth.

    Plain Python, no Ray. A failure is an exception of that worker or a request
    timeout it did not answer in; a success is an answer (in time or late). A
    worker is *failing* while its last ``threshold`` outcomes of the last
    ``window_s`` seconds are all failures; one answer clears it, and outcomes
    older than the window are forgotten (a worker nobody asked for that long is
    not known to fail).

    Args:
        threshold: consecutive recent failures that make a worker failing.
        window_s: how long an outcome counts as recent.
        clock: the time source (seconds; for tests).
    """

    def __init__(
        self, threshold: int = 3, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if threshold < 1 or not window_s > 0:
            raise CoinferError(f"health threshold must be >= 1 and window > 0, got {threshold}, {window_s}")
        self.threshold, self.window_s, self._clock = threshold, window_s, clock
        self._recent: dict[int, deque[tuple[float, str | None]]] = {}  # worker -> (time, failure reason)

    def _add(self, worker: int, reason: str | None) -> None:
        q = self._recent.get(worker)
        if q is None:
            q = self._recent[worker] = deque(maxlen=self.threshold)
        q.append((self._clock(), reason))

    def success(self, worker: int) -> None:
        """``worker`` answered."""
        self._add(worker, None)

    def failure(self, worker: int, reason: str) -> None:
        """``worker`` raised or did not answer in time; ``reason`` says which."""
        self._add(worker, reason)

    def forget(self, worker: int) -> None:
        """Drop ``worker``'s outcomes (e.g. after a restart)."""
        self._recent.pop(worker, None)

    def failing(self) -> dict[int, str]:
        """worker -> reason, for the workers whose recent calls all failed."""
        since = self._clock() - self.window_s
        out = {}
        for w, q in self._recent.items():
            recent = [reason for t, reason in q if t >= since]
            if len(recent) == self.threshold and all(r is not None for r in recent):
                out[w] = f"last {self.threshold} calls failed (latest: {recent[-1]})"
        return out


@dataclass
class WorkerSlot:
    """One worker: its index, the code row it serves and its Serve application."""

    index: int
    row: int
    kind: str  # "data", "coded" or "replica"
    app: str
    handle: Any = None


class Runtime:
    """Ray + worker deployments + modes. Create with :meth:`start`; close with :meth:`shutdown`."""

    def __init__(self, config: ServeConfig, manifest: dict[str, Any]) -> None:
        self.config = config
        self.manifest = manifest
        self.architecture, self.code = Bundle.check_manifest(
            manifest, config.bundle / MANIFEST, config.max_condition
        )
        #: sha256 of every file, verified once at start; workers are pinned to it
        self.pins: dict[str, str] = dict(manifest["files"])
        self._removed: set[int] = set()  # workers whose Serve application was deleted
        self.input_shape = tuple(int(s) for s in manifest["input_shape"])
        self.class_names: list[str] | None = manifest.get("class_names")
        self.metrics = Metrics()
        self.mode = config.mode
        self.timeout_s = config.timeout_s
        self.hedge_ms = config.hedge_ms
        self.decode_slack: float | str = config.decode_slack  # ms or "auto"
        self.latency = LatencyTracker()  # recent worker-call latencies, for the auto slack
        self.injections: dict[int, Injection] = dict(config.injections)
        self.down: dict[int, str] = {}
        self.health = WorkerHealth()
        self.loop_router = True  # see _handle
        self._loop_handles: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.slots: dict[int, WorkerSlot] = {}
        self._started_ray = False  # this runtime called ray.init
        self._local_ray = False  # ... and started a local instance (not a cluster)
        k, r, n = self.code.k, self.code.r, self.code.n
        for i in range(n):
            self.slots[i] = WorkerSlot(i, i, "data" if i < k else "coded", f"coinfer-w{i}")
        if config.baselines:
            for j in range(min(r, k)):
                w = n + j
                self.slots[w] = WorkerSlot(w, j, "replica", f"coinfer-w{w}")
        self.row_of = {w: s.row for w, s in self.slots.items()}
        self.plan(self.mode)  # e.g. a default mode that needs the baseline replicas, without them

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def start(cls, config: ServeConfig) -> Runtime:
        """Verify the bundle, start or join Ray, deploy every worker and wait until they answer."""
        import ray
        from ray import serve

        manifest = Bundle.read_manifest(config.bundle)
        rt = cls(config, manifest)  # validates the manifest
        check_trusted(rt.architecture, config.trust_code, source=f"bundle {config.bundle}")
        checks = Bundle.check_files(config.bundle, manifest)
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise BundleError(f"bundle {config.bundle}: files {bad} are missing or do not match their sha256")
        if not ray.is_initialized():
            if config.address:
                ray.init(address=config.address, include_dashboard=False, logging_level=logging.WARNING)
            else:
                need = config.worker_cpus * config.replicas * len(rt.slots) + 1
                num_cpus = config.num_cpus or max(os.cpu_count() or 1, math.ceil(need))
                ray.init(
                    address="local",  # a new local instance, never a cluster found on this machine
                    num_cpus=num_cpus,
                    num_gpus=None if config.worker_gpus else 0,
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                )
            rt._started_ray = True
            rt._local_ray = not config.address
        serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
        serve_log = logging.getLogger("ray.serve")
        if _quiet_cancellations not in serve_log.filters:
            serve_log.addFilter(_quiet_cancellations)
        rt._deploy(list(rt.slots))
        try:
            rt._check_outputs()
        except BaseException:
            rt.shutdown()
            raise
        return rt

    def _check_outputs(self) -> None:
        """One zero input through every worker: each must answer ``(1, C)`` with
        C = the number of class names (a manifest whose class names do not fit
        its models would otherwise fail every request with a 502)."""
        x = np.zeros((1, *self.input_shape), dtype=np.float32)
        for w, slot in sorted(self.slots.items()):
            out = np.asarray(slot.handle.predict.remote(x, None).result(timeout_s=120))
            classes = len(self.class_names) if self.class_names else out.shape[-1]
            if out.ndim != 2 or out.shape != (1, classes):
                raise BundleError(
                    f"bundle {self.config.bundle}: worker {w} answers shape {out.shape} for one input, "
                    f"expected (1, {classes})" + (" (one column per class name)" if self.class_names else "")
                )

    def _application(self, slot: WorkerSlot):
        from coinfer.serving.worker import deployment

        c = self.config
        dep = deployment(c.worker_cpus, c.worker_gpus, c.replicas).options(name=f"worker{slot.index}")
        return dep.bind(
            str(self.config.bundle.resolve()),
            slot.row,
            slot.index,
            "cuda" if c.worker_gpus > 0 else "cpu",
            max(1, int(c.worker_cpus)),
            c.max_batch_size,
            0.002,
            c.seed,
            k=self.code.k,
            sha256=self.pins[Bundle.filename(slot.row, self.code.k)],
            architecture=self.architecture,
            parity=Bundle.parity_structure(self.manifest, slot.row, self.code),
            trust_code=c.trust_code,
        )

    def _targets(self, workers: list[int]) -> list[Any]:
        from ray import serve

        return [
            serve.RunTarget(
                self._application(self.slots[w]),
                name=self.slots[w].app,
                route_prefix=None,
                logging_config={"log_level": "WARNING", "enable_access_log": False},
            )
            for w in workers
        ]

    def _deploy(self, workers: list[int]) -> None:
        from ray import serve

        handles = serve.run_many(self._targets(workers))
        for w, h in zip(workers, handles, strict=True):
            self.slots[w].handle = h
        for w in workers:  # a first call per worker: fail early, warm up
            self.slots[w].handle.info.remote().result(timeout_s=120)

    def shutdown(self) -> None:
        """Delete the worker applications; stop Ray if this runtime started it.

        On a joined cluster only this runtime's Serve applications are deleted,
        so other Serve applications there keep running."""
        import ray
        from ray import serve

        try:
            if self._local_ray:
                serve.shutdown()
            else:
                for slot in self.slots.values():
                    try:
                        serve.delete(slot.app)
                    except Exception as exc:  # keep deleting the others
                        log.warning("could not delete Serve application %s: %s", slot.app, exc)
        finally:
            if self._started_ray and ray.is_initialized():
                ray.shutdown()

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

    def _handle(self, w: int) -> Any:
        """Worker ``w``'s handle for the running event loop, with Serve's router in
        this loop (``_run_router_in_separate_loop=False``) rather than in Serve's
        router thread: a call then needs no hop to another thread and back, which
        on a busy machine costs a thread wake-up each way. Falls back to the
        handle made at deployment where Serve lacks that option."""
        if not self.loop_router:
            return self.slots[w].handle
        loop = asyncio.get_running_loop()
        handles = self._loop_handles.get(loop)
        if handles is None:
            handles = self._loop_handles[loop] = {}
        h = handles.get(w)
        if h is None:
            from ray.serve.handle import DeploymentHandle

            try:  # a new handle (serve.get_deployment_handle would return its cached one)
                h = DeploymentHandle(f"worker{w}", self.slots[w].app)
                h._init(_run_router_in_separate_loop=False)
            except (AttributeError, TypeError, RuntimeError) as exc:
                log.warning("no same-loop Serve router (%s); using Serve's router thread", exc)
                self.loop_router = False
                return self.slots[w].handle
            handles[w] = h
        return h

    async def _call(self, w: int, x: np.ndarray) -> np.ndarray:
        inj = self.injections.get(w)
        resp = self._handle(w).predict.remote(x, inj.to_dict() if inj and inj.active else None)
        try:
            return await resp
        except asyncio.CancelledError:
            # the collector no longer needs this call: cancelling the awaiting task
            # does not stop the remote call, DeploymentResponse.cancel() does (best effort)
            resp.cancel()
            raise

    def _late(self, w: int, seconds: float, exc: BaseException | None) -> None:
        self.metrics.worker(w, seconds, failed=exc is not None)
        if exc is None:
            self.latency.observe(w, seconds)
            self.health.success(w)
        else:
            self.health.failure(w, f"late call failed: {type(exc).__name__}")

    def _record_health(
        self, answered: Iterable[int], failed: Mapping[int, str], silent: Iterable[int] = ()
    ) -> None:
        for w in answered:
            self.health.success(w)
        for w, reason in failed.items():
            if w not in self.down:  # down workers are not asked; /healthz reports them apart
                self.health.failure(w, reason)
        for w in silent:
            self.health.failure(w, f"no answer within the {self.timeout_s:g}s request timeout")

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

        Raises:
            CollectError / CollectTimeout: no decodable set (the message names the workers).
        """
        mode = mode or self.mode
        plan = self.plan(mode)
        t0 = time.perf_counter()
        try:
            res = await collect(
                self.code,
                self.row_of,
                lambda w: self._call(w, x),
                plan,
                self.timeout_s,
                down=self.down,
                on_late=self._late,
                slack=self.slack_policy(),
                shape=(len(x), len(self.class_names) if self.class_names else None),
            )
        except CollectTimeout as exc:
            self.metrics.timeout(mode)
            self.metrics.request(mode, "timeout")
            self._record_calls(mode, exc)
            self._record_health(exc.latency_s, exc.failed, exc.pending)
            raise
        except CoinferError as exc:
            self.metrics.request(mode, "failed")
            if isinstance(exc, CollectError):
                self._record_calls(mode, exc)
                self._record_health(exc.latency_s, exc.failed)
            raise
        self.metrics.request(mode, "ok", time.perf_counter() - t0)
        self.metrics.reconstructed(mode, sum(res.reconstructed))
        self._record_calls(mode, res)
        self._record_health(res.latency_s, res.failed)
        return res

    def _record_calls(self, mode: str, res: Collection | CollectError) -> None:
        """Per-worker metrics and latency samples of one request, answered or not.

        A cancelled call is neither a success nor a failure; in ``coded`` mode
        the time it had run is a lower bound of its latency and is fed to the
        decode-slack tracker (so cutting a straggler off never makes it look
        faster). In the other modes a data worker is cancelled when its replica
        or backup won, at the winner's time, which says nothing about its own
        latency: not fed."""
        for w, s in res.latency_s.items():
            self.metrics.worker(w, s)
            self.latency.observe(w, s)
        for w, s in res.cancelled_s.items():
            self.metrics.cancelled(w)
            if mode == "coded":
                self.latency.observe(w, s)
        for w in res.failed:
            self.metrics.worker(w, None, failed=True)

    def health_report(self) -> dict[str, Any]:
        """Whether requests in the default mode can still be decoded, and why not.

        Workers that are down (killed) or recently failing (see :class:`WorkerHealth`)
        are left out; the status is ``ok`` while the rows of the remaining workers
        of the default mode's plan still form a decodable set (for an MDS code,
        any k distinct rows), else ``degraded``."""
        plan = self.plan(self.mode)
        asked = sorted(set(plan.primary) | set(plan.backups.values()))
        failing = self.health.failing()
        reasons = {w: f"down ({self.down[w]})" for w in asked if w in self.down}
        reasons.update({w: failing[w] for w in asked if w in failing and w not in reasons})
        rows = sorted({self.row_of[w] for w in asked if w not in reasons})
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

    # ------------------------------------------------------------------ admin
    def check_worker(self, w: int) -> None:
        if w not in self.slots:
            raise CoinferError(f"worker {w} does not exist; workers are 0..{len(self.slots) - 1}")

    def set_injection(self, workers: list[int] | None, injection: Injection) -> None:
        """Set the delay/failure model of these workers (``None``: all)."""
        for w in workers if workers is not None else list(self.slots):
            self.check_worker(w)
            if injection.active:
                self.injections[w] = injection
            else:
                self.injections.pop(w, None)

    def clear_injections(self) -> None:
        self.injections.clear()

    def _replica_actor_names(self, w: int) -> list[tuple[str, str]]:
        import ray

        prefix = f"SERVE_REPLICA::{self.slots[w].app}#"
        return [
            (a["name"], a["namespace"])
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)
        ]

    def kill(self, w: int) -> dict[str, Any]:
        """Kill worker ``w``'s replica processes (SIGKILL through Ray) and mark it down.

        Serve's controller replaces killed replicas in the background; the frontend
        keeps the worker out of the pool until :meth:`restart` (an operator's action)."""
        import ray

        self.check_worker(w)
        names = self._replica_actor_names(w)
        killed = 0
        for name, ns in names:
            try:
                ray.kill(ray.get_actor(name, namespace=ns), no_restart=True)
                killed += 1
            except ValueError:  # already gone
                pass
        self.down[w] = "killed"
        return {"worker": w, "killed_replicas": killed}

    def startup_failure(self, w: int) -> str | None:
        """Why worker ``w``'s replicas fail to start, from Serve's deployment
        status (``serve.status()``), or None when Serve reports no such failure."""
        from ray import serve

        app = serve.status().applications.get(self.slots[w].app)
        if app is None:
            return None
        for dep in app.deployments.values():
            msg = dep.message or ""
            status = getattr(dep.status, "value", str(dep.status))  # a str Enum: "HEALTHY", ...
            if status != "HEALTHY" and ("failed to start" in msg or status == "DEPLOY_FAILED"):
                return _error_line(msg)
        return None

    def _delete_app(self, w: int) -> None:
        """Delete worker ``w``'s Serve application, so that Serve stops
        re-running a constructor that refuses to start."""
        from ray import serve

        try:
            serve.delete(self.slots[w].app)
            self._removed.add(w)
        except Exception as exc:  # keep the worker marked down regardless
            log.warning("could not delete Serve application %s: %s", self.slots[w].app, exc)

    async def restart(self, w: int, timeout_s: float = 120.0) -> dict[str, Any]:
        """Wait until worker ``w`` answers again (Serve replaces killed replicas), then use it again.

        A worker taken down by an earlier refused restart is redeployed first
        (pinned to the sha256 verified at start, as always).

        Raises:
            WorkerRefused: the worker's new replica refused to start (e.g. its
                model file changed on disk: "sha256 mismatch"); the worker is
                marked down with that reason and its application deleted; the
                other workers keep serving.
            CoinferError: no answer within ``timeout_s``.
        """
        from ray import serve

        self.check_worker(w)
        t0 = time.perf_counter()
        if w in self._removed:
            handles = await asyncio.to_thread(
                serve.run_many, self._targets([w]), wait_for_applications_running=False
            )
            self.slots[w].handle = handles[0]
            self._removed.discard(w)
        last = None
        while time.perf_counter() - t0 < timeout_s:
            reason = await asyncio.to_thread(self.startup_failure, w)
            if reason is not None:
                self.down[w] = f"refused to start: {reason}"
                await asyncio.to_thread(self._delete_app, w)
                raise WorkerRefused(f"worker {w} refused to start and stays down: {reason}", w, self.down[w])
            try:
                info = await asyncio.wait_for(self.slots[w].handle.info.remote(), timeout=3.0)
                self.down.pop(w, None)
                self.health.forget(w)
                return {"worker": w, "seconds": round(time.perf_counter() - t0, 3), **info}
            except Exception as exc:  # replica still starting
                last = exc
                await asyncio.sleep(0.5)
        raise CoinferError(f"worker {w} did not come back within {timeout_s:g}s: {last}")

    def state(self) -> dict[str, Any]:
        """Mode, timeouts, workers (row, kind, down) and injections."""
        return {
            "mode": self.mode,
            "timeout_s": self.timeout_s,
            "hedge_ms": self.hedge_ms,
            "decode_slack": self.decode_slack,
            "decode_slack_max_ms": self.config.decode_slack_max_ms,
            "auto_slack": {
                str(w): {
                    "samples": v["samples"],
                    "median_ms": round(1000 * v["median_s"], 3),
                    "q99_ms": None if v["quantile_s"] is None else round(1000 * v["quantile_s"], 3),
                }
                for w, v in self.latency.snapshot().items()
                if w < self.code.k
            },
            "workers": [
                {
                    "worker": w,
                    "row": s.row,
                    "kind": s.kind,
                    "down": self.down.get(w),
                    "injection": self.injections[w].to_dict() if w in self.injections else None,
                }
                for w, s in sorted(self.slots.items())
            ],
        }


class WorkerRefused(CoinferError):
    """A worker whose replica refused to start (its reason in ``reason``)."""

    def __init__(self, message: str, worker: int, reason: str) -> None:
        super().__init__(message)
        self.worker, self.reason = worker, reason


def _error_line(message: str) -> str:
    """The most telling line of a Serve startup-failure message: the one naming
    a changed file, else the last exception line of its traceback."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for ln in lines:
        if "sha256 mismatch" in ln:
            return ln
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln:
            return ln
    return lines[-1] if lines else "unknown startup failure"

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
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coinfer.bundle import Bundle
from coinfer.code import Code
from coinfer.errors import BundleError, CoinferError
from coinfer.serving.collector import (
    Collection,
    CollectTimeout,
    LatencyTracker,
    Plan,
    SlackPolicy,
    collect,
)
from coinfer.serving.injection import Injection
from coinfer.serving.metrics import Metrics

__all__ = ["MODES", "ServeConfig", "Runtime", "WorkerSlot", "parse_decode_slack"]

MODES = ("coded", "uncoded", "replicated", "hedged")
log = logging.getLogger("coinfer.serving")


def _quiet_cancellations(record: logging.LogRecord) -> bool:
    """Drop Serve's INFO lines about cancelled calls: the collector cancels the calls
    it does not wait for on most requests (they are counted in the metrics instead)."""
    return record.levelno > logging.INFO or "cancel" not in str(record.msg).lower()


def parse_decode_slack(value: float | int | str) -> float | str:
    """A decode slack setting: ``"auto"`` or milliseconds ``>= 0`` (numbers or numeric strings).

    Raises:
        CoinferError: anything else, naming the value.
    """
    given = value
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        try:
            value = float(text)
        except ValueError:
            raise CoinferError(f"decode slack must be 'auto' or milliseconds >= 0, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CoinferError(f"decode slack must be 'auto' or milliseconds >= 0, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise CoinferError(f"decode slack must be 'auto' or milliseconds >= 0, got {given!r}")
    return float(value)


@dataclass
class ServeConfig:
    """Settings of a serving runtime.

    Attributes:
        bundle: the bundle directory.
        address: Ray cluster address to join (``None``: start a local Ray).
        num_cpus: logical CPUs of a local Ray (default: enough for the workers).
        worker_cpus, worker_gpus: Ray resources per worker replica.
        replicas: Serve replicas per worker.
        max_batch_size, batch_wait_ms: Serve dynamic batching per worker.
        mode: default mode of requests that do not name one.
        timeout_s: request timeout (no decodable set by then: an error).
        hedge_ms: delay before the ``hedged`` mode sends its backup requests.
        decode_slack: once a decodable set has arrived, how long to wait for
            the data outputs still missing before decoding them: milliseconds,
            or ``"auto"`` (until the request is as old as the missing data
            workers' recent q99 latency, see
            :class:`coinfer.serving.collector.SlackPolicy`); ``0`` decodes at
            the first decodable set.
        decode_slack_max_ms: cap of the ``auto`` slack.
        baselines: deploy the r extra replicas used by ``replicated``/``hedged``.
        seed: seed of the injected delays.
        app_prefix: prefix of the Serve application names.
        max_batch: largest accepted batch per HTTP request.
        max_body_bytes: largest accepted HTTP body.
    """

    bundle: Path
    address: str | None = None
    num_cpus: float | None = None
    worker_cpus: float = 0.25
    worker_gpus: float = 0.0
    replicas: int = 1
    max_batch_size: int = 32
    batch_wait_ms: float = 2.0
    mode: str = "coded"
    timeout_s: float = 5.0
    hedge_ms: float = 20.0
    decode_slack: float | str = "auto"
    decode_slack_max_ms: float = 50.0
    baselines: bool = True
    seed: int = 0
    app_prefix: str = "coinfer"
    max_batch: int = 1024
    max_body_bytes: int = 8 * 1024 * 1024
    injections: dict[int, Injection] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bundle = Path(self.bundle)
        if self.mode not in MODES:
            raise CoinferError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.worker_cpus < 0 or self.worker_gpus < 0:
            raise CoinferError("worker CPUs and GPUs must be >= 0")
        if self.replicas < 1:
            raise CoinferError(f"replicas must be >= 1, got {self.replicas}")
        if not self.timeout_s > 0:
            raise CoinferError(f"timeout must be > 0 seconds, got {self.timeout_s}")
        self.decode_slack = parse_decode_slack(self.decode_slack)
        if not (math.isfinite(self.decode_slack_max_ms) and self.decode_slack_max_ms >= 0):
            raise CoinferError(f"decode slack cap must be >= 0 ms, got {self.decode_slack_max_ms}")


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
        self.code = Code.from_dict(manifest["code"])
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
        self.slots: dict[int, WorkerSlot] = {}
        self._started_ray = False  # this runtime called ray.init
        self._local_ray = False  # ... and started a local instance (not a cluster)
        k, r, n = self.code.k, self.code.r, self.code.n
        for i in range(n):
            self.slots[i] = WorkerSlot(i, i, "data" if i < k else "coded", f"{config.app_prefix}-w{i}")
        if config.baselines:
            for j in range(min(r, k)):
                w = n + j
                self.slots[w] = WorkerSlot(w, j, "replica", f"{config.app_prefix}-w{w}")
        self.row_of = {w: s.row for w, s in self.slots.items()}

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def start(cls, config: ServeConfig) -> Runtime:
        """Verify the bundle, start or join Ray, deploy every worker and wait until they answer."""
        import ray
        from ray import serve

        checks = Bundle.verify(config.bundle)
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise BundleError(f"bundle {config.bundle}: files {bad} are missing or do not match their sha256")
        manifest = Bundle.read_manifest(config.bundle)
        rt = cls(config, manifest)
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
        return rt

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
            c.batch_wait_ms / 1000.0,
            c.seed,
        )

    def _deploy(self, workers: list[int]) -> None:
        from ray import serve

        targets = [
            serve.RunTarget(
                self._application(self.slots[w]),
                name=self.slots[w].app,
                route_prefix=None,
                logging_config={"log_level": "WARNING", "enable_access_log": False},
            )
            for w in workers
        ]
        handles = serve.run_many(targets)
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

    async def _call(self, w: int, x: np.ndarray) -> np.ndarray:
        inj = self.injections.get(w)
        resp = self.slots[w].handle.predict.remote(x, inj.to_dict() if inj and inj.active else None)
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

    def set_decode_slack(self, value: float | str) -> None:
        """Set the decode slack: milliseconds >= 0 or ``"auto"``."""
        self.decode_slack = parse_decode_slack(value)

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
            for w in exc.failed:
                self.metrics.worker(w, None, failed=True)
            raise
        except CoinferError as exc:
            self.metrics.request(mode, "failed")
            for w in getattr(exc, "failed", {}):
                self.metrics.worker(w, None, failed=True)
            raise
        self.metrics.request(mode, "ok", time.perf_counter() - t0)
        self.metrics.reconstructed(mode, sum(res.reconstructed))
        for w, s in res.latency_s.items():
            self.metrics.worker(w, s)
            self.latency.observe(w, s)
        for w, s in res.cancelled_s.items():  # neither a success nor a failure
            self.metrics.cancelled(w)
            self.latency.observe(w, s)  # a lower bound of its latency
        for w in res.failed:
            self.metrics.worker(w, None, failed=True)
        return res

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

    async def restart(self, w: int, timeout_s: float = 120.0) -> dict[str, Any]:
        """Wait until worker ``w`` answers again (Serve replaces killed replicas), then use it again."""
        self.check_worker(w)
        t0 = time.perf_counter()
        last = None
        while time.perf_counter() - t0 < timeout_s:
            try:
                info = await asyncio.wait_for(self.slots[w].handle.info.remote(), timeout=5.0)
                self.down.pop(w, None)
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

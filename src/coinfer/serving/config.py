"""Settings of a serving runtime: :class:`ServeConfig` and the one validator of the
settings that can also change while serving (:func:`check_settings`, used at start
and by ``POST /admin/config``). Plain Python, no Ray."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coinfer.errors import CoinferError
from coinfer.serving.injection import Injection

__all__ = ["MODES", "LIVE_SETTINGS", "ServeConfig", "check_settings", "parse_decode_slack"]

MODES = ("coded", "uncoded", "replicated", "hedged")

#: The settings ``POST /admin/config`` may change on a running server.
LIVE_SETTINGS = ("mode", "timeout_s", "hedge_ms", "decode_slack")


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


def _number(name: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CoinferError(f"{name} must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise CoinferError(f"{name} must be > 0, got {value!r}")
    if not positive and not value >= 0:
        raise CoinferError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def check_settings(**settings: Any) -> dict[str, Any]:
    """Validate settings of :data:`LIVE_SETTINGS` (``None`` values are left out) and
    return them normalised; the same rules hold at start and on a running server.

    Raises:
        CoinferError: an unknown setting or a value out of range, naming it.
    """
    out: dict[str, Any] = {}
    for name, value in settings.items():
        if value is None:
            continue
        if name == "mode":
            if value not in MODES:
                raise CoinferError(f"mode must be one of {list(MODES)}, got {value!r}")
            out[name] = value
        elif name == "timeout_s":
            out[name] = _number("timeout_s", value, positive=True)
        elif name == "hedge_ms":
            out[name] = _number("hedge_ms", value, positive=False)
        elif name == "decode_slack":
            out[name] = parse_decode_slack(value)
        else:
            raise CoinferError(f"unknown setting {name!r}; settings are {list(LIVE_SETTINGS)}")
    return out


@dataclass
class ServeConfig:
    """Settings of a serving runtime.

    Attributes:
        bundle: the bundle directory.
        address: Ray cluster address to join (``None``: start a local Ray).
        num_cpus: logical CPUs of a local Ray (default: enough for the workers).
        worker_cpus, worker_gpus: Ray resources per worker process.
        replicas: worker processes per worker (requests are spread over them).
        max_batch_size: a worker runs the requests queued behind a busy model
            together, up to this many rows (a request that finds it idle runs at once).
        mode: default mode of requests that do not name one.
        timeout_s: request timeout (no decodable set by then: an error).
        degraded_timeout_s: request timeout while ``/healthz`` says degraded
            (the usable workers cannot decode): such requests still go out, so
            a recovered worker is noticed, but the client hears 503 within this time.
        hedge_ms: delay before the ``hedged`` mode sends its backup requests.
        decode_slack: once a decodable set has arrived, how long to wait for
            the data outputs still missing before decoding them: milliseconds,
            or ``"auto"`` (until the request is as old as the missing data
            workers' recent q99 latency for a batch of that size, see
            :class:`coinfer.serving.collector.SlackPolicy`); ``0`` decodes at
            the first decodable set.
        decode_slack_max_ms: cap of the ``auto`` slack beyond the batch's expected time.
        baselines: start the r extra data-model replicas used by ``replicated``/``hedged``.
        seed: seed of the injected delays.
        worker_host: address the workers listen on (``None``: their Ray node's
            address; ``127.0.0.1`` on a local Ray).
        max_batch: largest accepted batch per HTTP request.
        max_body_bytes: largest accepted HTTP body.
        trust_code: allow a bundle whose architecture is code
            (``package.module:factory``), imported and called in every worker;
            without it such a bundle is refused before any worker starts.
        verify: coded mode: locate a corrupt worker's output with this residual
            threshold (:meth:`coinfer.Code.locate`; needs r >= 2: each request then
            waits, within the decode slack, for k + 2 outputs). ``None``: off.
        max_condition: largest decoding condition number accepted (default
            1e6); the manifest's recorded limit can only lower it.
        body_timeout_s: longest time to receive a request body (then HTTP 408).
        max_inflight: most prediction requests handled at once (admitted once
            their body has arrived); more get a fast HTTP 503 ``overloaded``
            (``None``: :attr:`inflight_limit`'s default).
        max_body_readers: most request bodies being received at once; more get
            a fast 503 ``overloaded`` (``None``: :attr:`body_reader_limit`'s default).
    """

    bundle: Path
    address: str | None = None
    num_cpus: float | None = None
    worker_cpus: float = 0.25
    worker_gpus: float = 0.0
    replicas: int = 1
    max_batch_size: int = 32
    mode: str = "coded"
    timeout_s: float = 5.0
    degraded_timeout_s: float = 0.5
    hedge_ms: float = 20.0
    decode_slack: float | str = "auto"
    decode_slack_max_ms: float = 50.0
    baselines: bool = True
    seed: int = 0
    worker_host: str | None = None
    max_batch: int = 1024
    max_body_bytes: int = 8 * 1024 * 1024
    max_inflight: int | None = None
    max_body_readers: int | None = None
    body_timeout_s: float = 10.0
    injections: dict[int, Injection] = field(default_factory=dict)
    trust_code: bool = False
    max_condition: float | None = None
    verify: float | None = None

    def __post_init__(self) -> None:
        self.bundle = Path(self.bundle)
        live = check_settings(
            mode=self.mode, timeout_s=self.timeout_s, hedge_ms=self.hedge_ms, decode_slack=self.decode_slack
        )
        self.timeout_s, self.hedge_ms, self.decode_slack = (
            live["timeout_s"],
            live["hedge_ms"],
            live["decode_slack"],
        )
        if self.worker_cpus < 0 or self.worker_gpus < 0:
            raise CoinferError("worker CPUs and GPUs must be >= 0")
        if self.replicas < 1:
            raise CoinferError(f"replicas must be >= 1, got {self.replicas}")
        if self.max_batch_size < 1:
            raise CoinferError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        _number("degraded_timeout_s", self.degraded_timeout_s, positive=True)
        _number("body_timeout_s", self.body_timeout_s, positive=True)
        _number("decode_slack_max_ms", self.decode_slack_max_ms, positive=False)
        if self.verify is not None:
            self.verify = _number("verify", self.verify, positive=True)
        for name in ("max_inflight", "max_body_readers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise CoinferError(f"{name} must be an integer >= 1 (or None for the default), got {value!r}")

    @property
    def inflight_limit(self) -> int:
        """The admission bound: :attr:`max_inflight`, or by default
        ``2 * max_batch_size * replicas``.

        Every request goes to every worker of its mode, so each worker sees all
        requests in flight; two full batches per worker process (one running,
        one queued) keep the batching at its best, and more requests in flight
        only wait in the workers' queues, adding latency but no throughput."""
        if self.max_inflight is not None:
            return self.max_inflight
        return 2 * self.max_batch_size * self.replicas

    @property
    def body_reader_limit(self) -> int:
        """Most bodies received at once: :attr:`max_body_readers`, or by default
        ``4 * inflight_limit`` (slow senders then cannot take the admission slots)."""
        if self.max_body_readers is not None:
            return self.max_body_readers
        return 4 * self.inflight_limit

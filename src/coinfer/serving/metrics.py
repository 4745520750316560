"""Prometheus metrics of the frontend, through ``prometheus_client`` (installed with Ray).

Each :class:`Metrics` has its own ``CollectorRegistry``, so several servers in one
process (tests, benchmarks) keep separate counts."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

__all__ = ["Metrics", "LATENCY_BUCKETS_S", "CONTENT_TYPE"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The ``Content-Type`` of :meth:`Metrics.render`'s text."""

LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Metrics:
    """Counters and histograms of requests, reconstructions and workers, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], object] = {}
        reg = self.registry
        self._requests = Counter(
            "coinfer_requests_total",
            "Prediction requests by mode and outcome.",
            ["mode", "status"],
            registry=reg,
        )
        self._bad_requests = Counter(
            "coinfer_bad_requests_total", "Rejected requests by reason.", ["reason"], registry=reg
        )
        self._latency = Histogram(
            "coinfer_request_latency_seconds",
            "End-to-end frontend latency of answered requests.",
            ["mode"],
            buckets=LATENCY_BUCKETS_S,
            registry=reg,
        )
        self._reconstructions = Counter(
            "coinfer_reconstructions_total",
            "Data outputs decoded from other workers.",
            ["mode"],
            registry=reg,
        )
        self._timeouts = Counter(
            "coinfer_timeouts_total",
            "Requests with no decodable set within the timeout.",
            ["mode"],
            registry=reg,
        )
        self._worker_latency = Histogram(
            "coinfer_worker_latency_seconds",
            "Per-worker latency (answers in time and late ones).",
            ["worker"],
            buckets=LATENCY_BUCKETS_S,
            registry=reg,
        )
        self._worker_failures = Counter(
            "coinfer_worker_failures_total",
            "Failed calls per worker (errors, down, killed).",
            ["worker"],
            registry=reg,
        )
        self._overloaded = Counter(
            "coinfer_overloaded_total",
            "Requests refused with 503 because too many were in flight.",
            registry=reg,
        )
        self._worker_cancelled = Counter(
            "coinfer_worker_cancelled_total",
            "Calls cancelled because their request had answered or failed.",
            ["worker"],
            registry=reg,
        )
        self._byzantine = Counter(
            "coinfer_byzantine_detected_total",
            "Inputs on which a worker's output was located as corrupt (answered from the others).",
            ["worker"],
            registry=reg,
        )
        self._unverified = Counter(
            "coinfer_unverified_total",
            "Requests asked to verify their outputs that had fewer than k + 2 of them in time.",
            ["mode"],
            registry=reg,
        )

    def byzantine(self, worker: int, count: int) -> None:
        """``count`` inputs on which ``worker``'s output was located as corrupt."""
        if count:
            self._child(self._byzantine, str(worker)).inc(count)

    def unverified(self, mode: str) -> None:
        """A request asked to verify its outputs that had fewer than k + 2 of them."""
        self._child(self._unverified, mode).inc()

    def _child(self, metric, *labels: str):
        """``metric.labels(*labels)``, looked up once (the request path calls this per worker call)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request(self, mode: str, status: str, seconds: float | None = None) -> None:
        """Count a prediction request of ``mode`` with outcome ``status``; record its latency if given."""
        self._child(self._requests, mode, status).inc()
        if seconds is not None:
            self._child(self._latency, mode).observe(seconds)

    def worker(self, worker: int, seconds: float | None, failed: bool = False) -> None:
        """Record a worker call: a failure, or its latency."""
        if failed:
            self._child(self._worker_failures, str(worker)).inc()
        elif seconds is not None:
            self._child(self._worker_latency, str(worker)).observe(seconds)

    def cancelled(self, worker: int) -> None:
        """A call of ``worker`` cancelled because its request no longer needed it."""
        self._child(self._worker_cancelled, str(worker)).inc()

    def reconstructed(self, mode: str, count: int) -> None:
        """Count ``count`` data outputs decoded instead of received."""
        if count:
            self._child(self._reconstructions, mode).inc(count)

    def timeout(self, mode: str) -> None:
        """Count a request that found no decodable set in time."""
        self._timeouts.labels(mode=mode).inc()

    def bad_request(self, reason: str) -> None:
        """Count a rejected request by its reason code."""
        self._bad_requests.labels(reason=reason).inc()

    def overloaded(self) -> None:
        """A request refused at admission (too many in flight)."""
        self._overloaded.inc()

    def render(self) -> str:
        """The Prometheus exposition text (``Content-Type``: :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry).decode()

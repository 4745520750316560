"""Prometheus text-format metrics of the frontend (no extra dependency)."""

from __future__ import annotations

import threading
from collections import defaultdict

__all__ = ["Metrics", "LATENCY_BUCKETS_S"]

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


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        i = 0
        while i < len(LATENCY_BUCKETS_S) and v > LATENCY_BUCKETS_S[i]:
            i += 1
        self.counts[i] += 1
        self.sum += v
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, cum = [], 0
        sep = "," if labels else ""
        for b, c in zip(LATENCY_BUCKETS_S, self.counts, strict=False):
            cum += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {cum}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        lb = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{lb} {self.sum:.6f}")
        out.append(f"{name}_count{lb} {self.n}")
        return out


class Metrics:
    """Counters and histograms of requests, reconstructions and workers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)  # (mode, status)
        self.latency: dict[str, _Histogram] = defaultdict(_Histogram)  # mode
        self.reconstructions: dict[str, int] = defaultdict(int)  # mode -> data outputs decoded
        self.worker_latency: dict[str, _Histogram] = defaultdict(_Histogram)  # worker
        self.worker_failures: dict[str, int] = defaultdict(int)
        self.worker_cancelled: dict[str, int] = defaultdict(int)
        self.timeouts: dict[str, int] = defaultdict(int)
        self.bad_requests: dict[str, int] = defaultdict(int)  # reason

    def request(self, mode: str, status: str, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[(mode, status)] += 1
            if seconds is not None:
                self.latency[mode].observe(seconds)

    def worker(self, worker: int, seconds: float | None, failed: bool = False) -> None:
        with self._lock:
            if failed:
                self.worker_failures[str(worker)] += 1
            elif seconds is not None:
                self.worker_latency[str(worker)].observe(seconds)

    def cancelled(self, worker: int) -> None:
        """A call of ``worker`` cancelled because its request no longer needed it."""
        with self._lock:
            self.worker_cancelled[str(worker)] += 1

    def reconstructed(self, mode: str, count: int) -> None:
        if count:
            with self._lock:
                self.reconstructions[mode] += count

    def timeout(self, mode: str) -> None:
        with self._lock:
            self.timeouts[mode] += 1

    def bad_request(self, reason: str) -> None:
        with self._lock:
            self.bad_requests[reason] += 1

    def render(self) -> str:
        """The Prometheus exposition text."""
        with self._lock:
            lines = [
                "# HELP coinfer_requests_total Prediction requests by mode and outcome.",
                "# TYPE coinfer_requests_total counter",
            ]
            for (mode, status), c in sorted(self.requests.items()):
                lines.append(f'coinfer_requests_total{{mode="{mode}",status="{status}"}} {c}')
            lines += [
                "# HELP coinfer_bad_requests_total Rejected requests by reason.",
                "# TYPE coinfer_bad_requests_total counter",
            ]
            for reason, c in sorted(self.bad_requests.items()):
                lines.append(f'coinfer_bad_requests_total{{reason="{reason}"}} {c}')
            lines += [
                "# HELP coinfer_request_latency_seconds End-to-end frontend latency of answered requests.",
                "# TYPE coinfer_request_latency_seconds histogram",
            ]
            for mode, h in sorted(self.latency.items()):
                lines += h.lines("coinfer_request_latency_seconds", f'mode="{mode}"')
            lines += [
                "# HELP coinfer_reconstructions_total Data outputs decoded from other workers.",
                "# TYPE coinfer_reconstructions_total counter",
            ]
            for mode, c in sorted(self.reconstructions.items()):
                lines.append(f'coinfer_reconstructions_total{{mode="{mode}"}} {c}')
            lines += [
                "# HELP coinfer_timeouts_total Requests with no decodable set within the timeout.",
                "# TYPE coinfer_timeouts_total counter",
            ]
            for mode, c in sorted(self.timeouts.items()):
                lines.append(f'coinfer_timeouts_total{{mode="{mode}"}} {c}')
            lines += [
                "# HELP coinfer_worker_latency_seconds Per-worker latency of answered calls.",
                "# TYPE coinfer_worker_latency_seconds histogram",
            ]
            for w, h in sorted(self.worker_latency.items(), key=lambda kv: int(kv[0])):
                lines += h.lines("coinfer_worker_latency_seconds", f'worker="{w}"')
            lines += [
                "# HELP coinfer_worker_failures_total Failed calls per worker (errors, down, killed).",
                "# TYPE coinfer_worker_failures_total counter",
            ]
            for w, c in sorted(self.worker_failures.items(), key=lambda kv: int(kv[0])):
                lines.append(f'coinfer_worker_failures_total{{worker="{w}"}} {c}')
            lines += [
                "# HELP coinfer_worker_cancelled_total Calls cancelled because their request had answered or failed.",
                "# TYPE coinfer_worker_cancelled_total counter",
            ]
            for w, c in sorted(self.worker_cancelled.items(), key=lambda kv: int(kv[0])):
                lines.append(f'coinfer_worker_cancelled_total{{worker="{w}"}} {c}')
        return "\n".join(lines) + "\n"

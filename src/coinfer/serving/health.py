"""Which workers are failing, from the outcomes of their recent calls (plain Python, no Ray)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from coinfer.errors import CoinferError

__all__ = ["WorkerHealth"]


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

"""The admin actions on a running runtime: injection, kill, restart and its state.

A mixin of :class:`coinfer.serving.runtime.Runtime`, apart from the request path:
what an operator (the loopback admin API, ``coinfer admin``) does to the workers.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from coinfer.errors import CoinferError
from coinfer.serving.channel import WorkerCallError
from coinfer.serving.injection import Injection
from coinfer.serving.pool import WorkerPool, WorkerRefused

__all__ = ["AdminActions"]


class AdminActions:
    """Injection, kill, restart and state of a :class:`~coinfer.serving.runtime.Runtime`
    (its slots, pool, down workers, health, latency tracker and settings)."""

    slots: dict[int, Any]
    injections: dict[int, Injection]
    pool: WorkerPool | None
    down: dict[int, str]
    _kills: dict[int, int]

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

    def _pool(self) -> WorkerPool:
        if self.pool is None:
            raise CoinferError("the runtime has no worker pool (not started)")
        return self.pool

    def kill(self, w: int) -> dict[str, Any]:
        """SIGKILL worker ``w``'s processes (through Ray) and mark it down; it stays
        out of the pool until :meth:`restart` (an operator's action)."""
        self.check_worker(w)
        killed = self._pool().kill(w)
        self.down[w] = "killed"
        self._kills[w] = self._kills.get(w, 0) + 1
        return {"worker": w, "killed_replicas": killed}

    async def restart(self, w: int, timeout_s: float = 120.0) -> dict[str, Any]:
        """Start new processes for worker ``w`` (pinned to the sha256 verified at start),
        wait until one answers through the data plane, then use it again.

        Raises:
            WorkerRefused: the new process refused to start (e.g. its model file changed
                on disk: "sha256 mismatch"); the worker is marked down with that reason
                and no process of it is left running; the other workers keep serving.
            CoinferError: no answer within ``timeout_s``.
        """
        self.check_worker(w)
        pool = self._pool()
        t0 = time.perf_counter()
        kills = self._kills.get(w, 0)
        self.down.setdefault(w, "restarting")
        try:
            started = await asyncio.wait_for(asyncio.to_thread(pool.restart, w), timeout_s)
        except WorkerRefused as exc:
            self.down[w] = f"refused to start: {exc.reason}"
            raise
        except TimeoutError:
            raise CoinferError(f"worker {w} did not start within {timeout_s:g}s") from None
        x = np.zeros((1, *self.input_shape), dtype=np.float32)
        try:
            await asyncio.wait_for(
                self._call(w, x, inject=False), max(1.0, timeout_s - (time.perf_counter() - t0))
            )
        except (WorkerCallError, TimeoutError) as exc:
            raise CoinferError(f"worker {w} started but does not answer: {exc}") from None
        if self._kills.get(w, 0) != kills:  # killed meanwhile: the later action wins
            pool.kill(w)
            raise CoinferError(f"worker {w} was killed while it restarted; it stays down")
        self.down.pop(w, None)
        self.health.forget(w)
        return {"worker": w, "seconds": round(time.perf_counter() - t0, 3), "row": self.row_of[w], **started}

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

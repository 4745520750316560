"""The first-decodable-set collector: plain Python and asyncio, no Ray.

A request is sent to a set of workers. Each worker ``w`` produces the output of
one *row* of the code's generator (``row_of[w]``): rows ``0..k-1`` are the data
models, ``k..n-1`` the coded models, and a replica of data model ``j`` also
produces row ``j``. The collector returns as soon as the rows that have arrived
can be decoded (any ``k`` distinct rows of an MDS code), decodes the missing data
rows with :meth:`Code.decode`, and drops the late workers.

The same loop runs every serving mode: ``coded`` sends to all ``n`` rows,
``uncoded`` to the ``k`` data rows, ``replicated`` to the data rows and to
replicas, ``hedged`` to the data rows and, after ``hedge_after_s``, to a
replica of each data row still missing (see :class:`Plan`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from coinfer.code import Code
from coinfer.errors import CoinferError

__all__ = ["Plan", "Collection", "CollectError", "CollectTimeout", "collect"]


class CollectError(CoinferError):
    """No decodable set can arrive any more: too many workers failed or are down.

    Attributes:
        failed: worker -> reason, for workers that failed or were down.
        pending: workers that had not answered when the request gave up.
    """

    def __init__(self, message: str, failed: Mapping[int, str], pending: Sequence[int]):
        super().__init__(message)
        self.failed = dict(failed)
        self.pending = list(pending)


class CollectTimeout(CollectError):
    """No decodable set arrived within the request timeout."""


@dataclass(frozen=True)
class Plan:
    """Which workers a request goes to.

    Attributes:
        primary: workers asked at once.
        backups: ``primary worker -> backup worker`` producing the same row; a
            backup is asked when its primary fails (or is down), and, if
            ``hedge_after_s`` is set, when the primary has not answered by then.
        hedge_after_s: delay before backups are sent to slow primaries
            (``None``: only on failure).
    """

    primary: tuple[int, ...]
    backups: Mapping[int, int] = field(default_factory=dict)
    hedge_after_s: float | None = None


@dataclass
class Collection:
    """The outcome of one request.

    Attributes:
        outputs: ``(k, B, C)`` data outputs; reconstructed rows are projected
            onto the probability simplex.
        reconstructed: for each data model, whether its output was decoded
            from other rows rather than received.
        used: worker -> row, the workers whose outputs were used.
        latency_s: worker -> seconds, for workers that answered in time.
        failed: worker -> reason, for workers that failed or were down.
        late: workers asked but not waited for.
        backups_sent: backup workers that were asked.
    """

    outputs: torch.Tensor
    reconstructed: list[bool]
    used: dict[int, int]
    latency_s: dict[int, float]
    failed: dict[int, str]
    late: list[int]
    backups_sent: list[int]


def _describe(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)  # Ray wraps the worker's exception
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:300] if first else type(exc).__name__


async def collect(
    code: Code,
    row_of: Mapping[int, int],
    call: Callable[[int], Awaitable[np.ndarray | torch.Tensor]],
    plan: Plan,
    timeout_s: float,
    down: Mapping[int, str] | None = None,
    on_late: Callable[[int, float, BaseException | None], None] | None = None,
) -> Collection:
    """Ask workers for their outputs and return at the first decodable set.

    Args:
        code: the bundle's code.
        row_of: worker -> generator row (``0..n-1``) it produces.
        call: ``call(worker)`` returns an awaitable of that worker's
            ``(B, C)`` probabilities.
        plan: primaries, backups and hedging delay.
        timeout_s: give up (:class:`CollectTimeout`) if no decodable set has
            arrived by then.
        down: workers known to be down (worker -> reason); they are not asked,
            and count as failed at once.
        on_late: called as ``on_late(worker, seconds, exception)`` when a
            worker that was not waited for finishes (for metrics).

    Raises:
        CollectError: failures leave too few rows to decode (raised as soon as
            that is certain, not at the timeout).
        CollectTimeout: no decodable set within ``timeout_s``; names the
            workers that did not answer.
    """
    down = dict(down or {})
    t0 = time.perf_counter()
    deadline = t0 + timeout_s
    tasks: dict[asyncio.Task, int] = {}
    started: dict[int, float] = {}
    received: dict[int, torch.Tensor] = {}  # row -> output
    used: dict[int, int] = {}
    latency: dict[int, float] = {}
    failed: dict[int, str] = {}
    backups_left = dict(plan.backups)
    backups_sent: list[int] = []

    def launch(w: int) -> None:
        if w in down:
            failed[w] = f"down ({down[w]})"
            after_failure(w)
            return
        started[w] = time.perf_counter()
        tasks[asyncio.ensure_future(call(w))] = w

    def after_failure(w: int) -> None:
        b = backups_left.pop(w, None)
        if b is not None:
            backups_sent.append(b)
            launch(b)

    def reachable_rows() -> set[int]:
        rows = set(received)
        rows.update(row_of[w] for w in tasks.values())
        rows.update(row_of[b] for b in backups_left.values())
        return rows

    def finish_late(task: asyncio.Task, w: int) -> None:
        # keep late answers' latency for metrics and retrieve their exceptions
        def done(t: asyncio.Task) -> None:
            if t.cancelled():
                return
            exc = t.exception()
            if on_late is not None:
                on_late(w, time.perf_counter() - started[w], exc)

        task.add_done_callback(done)

    for w in plan.primary:
        launch(w)
    hedge_at = None if plan.hedge_after_s is None else t0 + plan.hedge_after_s

    try:
        while not code.can_decode(list(received)):
            if not code.can_decode(list(reachable_rows())):
                missing = sorted(set(range(code.n)) - reachable_rows())
                raise CollectError(
                    f"cannot decode: workers {sorted(failed)} failed or are down "
                    f"({'; '.join(f'{w}: {r}' for w, r in sorted(failed.items()))}), so rows "
                    f"{missing} cannot arrive; a ({code.n}, {code.k}) code needs any {code.k} "
                    f"rows and tolerates at most r={code.r} missing",
                    failed,
                    sorted(tasks.values()),
                )
            now = time.perf_counter()
            wake = deadline if hedge_at is None else min(deadline, hedge_at)
            if now >= deadline:
                pending = sorted(tasks.values())
                raise CollectTimeout(
                    f"no decodable set within {timeout_s:g}s: workers {pending} did not answer"
                    + (f" and workers {sorted(failed)} failed" if failed else "")
                    + f" (got rows {sorted(received)}, need any {code.k} of {code.n})",
                    failed,
                    pending,
                )
            if hedge_at is not None and now >= hedge_at:
                hedge_at = None
                for w in sorted(tasks.values()):
                    b = backups_left.pop(w, None)
                    if b is not None and row_of[b] not in received:
                        backups_sent.append(b)
                        launch(b)
                continue
            if not tasks:  # nothing in flight, but rows still reachable via backups
                await asyncio.sleep(max(0.0, wake - now))
                continue
            done, _ = await asyncio.wait(
                list(tasks), timeout=max(0.0, wake - now), return_when=asyncio.FIRST_COMPLETED
            )
            # handle completions in the order they were started: deterministic for ties
            for task in sorted(done, key=lambda t: started[tasks[t]]):
                w = tasks.pop(task)
                exc = task.exception()
                if exc is not None:
                    failed[w] = _describe(exc)
                    after_failure(w)
                    continue
                latency[w] = time.perf_counter() - started[w]
                row = row_of[w]
                if row not in received and not code.can_decode(list(received)):
                    out = task.result()
                    received[row] = out if isinstance(out, torch.Tensor) else torch.tensor(out)
                    used[w] = row
    finally:
        for task, w in tasks.items():
            finish_late(task, w)

    outputs = code.decode(received, project=True)
    reconstructed = [j not in received for j in range(code.k)]
    return Collection(
        outputs=outputs,
        reconstructed=reconstructed,
        used=used,
        latency_s=latency,
        failed=failed,
        late=sorted(tasks.values()),
        backups_sent=backups_sent,
    )

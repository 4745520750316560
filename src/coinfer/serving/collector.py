"""The collector: plain Python and asyncio, no Ray.

A request is sent to a set of workers. Each worker ``w`` produces the output of
one *row* of the code's generator (``row_of[w]``): rows ``0..k-1`` are the data
models, ``k..n-1`` the coded models, and a replica of data model ``j`` also
produces row ``j``. Once the rows that have arrived can be decoded (any ``k``
distinct rows of an MDS code), the collector waits up to a *decode slack* for
the data rows still missing (like erasure-coded storage, which reads parity
only when a fragment is missing), then decodes whatever is still missing with
:meth:`Code.decode` and cancels the calls it no longer needs.

Every output it returns is checked: a received output that is not a finite
``(B, C)`` probability vector per input counts as that worker failing
(``bad_output: ...``) and the collector goes on with the others.

The same loop runs every serving mode: ``coded`` sends to all ``n`` rows,
``uncoded`` to the ``k`` data rows, ``replicated`` to the data rows and to
replicas, ``hedged`` to the data rows and, after ``hedge_after_s``, to a
replica of each data row still missing (see :class:`Plan`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from coinfer.code import Code
from coinfer.errors import CoinferError

__all__ = [
    "Plan",
    "Collection",
    "CollectError",
    "CollectTimeout",
    "BadWorkerOutput",
    "LatencyTracker",
    "SlackPolicy",
    "check_probabilities",
    "collect",
]

#: A decoded or received row must sum to 1 within this (float32 softmax sums are ~1e-6 off).
SUM_TOL = 1e-3
#: ... and hold no entry below ``-NEG_TOL``.
NEG_TOL = 1e-6


class CollectError(CoinferError):
    """No decodable set can arrive any more: too many workers failed or are down.

    Attributes:
        failed: worker -> reason, for workers that failed or were down.
        pending: workers that had not answered when the request gave up.
        latency_s: worker -> seconds, for workers that answered (set by :func:`collect`).
        cancelled_s: worker -> seconds run, for calls cancelled when the request
            gave up (set by :func:`collect`).
    """

    def __init__(self, message: str, failed: Mapping[int, str], pending: Sequence[int]):
        super().__init__(message)
        self.failed = dict(failed)
        self.pending = list(pending)
        self.latency_s: dict[int, float] = {}
        self.cancelled_s: dict[int, float] = {}


class CollectTimeout(CollectError):
    """No decodable set arrived within the request timeout."""


class BadWorkerOutput(CollectError):
    """Workers answered with outputs that are not probability vectors (NaN, inf,
    wrong shape, negative entries, rows not summing to 1), and what is left
    cannot be decoded. The server's fault, not the client's (HTTP 502)."""


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
        outputs: ``(k, B, C)`` data outputs, each row a probability vector;
            reconstructed rows are projected onto the probability simplex.
        reconstructed: for each data model, whether its output was decoded
            from other rows rather than received.
        used: worker -> row, the workers whose outputs were used.
        latency_s: worker -> seconds, for workers that answered in time.
        failed: worker -> reason, for workers that failed, were down or
            answered something that is not a probability vector.
        late: workers asked but not waited for; their calls were cancelled.
        backups_sent: backup workers that were asked.
        waited_s: time spent in the decode slack, waiting for missing data
            rows after a decodable set had arrived (0 when there was no wait).
        cancelled_s: worker -> seconds its call had run when it was cancelled
            (a lower bound of its latency).
        corrupt: worker -> how many of the batch's inputs its output was located
            as corrupt on (``verify``); those inputs were answered from the others.
        verified: with ``verify``, whether k + 2 rows arrived to check the
            answer (``None``: not asked to verify).
    """

    outputs: torch.Tensor
    reconstructed: list[bool]
    used: dict[int, int]
    latency_s: dict[int, float]
    failed: dict[int, str]
    late: list[int]
    backups_sent: list[int]
    waited_s: float = 0.0
    cancelled_s: dict[int, float] = field(default_factory=dict)
    corrupt: dict[int, int] = field(default_factory=dict)
    verified: bool | None = None


def check_probabilities(out: object, shape: tuple[int | None, int | None] = (None, None)) -> str | None:
    """Why ``out`` is not a ``(B, C)`` batch of probability vectors, or ``None`` if it is.

    ``shape`` gives the expected ``B`` and ``C`` (``None``: any). A row is a
    probability vector when every entry is finite and ``>= -NEG_TOL`` and the
    row sums to 1 within ``SUM_TOL``.
    """
    if (
        isinstance(out, np.ndarray)
        and out.ndim == 2
        and out.dtype == np.float32
        and all(want is None or got == want for got, want in zip(out.shape, shape, strict=True))
        and out.size
    ):  # the common case in a few reductions; anything off falls through for the reason
        sums = out.sum(-1, dtype=np.float64)
        if np.isfinite(sums).all() and out.min() >= -NEG_TOL and np.abs(sums - 1).max() <= SUM_TOL:
            return None
    if not isinstance(out, torch.Tensor | np.ndarray):
        return f"not an array ({type(out).__name__})"
    if out.ndim != 2:
        return f"shape {tuple(out.shape)}, expected (batch, classes)"
    for got, want, what in zip(out.shape, shape, ("batch", "classes"), strict=True):
        if want is not None and got != want:
            return f"shape {tuple(out.shape)}: {what} {got}, expected {want}"
    if isinstance(out, torch.Tensor):
        if not out.is_floating_point():
            return f"dtype {out.dtype}, expected floating point"
        a = out.detach().cpu().double().numpy()
    else:
        if out.dtype.kind != "f":
            return f"dtype {out.dtype}, expected floating point"
        a = out.astype(np.float64, copy=False)
    finite = np.isfinite(a)
    if not finite.all():
        return f"non-finite values ({int((~finite).sum())} of {a.size})"
    if a.size and float(a.min()) < -NEG_TOL:
        return f"negative probabilities (min {float(a.min()):.3g})"
    dev = np.abs(a.sum(-1) - 1)
    if dev.size and float(dev.max()) > SUM_TOL:
        return f"rows do not sum to 1 (off by up to {float(dev.max()):.3g})"
    return None


def _bucket(rows: int) -> int:
    """Batch sizes tracked together: 1, 2-3, 4-7, 8-15, ... rows."""
    return max(1, int(rows)).bit_length()


class LatencyTracker:
    """Recent call latencies per worker and batch size, for the ``auto`` decode slack.

    Each worker keeps its last ``window`` observations per batch-size bucket (1,
    2-3, 4-7, ... rows), so a large batch is judged by large batches. A call
    that answered (in time or late) records its latency; a call cancelled
    because its request no longer needed it records the time it had run, a
    lower bound of its latency (so a worker that is often cut off looks slow,
    never fast). A call that failed records nothing.
    """

    def __init__(self, window: int = 256, quantile: float = 0.99, min_samples: int = 20) -> None:
        if window < 1 or not 0 < quantile <= 1 or min_samples < 1:
            raise CoinferError("window and min_samples must be >= 1 and quantile in (0, 1]")
        self.window, self.q, self.min_samples = window, quantile, min_samples
        self._obs: dict[tuple[int, int], deque[float]] = {}
        self._cache: dict[tuple[int, int], tuple[float, float] | None] = {}

    def observe(self, worker: int, seconds: float, rows: int = 1) -> None:
        """Record one call of ``worker`` on ``rows`` inputs that ran ``seconds`` (answered or cancelled)."""
        if not math.isfinite(seconds) or seconds < 0:
            return
        key = (worker, _bucket(rows))
        d = self._obs.get(key)
        if d is None:
            d = self._obs[key] = deque(maxlen=self.window)
        d.append(float(seconds))
        self._cache.pop(key, None)

    def _stats(self, worker: int, rows: int) -> tuple[float, float] | None:
        key = (worker, _bucket(rows))
        if key not in self._cache:
            d = self._obs.get(key)
            if d and len(d) >= self.min_samples:
                a = np.fromiter(d, float)
                self._cache[key] = (float(np.quantile(a, self.q)), float(np.median(a)))
            else:
                self._cache[key] = None
        return self._cache[key]

    def quantile(self, worker: int, rows: int = 1) -> float | None:
        """The running ``quantile`` of ``worker``'s latency on batches like ``rows`` (``None``: too few samples)."""
        st = self._stats(worker, rows)
        return None if st is None else st[0]

    def median(self, worker: int, rows: int = 1) -> float | None:
        """The running median of ``worker``'s latency on batches like ``rows`` (``None``: too few samples)."""
        st = self._stats(worker, rows)
        return None if st is None else st[1]

    def snapshot(self) -> dict[int, dict[str, float | int | None]]:
        """Per worker, for single-input calls: samples, median and the tracked quantile (seconds)."""
        out = {}
        for (w, b), d in sorted(self._obs.items()):
            if b != 1:
                continue
            a = np.fromiter(d, float)
            out[w] = {"samples": len(a), "median_s": float(np.median(a)), "quantile_s": self.quantile(w)}
        return out


@dataclass
class SlackPolicy:
    """How long to wait for missing data rows once a decodable set has arrived.

    ``fixed_s`` set: always wait up to ``fixed_s`` seconds (0: decode at
    once, the first-decodable-set behaviour). ``fixed_s`` ``None`` (``auto``):
    wait until the request is as old as the ``tracker``'s running quantile
    (q99 by default) of the missing data workers' recent latency on batches of
    this size, i.e. for as long as those workers' answers normally take, but
    never more than ``max_s`` plus the batch's expected extra compute after the
    decodable set arrived. A missing row already later than its q99 is a
    straggler and is decoded at once.

    The wait scales with the batch (a 1024-row request is not decoded while its
    data model is still computing it): its extra compute is the missing
    workers' median on batches of this size minus their median on single
    inputs. While that size has too few samples, it is estimated from the time
    the decodable set took on the same batch: the extra compute is that time
    minus the single-input median, and the quantile is the single-input one
    scaled by that time over the single-input median.

    Attributes:
        fixed_s: fixed slack in seconds, or ``None`` for ``auto``.
        tracker: latencies per worker (``auto`` only).
        max_s: cap of the ``auto`` slack beyond the batch's expected extra compute.
        worker_of_row: data row -> the worker whose latency predicts it
            (default: worker ``j`` serves row ``j``).
    """

    fixed_s: float | None = 0.0
    tracker: LatencyTracker | None = None
    max_s: float = 0.05
    worker_of_row: Mapping[int, int] | None = None

    def __post_init__(self) -> None:
        if self.fixed_s is not None and not (self.fixed_s >= 0 and math.isfinite(self.fixed_s)):
            raise CoinferError(f"decode slack must be a finite number of seconds >= 0, got {self.fixed_s}")
        if not (self.max_s >= 0 and math.isfinite(self.max_s)):
            raise CoinferError(f"the auto decode slack cap must be >= 0 seconds, got {self.max_s}")
        if self.fixed_s is None and self.tracker is None:
            self.tracker = LatencyTracker()

    def slack(self, missing_rows: Sequence[int], age_s: float, rows: int = 1) -> float:
        """Seconds to wait for ``missing_rows`` when the decodable set arrived ``age_s`` into a request of ``rows`` inputs."""
        if self.fixed_s is not None:
            return self.fixed_s
        assert self.tracker is not None
        workers = [(self.worker_of_row or {}).get(j, j) for j in missing_rows]
        tr = self.tracker
        est: list[tuple[float | None, float]] = []  # per missing worker: (quantile, extra compute)
        for w in workers:
            q, med, one = tr.quantile(w, rows), tr.median(w, rows), tr.median(w, 1)
            if _bucket(rows) == 1:
                est.append((q, 0.0))
            elif q is not None:
                est.append((q, max(0.0, med - (one or 0.0))))  # type: ignore[operator]
            else:  # no batches of this size yet: the decodable set took this long on the same batch,
                # so scale the single-input latencies by how much longer that is than one input
                extra = max(0.0, age_s - (one or 0.0))
                q1 = tr.quantile(w, 1)
                scale = max(1.0, age_s / one) if one else 1.0
                est.append((None if q1 is None else q1 * scale, extra))
        cap = self.max_s + max((e for _, e in est), default=0.0)
        if not est or any(q is None for q, _ in est):
            return cap
        return min(cap, max(0.0, max(q for q, _ in est) - age_s))  # type: ignore[type-var]


def _describe(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)  # a worker's own account (coinfer.serving.channel.WorkerCallError)
    if isinstance(reason, str) and reason:
        return reason[:300]
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
    slack: SlackPolicy | float = 0.0,
    shape: tuple[int | None, int | None] = (None, None),
    verify: float | None = None,
) -> Collection:
    """Ask workers for their outputs; decode only the data rows that do not arrive in time.

    Once the arrived rows are decodable, the collector returns at once if all
    ``k`` data rows are in; otherwise it waits up to ``slack`` (see
    :class:`SlackPolicy`) for the missing data rows, and stops waiting early
    when they have all arrived or none of them can arrive any more (their
    workers failed), or at the request timeout. Then it decodes what is still
    missing and cancels the calls still running (``late``).

    Args:
        code: the bundle's code.
        row_of: worker -> generator row (``0..n-1``) it produces.
        call: ``call(worker)`` returns an awaitable of that worker's
            ``(B, C)`` probabilities; the collector cancels it when the
            request no longer needs it (the callable should then cancel the
            remote call too).
        plan: primaries, backups and hedging delay.
        timeout_s: give up (:class:`CollectTimeout`) if no decodable set has
            arrived by then.
        down: workers known to be down (worker -> reason); they are not asked,
            and count as failed at once.
        on_late: called as ``on_late(worker, seconds, exception)`` when a
            call not waited for finishes anyway before its cancellation takes
            effect (for metrics).
        slack: the decode slack: a :class:`SlackPolicy` or fixed seconds
            (0: decode as soon as a decodable set has arrived).
        shape: expected ``(B, C)`` of every output (``None``: any; the
            first accepted output then fixes it).
        verify: locate corrupt outputs (:meth:`Code.locate` with this
            threshold): the collector also waits, within the decode slack,
            until ``k + 2`` rows are in; each input whose outputs name a corrupt
            worker is answered from the other rows (``Collection.corrupt``).
            Fewer than ``k + 2`` rows by then: answered unverified
            (``Collection.verified`` False).

    Raises:
        BadWorkerOutput: outputs that are not probability vectors leave too
            few rows to decode.
        CollectError: failures leave too few rows to decode (raised as soon as
            that is certain, not at the timeout).
        CollectTimeout: no decodable set within ``timeout_s``; names the
            workers that did not answer.
    """
    if verify is not None and (
        isinstance(verify, bool)
        or not isinstance(verify, int | float)
        or not (math.isfinite(verify) and verify > 0)
    ):
        raise CoinferError(f"verify must be a positive finite residual threshold, got {verify!r}")
    policy = slack if isinstance(slack, SlackPolicy) else SlackPolicy(float(slack))
    down = dict(down or {})
    want = list(shape)
    t0 = time.perf_counter()
    deadline = t0 + timeout_s
    tasks: dict[asyncio.Future, int] = {}
    started: dict[int, float] = {}
    received: dict[int, torch.Tensor] = {}  # row -> output
    used: dict[int, int] = {}
    latency: dict[int, float] = {}
    failed: dict[int, str] = {}
    backups_left = dict(plan.backups)
    backups_sent: list[int] = []
    decode_at: float | None = None  # end of the decode slack, once a decodable set is in
    loop = asyncio.get_running_loop()
    completed: list[asyncio.Future] = []  # calls finished since the last look
    waiter: list[asyncio.Future | None] = [None]

    def finished(fut: asyncio.Future) -> None:
        completed.append(fut)
        _wake(waiter[0])

    decodable_at = ended = t0

    def launch(w: int) -> None:
        if w in down:
            failed[w] = f"down ({down[w]})"
            after_failure(w)
            return
        started[w] = time.perf_counter()
        fut = asyncio.ensure_future(call(w))  # a future is used as it is: no task per call
        tasks[fut] = w
        fut.add_done_callback(finished)

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

    def cannot_decode() -> CollectError:
        missing = sorted(set(range(code.n)) - reachable_rows())
        bad = sorted(w for w, r in failed.items() if r.startswith("bad_output"))
        cls = BadWorkerOutput if bad else CollectError
        return cls(
            f"cannot decode: workers {sorted(failed)} failed or are down "
            f"({'; '.join(f'{w}: {r}' for w, r in sorted(failed.items()))}), so rows "
            f"{missing} cannot arrive; a ({code.n}, {code.k}) code needs any {code.k} "
            f"rows and tolerates at most r={code.r} missing",
            failed,
            sorted(tasks.values()),
        )

    def accept(w: int, out: object) -> None:
        """Check a worker's answer; keep it if its row is still useful. A bad
        answer is a failure, not an answer: no latency is recorded for it."""
        seconds = time.perf_counter() - started[w]
        row = row_of[w]
        decodable = code.can_decode(list(received))
        checking = verify is not None and len(received) < code.k + 2
        if row in received or (decodable and row >= code.k and not checking):
            latency[w] = seconds
            return  # not needed: not checked either, never used
        if isinstance(out, list | tuple):
            try:
                out = np.asarray(out, dtype=np.float64)
            except (ValueError, TypeError):
                pass
        why = check_probabilities(out, (want[0], want[1]))
        if why is not None:
            failed[w] = f"bad_output: {why}"
            after_failure(w)
            return
        # one dtype for decoding (workers answer float32 softmax; a float64 answer is narrowed)
        if isinstance(out, torch.Tensor):
            t = out.float()
        elif out.dtype == np.float32 and out.flags.writeable and out.flags.c_contiguous:
            t = torch.from_numpy(out)  # no copy: the channel hands over an array of its own
        else:
            t = torch.tensor(out, dtype=torch.float32)
        latency[w] = seconds
        want[0], want[1] = t.shape[0], t.shape[1]
        received[row] = t
        used[w] = row

    for w in plan.primary:
        launch(w)
    hedge_at = None if plan.hedge_after_s is None else t0 + plan.hedge_after_s

    cancelled_early = False
    try:
        while True:
            now = time.perf_counter()
            if code.can_decode(list(received)):
                reach = reachable_rows()
                waiting = [j for j in range(code.k) if j not in received and j in reach]
                if verify is not None and len(received) < code.k + 2 <= len(reach):  # k + 2 can still arrive
                    waiting += [j for j in sorted(reach - set(received)) if j >= code.k]
                if decode_at is None:
                    decodable_at = now
                    if not waiting:
                        ended = now
                        break
                    decode_at = min(deadline, now + policy.slack(waiting, now - t0, rows=want[0] or 1))
                if not waiting or now >= decode_at:
                    ended = now
                    break
                wake = decode_at
            else:
                if not code.can_decode(list(reachable_rows())):
                    raise cannot_decode()
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
                wake = deadline if hedge_at is None else min(deadline, hedge_at)
            if not completed:  # one wake-up future per wait: a call finishing, or the next deadline
                woken = loop.create_future()
                timer = loop.call_later(max(0.0, wake - now), _wake, woken)
                waiter[0] = woken
                try:
                    await woken
                finally:
                    timer.cancel()
                    waiter[0] = None
            done = [f for f in completed if f in tasks]
            completed.clear()
            # handle completions in the order they were started: deterministic for ties
            for task in sorted(done, key=lambda t: started[tasks[t]]):
                w = tasks.pop(task)
                exc = task.exception()
                if exc is not None:
                    failed[w] = _describe(exc)
                    after_failure(w)
                else:
                    accept(w, task.result())
    except CollectError as exc:  # the caller's metrics and health need what did happen
        exc.latency_s = dict(latency)
        exc.cancelled_s = _cancel(tasks, started, on_late)
        cancelled_early = True
        raise
    finally:
        if not cancelled_early:
            cancelled_s = _cancel(tasks, started, on_late)

    outputs = code.decode(received, project=True)
    reconstructed = [j not in received for j in range(code.k)]
    corrupt: dict[int, int] = {}
    verified = None if verify is None else len(received) >= code.k + 2
    if verified:
        named = code.locate(received, verify)
        for row in sorted(set(named.tolist()) - {-1}):
            mask = named == row
            rest = {r: v[mask] for r, v in received.items() if r != row}
            outputs[:, mask] = code.decode(rest, project=True).to(outputs.dtype)
            if row < code.k:
                reconstructed[row] = True
            worker = next(w for w, r in used.items() if r == row)
            corrupt[worker] = int(mask.sum())
    if any(reconstructed):  # received rows were checked in accept
        why = check_probabilities(outputs.reshape(-1, outputs.shape[-1]))
        if why is not None:  # cannot happen with checked inputs and projection; never answer it
            raise BadWorkerOutput(f"decoded outputs are not probability vectors: {why}", failed, [])
    return Collection(
        outputs=outputs,
        reconstructed=reconstructed,
        used=used,
        latency_s=latency,
        failed=failed,
        late=sorted(tasks.values()),
        backups_sent=backups_sent,
        waited_s=max(0.0, ended - decodable_at),
        cancelled_s=cancelled_s,
        corrupt=corrupt,
        verified=verified,
    )


def _wake(fut: asyncio.Future | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


def _cancel(
    tasks: Mapping[asyncio.Future, int],
    started: Mapping[int, float],
    on_late: Callable[[int, float, BaseException | None], None] | None,
) -> dict[int, float]:
    """Cancel the calls still running; return worker -> seconds each had run.

    A call that completes before its cancellation takes effect is reported
    through ``on_late`` (and its exception retrieved)."""
    now = time.perf_counter()
    ran: dict[int, float] = {}
    for task, w in tasks.items():
        ran[w] = now - started[w]

        def done(t: asyncio.Task, w: int = w) -> None:
            if t.cancelled():
                return
            exc = t.exception()
            if on_late is not None:
                on_late(w, time.perf_counter() - started[w], exc)

        task.add_done_callback(done)
        task.cancel()
    return ran

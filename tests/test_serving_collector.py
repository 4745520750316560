"""The collector, without Ray: every arrival order, every set of <= r missing
workers, failures, timeouts, hedging, the decode slack (scripted delays), checks
of the outputs, cancellation of the calls not waited for."""

from __future__ import annotations

import asyncio
import itertools
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coinfer import Code
from coinfer.errors import CoinferError
from coinfer.serving.collector import (
    BadWorkerOutput,
    CollectError,
    CollectTimeout,
    LatencyTracker,
    Plan,
    SlackPolicy,
    check_probabilities,
    collect,
)


def _outputs(code: Code, batch: int = 3, classes: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    data = torch.softmax(torch.randn(code.k, batch, classes, generator=g), dim=-1)
    return code.encode_outputs(data)  # (n, B, C): exact parities


class Scripted:
    """Workers that answer (or fail) exactly when the test releases them."""

    def __init__(self, outputs: torch.Tensor, fail: set[int] = frozenset()):
        self.outputs = outputs
        self.fail = set(fail)
        self.events: dict[int, asyncio.Event] = {}
        self.calls: list[int] = []

    def event(self, w: int) -> asyncio.Event:
        return self.events.setdefault(w, asyncio.Event())

    async def call(self, w: int, row: int) -> np.ndarray:
        self.calls.append(w)
        await self.event(w).wait()
        if w in self.fail:
            raise RuntimeError(f"worker {w} crashed")
        return self.outputs[row].numpy()

    async def release(self, order: list[int]) -> None:
        for w in order:
            self.event(w).set()
            for _ in range(10):  # let the collector handle this arrival before the next
                await asyncio.sleep(0)


async def _run(code, order, missing=(), fail=(), timeout_s=5.0, seed=0):
    outs = _outputs(code, seed=seed)
    s = Scripted(outs, set(fail))
    row_of = {i: i for i in range(code.n)}
    task = asyncio.ensure_future(
        collect(code, row_of, lambda w: s.call(w, row_of[w]), Plan(tuple(range(code.n))), timeout_s)
    )
    await s.release([w for w in order if w not in missing])
    res = await task
    return res, outs


def _first_decodable(code: Code, arrivals: list[int]) -> list[int]:
    return arrivals[: code.k]


def _atol(code: Code, used: list[int]) -> float:
    """float32 outputs: decoding error grows with the condition number of the rows used."""
    erased = [i for i in range(code.n) if i not in used]
    return max(1e-5, 1e-6 * code.condition_number(erased))


@pytest.mark.parametrize("k,r", [(2, 1), (3, 2), (4, 2)])
def test_every_arrival_order_and_missing_set_gives_the_data_outputs(k, r):
    code = Code(k, r)
    for missing_size in range(0, r + 1):
        for missing in itertools.combinations(range(code.n), missing_size):
            rest = [w for w in range(code.n) if w not in missing]
            orders = list(itertools.permutations(rest))
            for order in orders[:: max(1, len(orders) // 12)]:
                res, outs = asyncio.run(_run(code, list(order), missing=missing))
                used = _first_decodable(code, [w for w in order if w not in missing])
                assert torch.allclose(res.outputs, outs[:k], atol=_atol(code, used))
                assert sorted(res.used) == sorted(used)
                assert res.reconstructed == [j not in used for j in range(k)]


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    kr=st.sampled_from([(1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (4, 2), (5, 3)]),
)
def test_hypothesis_arrival_orders(data, kr):
    k, r = kr
    code = Code(k, r)
    order = data.draw(st.permutations(list(range(code.n))))
    n_missing = data.draw(st.integers(0, r))
    missing = data.draw(
        st.lists(st.sampled_from(range(code.n)), min_size=n_missing, max_size=n_missing, unique=True)
    )
    failing = data.draw(st.booleans())
    seed = data.draw(st.integers(0, 10))
    if failing:  # missing workers fail instead of staying silent; they still answer in order
        res, outs = asyncio.run(_run(code, order, fail=missing, seed=seed))
    else:
        res, outs = asyncio.run(_run(code, order, missing=missing, seed=seed))
    arrivals = [w for w in order if w not in missing]
    used = arrivals[:k]
    assert torch.allclose(res.outputs, outs[:k], atol=_atol(code, used))
    assert res.reconstructed == [j not in used for j in range(k)]
    assert set(res.used) == set(used)


@pytest.mark.parametrize("k,r", [(2, 1), (4, 2)])
def test_more_than_r_silent_workers_give_the_timeout_error_naming_them(k, r):
    code = Code(k, r)
    silent = list(range(r + 1))  # data workers 0..r never answer
    order = [w for w in range(code.n) if w not in silent]
    t0 = time.perf_counter()
    with pytest.raises(CollectTimeout) as ei:
        asyncio.run(_run(code, order, missing=silent, timeout_s=0.2))
    assert 0.15 < time.perf_counter() - t0 < 3.0
    assert ei.value.pending == silent
    assert f"workers {silent} did not answer" in str(ei.value)


@pytest.mark.parametrize("k,r", [(2, 1), (4, 2)])
def test_more_than_r_failures_give_a_prompt_error_naming_the_failed_workers(k, r):
    code = Code(k, r)
    failing = list(range(code.n - r - 1, code.n))  # r + 1 workers fail at once
    t0 = time.perf_counter()
    with pytest.raises(CollectError) as ei:
        asyncio.run(_run(code, failing, fail=failing, timeout_s=30.0))
    assert time.perf_counter() - t0 < 5.0  # not the 30 s timeout
    assert not isinstance(ei.value, CollectTimeout)
    assert sorted(ei.value.failed) == failing
    assert "crashed" in str(ei.value)


def test_down_workers_are_not_called_and_count_as_failed():
    code = Code(2, 1)
    outs = _outputs(code)
    s = Scripted(outs)

    async def main():
        task = asyncio.ensure_future(
            collect(
                code,
                {0: 0, 1: 1, 2: 2},
                lambda w: s.call(w, w),
                Plan((0, 1, 2)),
                5.0,
                down={0: "killed"},
            )
        )
        await s.release([1, 2])
        return await task

    res = asyncio.run(main())
    assert 0 not in s.calls
    assert res.reconstructed == [True, False]
    assert res.failed == {0: "down (killed)"}
    assert torch.allclose(res.outputs, outs[:2], atol=1e-5)


def test_late_workers_are_cancelled_and_reported():
    code = Code(2, 1)
    outs = _outputs(code)
    s = Scripted(outs)
    cancelled: list[int] = []

    async def call(w):
        try:
            return await s.call(w, w)
        except asyncio.CancelledError:
            cancelled.append(w)
            raise

    async def main():
        task = asyncio.ensure_future(collect(code, {0: 0, 1: 1, 2: 2}, call, Plan((0, 1, 2)), 5.0))
        await s.release([2, 1])
        res = await task
        await asyncio.sleep(0.01)
        return res

    res = asyncio.run(main())
    assert res.late == [0] and res.reconstructed == [True, False]
    assert cancelled == [0] and set(res.cancelled_s) == {0}


def _replica_setup(code: Code):
    # workers 0..k-1 data, worker n + j a replica of data model j
    row_of = {j: j for j in range(code.k)}
    row_of.update({code.n + j: j for j in range(code.r)})
    return row_of


def test_replicated_mode_takes_the_faster_replica():
    code = Code(2, 1)
    outs = _outputs(code)
    s = Scripted(outs)
    row_of = _replica_setup(code)

    async def main():
        task = asyncio.ensure_future(
            collect(code, row_of, lambda w: s.call(w, row_of[w]), Plan((0, 1, 3)), 5.0)
        )
        await s.release([3, 1])  # the replica of model 0 answers, model 0 itself is slow
        return await task

    res = asyncio.run(main())
    assert res.used == {3: 0, 1: 1} and res.reconstructed == [False, False]
    assert torch.allclose(res.outputs, outs[:2])


def test_uncoded_mode_waits_for_every_data_model():
    code = Code(2, 1)
    outs = _outputs(code)
    s = Scripted(outs)
    with pytest.raises(CollectTimeout):
        asyncio.run(_uncoded(code, s))


async def _uncoded(code, s):
    task = asyncio.ensure_future(collect(code, {0: 0, 1: 1}, lambda w: s.call(w, w), Plan((0, 1)), 0.2))
    await s.release([1])
    return await task


def test_hedged_mode_sends_a_backup_only_after_the_delay():
    code = Code(2, 1)
    outs = _outputs(code)
    s = Scripted(outs)
    row_of = _replica_setup(code)

    async def main():
        plan = Plan((0, 1), backups={0: 3}, hedge_after_s=0.05)
        task = asyncio.ensure_future(collect(code, row_of, lambda w: s.call(w, row_of[w]), plan, 5.0))
        await s.release([1])
        await asyncio.sleep(0.01)
        assert s.calls == [0, 1]  # no backup yet
        await asyncio.sleep(0.1)
        assert 3 in s.calls  # backup sent after the hedging delay
        await s.release([3])
        return await task

    res = asyncio.run(main())
    assert res.backups_sent == [3] and res.used == {1: 1, 3: 0}


def test_hedged_mode_sends_the_backup_at_once_when_the_primary_is_down():
    code = Code(2, 1)
    outs = _outputs(code)
    s = Scripted(outs)
    row_of = _replica_setup(code)

    async def main():
        plan = Plan((0, 1), backups={0: 3}, hedge_after_s=10.0)
        task = asyncio.ensure_future(
            collect(code, row_of, lambda w: s.call(w, row_of[w]), plan, 5.0, down={0: "killed"})
        )
        await s.release([1, 3])
        return await task

    t0 = time.perf_counter()
    res = asyncio.run(main())
    assert time.perf_counter() - t0 < 2.0
    assert res.used == {1: 1, 3: 0} and res.failed == {0: "down (killed)"}


# ---------------------------------------------------------------- decode slack


class Timed:
    """Workers that answer after a scripted delay (or fail, or answer a given array)."""

    def __init__(self, outputs: torch.Tensor, delay: dict[int, float], fail=(), answer=None):
        self.outputs, self.delay, self.fail = outputs, delay, set(fail)
        self.answer = dict(answer or {})
        self.cancelled: list[int] = []

    async def call(self, w: int) -> np.ndarray:
        try:
            await asyncio.sleep(self.delay[w])
        except asyncio.CancelledError:
            self.cancelled.append(w)
            raise
        if w in self.fail:
            raise RuntimeError(f"worker {w} crashed")
        if w in self.answer:
            return self.answer[w]
        return self.outputs[w].numpy()


def _timed(code, delay, slack, fail=(), answer=None, timeout_s=10.0, shape=(None, None)):
    outs = _outputs(code)
    t = Timed(outs, delay, fail, answer)
    row_of = {i: i for i in range(code.n)}
    plan = Plan(tuple(sorted(delay)))

    async def main():
        t0 = time.perf_counter()
        res = await collect(code, row_of, t.call, plan, timeout_s, slack=slack, shape=shape)
        elapsed = time.perf_counter() - t0
        await asyncio.sleep(0.01)  # let cancellations land
        return res, elapsed

    res, elapsed = asyncio.run(main())
    return res, elapsed, outs, t


def test_data_rows_arriving_within_the_slack_are_received_not_reconstructed():
    code = Code(2, 1)
    # the coded row and data row 1 form a decodable set at once; data row 0 comes 0.15 s later
    res, elapsed, outs, t = _timed(code, {0: 0.15, 1: 0.0, 2: 0.0}, slack=1.0)
    assert res.reconstructed == [False, False]
    assert torch.equal(res.outputs, outs[:2])
    assert 0.14 < elapsed < 0.9  # returned when row 0 arrived, not at the end of the slack
    assert 0.1 < res.waited_s < 0.9 and res.late == [] and t.cancelled == []


def test_a_data_row_beyond_the_slack_is_reconstructed_at_the_end_of_the_slack():
    code = Code(2, 1)
    res, elapsed, outs, t = _timed(code, {0: 5.0, 1: 0.05, 2: 0.0}, slack=0.2)
    assert res.reconstructed == [True, False]
    assert torch.allclose(res.outputs, outs[:2], atol=1e-5)
    assert 0.24 < elapsed < 1.5  # decodable at ~0.05 s, then 0.2 s of slack
    assert 0.19 < res.waited_s < 1.5
    assert res.late == [0] and t.cancelled == [0] and set(res.cancelled_s) == {0}


def test_a_data_worker_failing_during_the_slack_ends_the_wait():
    code = Code(2, 1)
    res, elapsed, outs, t = _timed(code, {0: 0.1, 1: 0.0, 2: 0.0}, slack=5.0, fail={0})
    assert res.reconstructed == [True, False] and "crashed" in res.failed[0]
    assert elapsed < 1.5  # not the 5 s slack


def test_with_several_missing_rows_the_wait_goes_on_for_those_that_can_still_arrive():
    code = Code(4, 2)
    # parities 4, 5 and data 2, 3 are in at once; data 0 fails at 0.05 s, data 1 arrives at 0.2 s
    delay = {0: 0.05, 1: 0.2, 2: 0.0, 3: 0.0, 4: 0.0, 5: 0.0}
    res, elapsed, outs, t = _timed(code, delay, slack=5.0, fail={0})
    assert res.reconstructed == [True, False, False, False]
    assert 0.19 < elapsed < 2.0


def test_slack_zero_decodes_at_the_first_decodable_set():
    code = Code(2, 1)
    res, elapsed, outs, t = _timed(code, {0: 2.0, 1: 0.05, 2: 0.0}, slack=0.0)
    assert res.reconstructed == [True, False] and res.waited_s == 0.0
    assert elapsed < 1.0 and t.cancelled == [0]


def test_no_wait_when_every_data_row_arrives_first():
    code = Code(2, 1)
    res, elapsed, outs, t = _timed(code, {0: 0.0, 1: 0.02, 2: 5.0}, slack=3.0)
    assert res.reconstructed == [False, False] and res.waited_s == 0.0
    assert elapsed < 1.0 and res.late == [2] and t.cancelled == [2]


def test_the_slack_never_outlasts_the_request_timeout():
    code = Code(2, 1)
    res, elapsed, outs, t = _timed(code, {0: 5.0, 1: 0.0, 2: 0.0}, slack=10.0, timeout_s=0.3)
    assert res.reconstructed == [True, False]  # decoded at the timeout, not an error
    assert 0.25 < elapsed < 1.5


def _tracker(seconds: dict[int, float], n: int = 40) -> LatencyTracker:
    tr = LatencyTracker(window=64, quantile=0.99, min_samples=20)
    for w, s in seconds.items():
        for i in range(n):
            tr.observe(w, s * (0.5 + i / n))  # q99 close to 1.5 * s
    return tr


def test_auto_slack_waits_until_the_missing_workers_q99_latency_capped():
    tr = _tracker({0: 0.1, 1: 0.01})
    q0 = tr.quantile(0)
    assert 0.14 < q0 < 0.15
    pol = SlackPolicy(None, tr, max_s=1.0)
    assert pol.slack([0], 0.02) == pytest.approx(q0 - 0.02)
    assert pol.slack([0, 1], 0.02) == pytest.approx(q0 - 0.02)  # the slowest missing row counts
    assert pol.slack([1], 0.05) == 0.0  # already later than its q99: a straggler, decode now
    assert SlackPolicy(None, tr, max_s=0.05).slack([0], 0.02) == 0.05  # capped
    assert SlackPolicy(None, LatencyTracker(), max_s=0.03).slack([0], 0.0) == 0.03  # no samples yet


def test_auto_slack_adapts_to_the_tracked_latencies():
    code = Code(2, 1)
    delay = {0: 0.6, 1: 0.0, 2: 0.0}
    # worker 0 normally takes up to ~0.9 s: its 0.6 s answer is waited for
    slow = SlackPolicy(None, _tracker({0: 0.6}), max_s=5.0)
    res, elapsed, _, _ = _timed(code, delay, slack=slow)
    assert res.reconstructed == [False, False] and 0.59 < elapsed < 2.0
    # worker 0 normally answers within ~0.03 s: at 0.6 s it is a straggler, decode at once
    fast = SlackPolicy(None, _tracker({0: 0.02}), max_s=5.0)
    res, elapsed, _, t = _timed(code, delay, slack=fast)
    assert res.reconstructed == [True, False] and elapsed < 0.5 and t.cancelled == [0]


def test_tracker_ignores_nonsense_and_keeps_a_window():
    tr = LatencyTracker(window=30, min_samples=20)
    for v in [float("nan"), -1.0, float("inf")]:
        tr.observe(0, v)
    assert tr.quantile(0) is None
    for _ in range(100):
        tr.observe(0, 1.0)
    for _ in range(30):
        tr.observe(0, 0.01)
    assert tr.quantile(0) == pytest.approx(0.01)  # only the last 30
    assert tr.snapshot()[0]["samples"] == 30


def test_bad_slack_settings_are_refused():
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(CoinferError, match="decode slack"):
            SlackPolicy(bad)


# ---------------------------------------------------------------- outputs are checked


def test_check_probabilities_names_the_problem():
    p = torch.softmax(torch.randn(3, 10), -1)
    assert check_probabilities(p) is None and check_probabilities(p.numpy(), (3, 10)) is None
    bad = p.clone()
    bad[1, 2] = float("nan")
    assert "non-finite" in check_probabilities(bad)
    assert "non-finite" in check_probabilities(torch.full((3, 10), float("inf")))
    assert "negative" in check_probabilities(p - 0.2)
    assert "sum to 1" in check_probabilities(p * 2)
    assert "batch 3, expected 4" in check_probabilities(p, (4, None))
    assert "classes 10, expected 5" in check_probabilities(p, (None, 5))
    assert "expected (batch, classes)" in check_probabilities(p[0])
    assert "floating" in check_probabilities(torch.ones(3, 1, dtype=torch.int64))
    assert "not an array" in check_probabilities([[1.0]])


def _nan_like(code, w):
    out = _outputs(code)[w].numpy().copy()
    out[0, :] = np.nan
    return out


def test_a_nan_data_output_is_a_failure_and_is_decoded_around():
    code = Code(2, 1)
    res, _, outs, _ = _timed(code, {0: 0.0, 1: 0.0, 2: 0.05}, slack=1.0, answer={0: _nan_like(code, 0)})
    assert res.failed[0].startswith("bad_output: non-finite values")
    assert res.reconstructed == [True, False]
    assert torch.isfinite(res.outputs).all()
    assert torch.allclose(res.outputs, outs[:2], atol=1e-5)
    assert 0 not in res.latency_s  # a bad answer is a failure, not an answer (health, metrics)


def test_a_nan_output_that_no_decoding_would_need_is_still_refused():
    # the old bug: with nothing to decode, a received NaN row was answered with a 200
    code = Code(2, 1)
    with pytest.raises(BadWorkerOutput) as ei:
        _timed(code, {0: 0.0, 1: 0.0}, slack=0.0, answer={0: _nan_like(code, 0)})
    assert "bad_output: non-finite values" in ei.value.failed[0]
    assert isinstance(ei.value, CollectError) and not isinstance(ei.value, CollectTimeout)


@pytest.mark.parametrize(
    "bad,why",
    [
        (lambda o: o * 3, "sum to 1"),
        (lambda o: o - 0.5, "negative"),
        (lambda o: o[:, :5], "classes 5, expected 10"),
        (lambda o: np.full_like(o, np.inf), "non-finite"),
    ],
)
def test_outputs_that_are_not_probabilities_are_bad(bad, why):
    code = Code(2, 1)
    outs = _outputs(code)
    answer = {1: bad(outs[1].numpy())}
    res, *_ = _timed(code, {0: 0.0, 1: 0.0, 2: 0.05}, slack=0.0, answer=answer, shape=(3, 10))
    assert why in res.failed[1] and res.reconstructed == [False, True]
    answer[2] = bad(outs[2].numpy())
    with pytest.raises(BadWorkerOutput, match="bad_output"):
        _timed(code, {0: 0.0, 1: 0.0, 2: 0.05}, slack=0.0, answer=answer, shape=(3, 10))


@settings(max_examples=40, deadline=None)
@given(data=st.data(), kr=st.sampled_from([(2, 1), (3, 2), (4, 2)]))
def test_hypothesis_every_answer_is_probabilities_or_an_error(data, kr):
    code = Code(*kr)
    bad = data.draw(st.sets(st.integers(0, code.n - 1), max_size=code.n))
    delays = {w: data.draw(st.sampled_from([0.0, 0.002, 0.005])) for w in range(code.n)}
    slack = data.draw(st.sampled_from([0.0, 0.003, 0.5]))
    answer = {w: _nan_like(code, w) for w in bad}
    try:
        res, _, outs, _ = _timed(code, delays, slack=slack, answer=answer)
    except BadWorkerOutput as exc:
        # raised as soon as more than r outputs are bad, before the other bad ones arrive
        assert len(bad) > code.r and code.r < len(exc.failed) and set(exc.failed) <= bad
        assert all(reason.startswith("bad_output") for reason in exc.failed.values())
        return
    assert len(bad) <= code.r
    o = res.outputs.double()
    assert torch.isfinite(o).all() and (o >= -1e-6).all()
    assert torch.allclose(o.sum(-1), torch.ones_like(o.sum(-1)), atol=1e-3)
    for j in range(code.k):
        if not res.reconstructed[j]:
            assert torch.equal(res.outputs[j], outs[j])


def test_pending_calls_are_cancelled_on_timeout_and_on_failure():
    code = Code(2, 1)
    outs = _outputs(code)
    for delay, fail, timeout_s, err in [
        ({0: 5.0, 1: 5.0, 2: 0.0}, set(), 0.1, CollectTimeout),
        ({0: 5.0, 1: 0.0, 2: 0.0}, {1, 2}, 10.0, CollectError),
    ]:
        t = Timed(outs, delay, fail=fail)

        async def main(t=t, timeout_s=timeout_s, err=err):
            with pytest.raises(err):
                await collect(code, {0: 0, 1: 1, 2: 2}, t.call, Plan((0, 1, 2)), timeout_s)
            await asyncio.sleep(0.01)

        asyncio.run(main())
        assert sorted(t.cancelled) == sorted(w for w, d in delay.items() if d > 1)


def test_a_failed_request_reports_its_answered_and_cancelled_calls():
    # the runtime feeds these to the metrics and the health tracker even when the request fails
    code = Code(2, 1)
    t = Timed(_outputs(code), {0: 5.0, 1: 0.0, 2: 0.0}, fail={2})

    async def main():
        with pytest.raises(CollectTimeout) as ei:
            await collect(code, {0: 0, 1: 1, 2: 2}, t.call, Plan((0, 1, 2)), 0.2)
        return ei.value

    exc = asyncio.run(main())
    assert set(exc.latency_s) == {1} and set(exc.failed) == {2} and exc.pending == [0]
    assert set(exc.cancelled_s) == {0} and 0.15 < exc.cancelled_s[0] < 1.0


# ---------------------------------------------------------------- settings and the load report


def test_decode_slack_settings_parse_or_name_the_problem():
    from coinfer.serving.runtime import parse_decode_slack

    assert parse_decode_slack("auto") == parse_decode_slack(" AUTO ") == "auto"
    assert parse_decode_slack("12.5") == parse_decode_slack(12.5) == 12.5
    assert parse_decode_slack(0) == 0.0
    for bad in ("soon", "-1", -3, float("nan"), "inf", True, None):
        with pytest.raises(CoinferError, match="decode slack must be 'auto' or milliseconds"):
            parse_decode_slack(bad)


def test_summary_reports_reconstruction_task_accuracy_and_agreement():
    from coinfer.serving.loadgen import LoadResult, summarize

    # 4 answered requests of a k = 2 class-split bundle (model 0: classes 0-4, model 1: 5-9)
    labels = np.array([0, 7, 3, 9, 1])
    top1 = np.array([[0, 2], [4, 7], [1, 6], [9, 9], [-1, -1]])
    rec = np.array([[False, False], [False, True], [True, False], [False, True], [False, False]])
    res = LoadResult(
        latency_s=np.array([0.01, 0.02, 0.03, 0.04, np.nan]),
        status=np.array([200, 200, 200, 200, 502]),
        reconstructed=rec.any(1),
        correct=top1 == labels[:, None],
        reconstructed_outputs=rec,
        labels=labels,
        has_label=True,
        top1=top1,
        index=np.arange(5),
        duration_s=1.0,
        errors={"502 bad_worker_output": 1},
        config={},
    )
    reference = np.array([[0, 2], [4, 7], [3, 6], [9, 8], [1, 1]])  # the data models' own top-1
    s = summarize(res, reference=reference, tasks=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    assert s["answered"] == 4 and s["reconstructed_fraction"] == 0.75
    # own-class outputs: (0, m0) ok, (7, m1) ok rec, (3, m0) wrong rec, (9, m1) ok rec
    assert s["task_accuracy"] == 0.75 and s["task_accuracy_reconstructed"] == pytest.approx(2 / 3)
    assert s["task_accuracy_received"] == 1.0
    # agreement on the same own-class outputs: 7 agrees, 3 does not (1 vs 3), 9 does not (9 vs 8)
    assert s["agreement_reconstructed"] == pytest.approx(1 / 3) and s["agreement_received"] == 1.0
    assert "agreement" not in summarize(res) and "task_accuracy" not in summarize(res)


def test_auto_slack_scales_with_the_batch_so_a_large_batch_is_not_decoded_while_it_computes():
    tr = _tracker({0: 0.005})  # single inputs: ~5 ms, q99 ~7.5 ms
    pol = SlackPolicy(None, tr, max_s=0.05)
    # a 1024-row request whose decodable set (the parity's answer) came at 0.3 s: no big batch
    # seen yet, so its latencies are the single-input ones scaled by 0.3 s / the single-input median
    scaled_q99 = tr.quantile(0) * 0.3 / tr.median(0)
    assert pol.slack([0], 0.3, rows=1024) == pytest.approx(scaled_q99 - 0.3)
    assert 0.1 < scaled_q99 - 0.3 < 0.05 + 0.3 - tr.median(0)  # under the scaled cap
    assert pol.slack([0], 0.3, rows=1) == 0.0  # the same age on one input: a straggler
    for i in range(40):  # now 1024-row calls are known to take ~0.3-0.45 s
        tr.observe(0, 0.3 * (1 + i / 80), rows=1024)
    q = tr.quantile(0, rows=1024)
    assert pol.slack([0], 0.3, rows=1024) == pytest.approx(q - 0.3)  # waits for its own q99
    assert pol.slack([0], 0.3, rows=2000) == pytest.approx(q - 0.3)  # same bucket (1024-2047 rows)
    # the cap grows with the batch's extra compute: 50 ms beyond it, not 50 ms in all
    late = SlackPolicy(None, tr, max_s=0.05).slack([0], 0.01, rows=1024)
    assert late == pytest.approx(0.05 + tr.median(0, rows=1024) - tr.median(0))


def test_a_large_batch_waits_for_its_slow_data_model_instead_of_decoding_from_the_parity():
    code = Code(2, 1)
    tr = _tracker({0: 0.002, 1: 0.002})
    # the parity answers a batch at 0.2 s, 100x a single input; data model 0, whose q99 is 1.5x
    # its median, is still computing until 0.27 s: waited for (a fixed 50 ms cap would not)
    res, elapsed, _, _ = _timed(code, {0: 0.27, 1: 0.2, 2: 0.2}, slack=SlackPolicy(None, tr, max_s=0.05))
    assert res.reconstructed == [False, False] and elapsed >= 0.26

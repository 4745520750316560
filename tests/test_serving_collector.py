"""The first-decodable-set collector, without Ray: every arrival order, every
set of <= r missing workers, failures, timeouts, hedging."""

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
from coinfer.serving.collector import CollectError, CollectTimeout, Plan, collect


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


def test_late_workers_are_dropped_and_reported():
    code = Code(2, 1)
    outs = _outputs(code)
    s = Scripted(outs)
    late: list[int] = []

    async def main():
        task = asyncio.ensure_future(
            collect(
                code,
                {0: 0, 1: 1, 2: 2},
                lambda w: s.call(w, w),
                Plan((0, 1, 2)),
                5.0,
                on_late=lambda w, sec, exc: late.append(w),
            )
        )
        await s.release([2, 1])
        res = await task
        await s.release([0])  # the straggler finishes afterwards
        return res

    res = asyncio.run(main())
    assert res.late == [0] and res.reconstructed == [True, False]
    assert late == [0]


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

"""Regression tests from a review of collect(verify=...) and the corrupt injection
(commits cbfec0a, 53abc60). Each pins a bug the review found, fixed in the same change."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from coinfer import Code
from coinfer.serving.collector import Plan, collect

from .test_serving_collector import Scripted, _outputs
from .test_serving_verify import _FakeChannel, _runtime_k2r2


async def _collect(code, order, silent=(), down=None, slack=2.0, verify=0.05):
    s = Scripted(_outputs(code))
    task = asyncio.ensure_future(
        collect(
            code,
            {i: i for i in range(code.n)},
            lambda w: s.call(w, w),
            Plan(tuple(range(code.n))),
            5.0,
            down=down,
            slack=slack,
            verify=verify,
        )
    )
    await s.release([w for w in order if w not in silent])
    return await task


@pytest.mark.parametrize("k,r,down", [(2, 2, {3: "killed"}), (2, 1, None)])
def test_verify_does_not_wait_for_rows_that_cannot_make_k_plus_2(k, r, down):
    code = Code(k, r)
    t0 = time.perf_counter()
    res = asyncio.run(_collect(code, [0, 1], silent=(2,), down=down))
    assert res.verified is False
    assert time.perf_counter() - t0 < 1.0  # the slack is 2 s; nothing it could wait for helps


def test_other_corruption_with_its_source_down_is_not_a_failure_of_the_worker(tmp_path):
    from coinfer.serving.channel import WorkerCallError
    from coinfer.serving.injection import Injection

    rt = _runtime_k2r2(tmp_path, verify=0.05)
    clean = _outputs(rt.code, batch=3, classes=3)

    def channel(w):
        if w == 0:
            raise WorkerCallError("WorkerDown: worker 0 has no running process")
        return _FakeChannel(clean, rt.row_of[w])

    rt._channel = channel
    rt.set_injection([1], Injection(corrupt="other"))  # worker 1 answers as data worker 0

    async def main():
        return await asyncio.gather(rt._call(1, np.zeros((3, 4), np.float32)), return_exceptions=True)

    (out,) = asyncio.run(main())
    assert not isinstance(out, BaseException), out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_berrut_locate_on_cuda():
    from coinfer.query import BerrutCode

    code = BerrutCode(2, 5)
    answers = {i: torch.randn(4, 3, device="cuda") for i in range(5)}
    assert code.locate(answers, threshold=2.0).shape == (4,)

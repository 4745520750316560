"""Locating a corrupt worker under model coding: Code.residual and Code.locate."""

from __future__ import annotations

import pytest
import torch

from coinfer import Code
from coinfer.errors import DecodeError


def _outputs(code: Code, batch: int = 30, classes: int = 6, seed: int = 0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(code.k, batch, classes, generator=g, dtype=torch.float64) * 2, -1)
    return dict(enumerate(code.encode_outputs(p)))  # ideal parities: the exact mixtures


@pytest.mark.parametrize("k,r", [(2, 2), (3, 2), (2, 3)])
def test_consistent_outputs_have_no_residual_and_raise_no_alarm(k, r):
    code = Code(k, r)
    outs = _outputs(code)
    assert float(code.residual(outs).max()) < 1e-9
    assert (code.locate(outs, threshold=0.05) == -1).all()


@pytest.mark.parametrize("k,r", [(2, 2), (3, 2)])
def test_each_corrupt_worker_is_located_whether_data_or_parity(k, r):
    code = Code(k, r)
    outs = _outputs(code)
    for bad in range(code.n):
        corrupt = dict(outs)
        # a well-formed wrong answer: all its mass on the class the right answer finds least likely
        corrupt[bad] = torch.nn.functional.one_hot(outs[bad].argmin(-1), 6).double()
        assert (code.locate(corrupt, threshold=0.05) == bad).all()
        # the set without it is consistent again and decodes the clean answers
        rest = {i: v for i, v in corrupt.items() if i != bad}
        torch.testing.assert_close(code.decode(rest), torch.stack([outs[j] for j in range(k)]))


def test_locating_needs_k_plus_2_outputs_and_a_positive_threshold():
    code = Code(2, 2)
    outs = _outputs(code)
    with pytest.raises(DecodeError, match="k \\+ 2 = 4 outputs, got 3"):
        code.locate({i: outs[i] for i in range(3)}, threshold=0.1)
    with pytest.raises(DecodeError, match="threshold must be a positive"):
        code.locate(outs, threshold=-1)
    with pytest.raises(DecodeError, match="k \\+ 1 = 3"):
        code.residual({0: outs[0], 1: outs[1]})
    bad = dict(outs)
    bad[2] = torch.full_like(outs[2], float("nan"))
    with pytest.raises(DecodeError, match="2"):
        code.residual(bad)

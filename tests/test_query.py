"""Coding over queries: the Berrut (ApproxIFER) code's encoder, decoder and
corrupt-worker location."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coinfer.errors import CodeError, DecodeError
from coinfer.query import BerrutCode, berrut_weights, chebyshev_points


def _f(x: torch.Tensor) -> torch.Tensor:
    """A nonlinear 'model': (batch, 6) -> (batch, 4) logits."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 4, generator=g, dtype=torch.float64)
    return torch.tanh(x.double() @ a) * 3


def test_berrut_weights_interpolate_nodes_exactly_and_reproduce_constants():
    nodes = chebyshev_points(5)
    z = np.array([-0.9, -0.1, 0.33, 0.8])
    w = berrut_weights(nodes, np.concatenate([nodes, z]))
    np.testing.assert_allclose(w[:5], np.eye(5), atol=0)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)  # a constant is interpolated exactly
    with pytest.raises(CodeError, match="strictly increasing"):
        berrut_weights([0.1, 0.0], [0.5])


@pytest.mark.parametrize("k,n", [(1, 2), (2, 3), (4, 5), (4, 6), (8, 10)])
def test_systematic_workers_evaluate_the_queries_themselves_and_decode_exactly(k, n):
    code = BerrutCode(k, n)
    x = torch.randn(k, 7, 6, dtype=torch.float64)
    u = code.encode(x)
    torch.testing.assert_close(u[:k], x)  # worker j < k runs query j as it is
    answers = {i: _f(u[i]) for i in range(n)}
    truth = torch.stack([_f(x[j]) for j in range(k)])
    torch.testing.assert_close(code.decode(answers), truth)  # nothing late: exact
    torch.testing.assert_close(code.decode({j: answers[j] for j in range(k)}), truth)


def test_a_late_systematic_worker_is_interpolated_from_the_others():
    code = BerrutCode(2, 3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 500, 6, generator=g, dtype=torch.float64) * 0.3
    u = code.encode(x)
    answers = {i: _f(u[i]) for i in range(3)}
    dec = code.decode({0: answers[0], 2: answers[2]})  # worker 1 late
    truth = _f(x[1])
    torch.testing.assert_close(dec[0], answers[0])
    agree = float((dec[1].argmax(-1) == truth.argmax(-1)).double().mean())
    assert agree > 0.8  # approximate, and far better than chance (0.25)


def test_the_non_systematic_form_uses_chebyshev_points_apart_from_the_queries():
    code = BerrutCode(2, 5, systematic=False)
    np.testing.assert_allclose(code.alpha, chebyshev_points(2))
    np.testing.assert_allclose(code.beta, chebyshev_points(5))
    assert not np.isin(np.round(code.beta, 12), np.round(code.alpha, 12)).any()
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    dec = code.decode({i: v for i, v in enumerate(code.encode(x))})  # F = identity
    assert dec.shape == x.shape and torch.isfinite(dec).all()


def test_decoding_matrices_match_decode():
    code = BerrutCode(4, 6)
    y = {i: torch.randn(3, 5, dtype=torch.float64) for i in (0, 2, 3, 4, 5)}
    d = code.decoding_matrix([0, 2, 3, 4, 5])
    want = torch.einsum("ki,ibc->kbc", d, torch.stack([y[i] for i in (0, 2, 3, 4, 5)]))
    torch.testing.assert_close(code.decode(y), want)


def test_a_corrupt_worker_among_identical_queries_is_located_and_clean_answers_raise_no_alarm():
    # identical queries: every worker evaluates the same input, so the clean answers agree exactly
    code = BerrutCode(3, 6)
    x = torch.randn(1, 40, 6, dtype=torch.float64).expand(3, 40, 6)
    answers = {i: _f(v) for i, v in enumerate(code.encode(x))}
    assert (code.locate(answers, threshold=2.0) == -1).all()
    for bad in range(6):
        corrupt = dict(answers)
        corrupt[bad] = answers[bad] + torch.randn(40, 4, dtype=torch.float64)
        assert (code.locate(corrupt, threshold=2.0) == bad).all()


@pytest.mark.parametrize(
    "args,words",
    [((0, 2), "k must be"), ((3, 2), "need n >= k"), ((2, 1000), "n must be"), ((2.0, 3), "k must be")],
)
def test_bad_code_parameters_are_refused(args, words):
    with pytest.raises(CodeError, match=words):
        BerrutCode(*args)


def test_bad_answers_are_refused_naming_the_problem():
    code = BerrutCode(2, 4)
    y = torch.zeros(3, 5)
    with pytest.raises(DecodeError, match="not in 0..3"):
        code.decode({0: y, 7: y})
    with pytest.raises(DecodeError, match="non-empty"):
        code.decode({})
    with pytest.raises(DecodeError, match="share one shape"):
        code.decode({0: y, 1: torch.zeros(2, 5)})
    with pytest.raises(DecodeError, match=r"workers \[1\] are not finite"):
        code.decode({0: y, 1: torch.full((3, 5), float("nan"))})
    with pytest.raises(DecodeError, match="k \\+ 2 = 4"):
        code.locate({0: y, 1: y, 2: y}, threshold=2.0)
    with pytest.raises(DecodeError, match="threshold must be a positive"):
        code.locate({i: y for i in range(4)}, threshold=0)
    with pytest.raises(DecodeError, match="encode expects a \\(k=2"):
        code.encode(torch.zeros(3, 5))


def test_parm_learns_the_sum_of_a_linear_models_answers_and_decodes_the_late_one():
    from coinfer.query import parm_decode, train_parm

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)  # linear F: the exact parity is F itself (up to the bias)
    x = torch.randn(600, 6)
    parity = train_parm(model, x, 2, epochs=60, lr=1e-2, batch_size=64)
    q = torch.randn(2, 50, 6)
    with torch.no_grad():
        f = [model(q[0]), model(q[1])]
        rec = parm_decode(parity(q.sum(0)), [f[0]])
    torch.testing.assert_close(rec, f[1], atol=0.05, rtol=0)
    with pytest.raises(DecodeError, match="share the parity's shape"):
        parm_decode(torch.zeros(4, 3), [torch.zeros(4, 2)])
    with pytest.raises(DecodeError, match="k must be"):
        train_parm(model, x, 0)


def test_the_backup_student_is_distilled_toward_the_model():
    from coinfer.query import train_backup

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    student = torch.nn.Linear(6, 4)
    x = torch.randn(800, 6)
    with torch.no_grad():
        before = float((student(x).argmax(-1) == model(x).argmax(-1)).float().mean())
    train_backup(model, student, x, epochs=30, lr=1e-2)
    with torch.no_grad():
        after = float((student(x).argmax(-1) == model(x).argmax(-1)).float().mean())
    assert after > max(before, 0.8)
    assert not student.training

"""The code's algebra: generator, decodability, exact decoding, validation."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coinfer import Code, CodeError, DecodeError, project_simplex


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("r", [1, 2, 3])
def test_decode_is_exact_for_every_pattern_of_at_most_r_erasures(k, r):
    code = Code(k, r)
    g = torch.Generator().manual_seed(k * 10 + r)
    data = torch.randn(k, 7, 5, generator=g, dtype=torch.float64)
    outputs = code.encode_outputs(data)
    for size in range(0, r + 1):
        for erased in itertools.combinations(range(code.n), size):
            avail = {i: outputs[i] for i in range(code.n) if i not in erased}
            assert code.can_decode(avail)
            dec = code.decode(avail)
            assert dec.shape == (k, 7, 5)
            torch.testing.assert_close(dec, data, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k,r", [(2, 1), (3, 2), (4, 3)])
def test_more_than_r_erasures_raise_an_error_naming_the_missing_workers(k, r):
    code = Code(k, r)
    outputs = code.encode_outputs(torch.rand(k, 3, 4))
    erased = tuple(range(r + 1))
    avail = {i: outputs[i] for i in range(code.n) if i not in erased}
    assert not code.can_decode(avail)
    with pytest.raises(DecodeError) as err:
        code.decode(avail)
    msg = str(err.value)
    assert f"workers {list(erased)} are missing" in msg
    assert f"r={r}" in msg


def test_generator_is_systematic_and_rows_are_mixtures():
    for k, r in [(2, 1), (3, 2), (5, 3)]:
        code = Code(k, r)
        assert code.generator.shape == (k + r, k)
        np.testing.assert_array_equal(code.generator[:k], np.eye(k))
        assert (code.weights >= 0).all()
        np.testing.assert_allclose(code.weights.sum(1), 1.0)
    np.testing.assert_allclose(Code(4, 1).weights, [[0.25] * 4])


def test_every_k_subset_of_the_default_generator_is_invertible():
    for k, r in [(2, 2), (4, 3), (6, 3)]:
        g = Code(k, r).generator
        for rows in itertools.combinations(range(k + r), k):
            assert abs(np.linalg.det(g[list(rows)])) > 1e-9


@pytest.mark.parametrize(
    "weights,needle",
    [
        ([[0.5, 0.5, 0.0]], "shape (r, k) = (1, 2)"),
        ([[1.2, -0.2]], "non-negative"),
        ([[0.3, 0.3]], "sum to 1"),
        ([[float("nan"), 0.5]], "NaN"),
        ([[0.5, 0.5], [0.5, 0.5]], "singular"),
        ([[1.0, 0.0]], "singular"),
        ("abc", "numeric"),
    ],
)
def test_user_weights_are_validated(weights, needle):
    r = len(weights) if isinstance(weights, list) else 1
    with pytest.raises(CodeError) as err:
        Code(2, r, weights)
    assert needle in str(err.value)


def test_user_weights_that_are_valid_are_kept():
    code = Code(2, 2, [[0.7, 0.3], [0.2, 0.8]])
    np.testing.assert_allclose(code.weights, [[0.7, 0.3], [0.2, 0.8]])
    assert code.condition_number([0, 1]) > 1


def test_bad_k_r_and_indices_are_refused():
    with pytest.raises(CodeError, match="k must be"):
        Code(0, 1)
    with pytest.raises(CodeError, match="r must be"):
        Code(2, 0)
    code = Code(2, 1)
    with pytest.raises(DecodeError, match="out of range"):
        code.decode({0: torch.rand(2, 3), 5: torch.rand(2, 3)})
    with pytest.raises(DecodeError, match="shapes disagree"):
        code.decode({0: torch.rand(2, 3), 2: torch.rand(4, 3)})


def test_decode_returns_arrived_data_outputs_unchanged():
    code = Code(3, 2)
    outs = code.encode_outputs(torch.rand(3, 4, 6))
    avail = {0: outs[0], 2: outs[2], 3: outs[3], 4: outs[4]}
    dec = code.decode(avail)
    assert torch.equal(dec[0], outs[0]) and torch.equal(dec[2], outs[2])


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(2, 6),
    r=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_decode_is_exact_under_random_patterns_property(k, r, seed, data):
    code = Code(k, r)
    g = torch.Generator().manual_seed(seed)
    truth = torch.softmax(torch.randn(k, 3, 10, generator=g, dtype=torch.float64), -1)
    outputs = code.encode_outputs(truth)
    erased = data.draw(st.sets(st.integers(0, code.n - 1), max_size=r))
    avail = {i: outputs[i] for i in range(code.n) if i not in erased}
    torch.testing.assert_close(code.decode(avail), truth, atol=1e-5, rtol=0)
    # exact probabilities decoded and projected stay (numerically) the same
    torch.testing.assert_close(code.decode(avail, project=True), truth, atol=1e-5, rtol=0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=2, max_size=12))
def test_project_simplex_gives_the_nearest_probability_vector(values):
    v = torch.tensor(values, dtype=torch.float64)
    p = project_simplex(v)
    assert (p >= 0).all()
    assert abs(float(p.sum()) - 1.0) < 1e-9
    # optimality: no random point of the simplex is closer. The candidates are drawn in float64
    # and renormalised: float32 samples lie up to ~1e-7 off the simplex and could beat the
    # true projection by that much (seen in CI).
    g = torch.Generator().manual_seed(len(values))
    cand = -torch.log(torch.rand(200, len(v), dtype=torch.float64, generator=g))  # Exp(1) = Dirichlet(1) after norm
    cand = cand / cand.sum(-1, keepdim=True)
    assert float(((p - v) ** 2).sum()) <= float(((cand - v) ** 2).sum(-1).min()) + 1e-9


def test_code_round_trips_through_its_dict():
    code = Code(3, 2)
    assert Code.from_dict(code.to_dict()) == code


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("project", [False, True])
@pytest.mark.parametrize("k, r", [(2, 1), (4, 2), (5, 3)])
def test_small_batch_numpy_path_agrees_with_the_torch_path(monkeypatch, dtype, project, k, r):
    import coinfer.code as code_mod

    code = Code(k, r)
    g = torch.Generator().manual_seed(k * 10 + r)
    data = torch.softmax(torch.randn(k, 3, 10, generator=g, dtype=torch.float64), -1)
    outs = code.encode_outputs(data).to(dtype)
    outs[k:] += 0.01 * torch.randn(outs[k:].shape, generator=g, dtype=torch.float64).to(dtype)  # noisy parity
    for erased in code.erasure_patterns():
        avail = {i: outs[i] for i in range(code.n) if i not in erased}
        small = code.decode(avail, project=project)
        monkeypatch.setattr(code_mod, "SMALL_DECODE", -1)
        big = code.decode(avail, project=project)
        monkeypatch.undo()
        assert small.dtype == big.dtype == dtype and small.shape == (k, 3, 10)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(small, big, rtol=tol, atol=tol)
        if project:
            assert (small >= 0).all() and torch.allclose(small.sum(-1), torch.ones((), dtype=dtype))


@pytest.mark.parametrize("small", [True, False])
def test_non_finite_outputs_are_refused_by_name_when_decoding(monkeypatch, small):
    import coinfer.code as code_mod

    if not small:
        monkeypatch.setattr(code_mod, "SMALL_DECODE", -1)
    code = Code(2, 1)
    outs = code.encode_outputs(torch.softmax(torch.randn(2, 3, 4, dtype=torch.float64), -1))
    outs[2, 1, 0] = float("nan")
    with pytest.raises(DecodeError, match=r"workers \[2\] hold NaN or inf"):
        code.decode({1: outs[1], 2: outs[2]}, project=True)
    outs[1, 0, 0] = float("inf")
    with pytest.raises(DecodeError, match=r"workers \[1, 2\]"):
        code.decode({1: outs[1], 2: outs[2]})


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("r", [2, 3])
def test_default_weights_keep_every_decoding_well_conditioned(k, r):
    """The tabulated Cauchy nodes: worst condition number over every decodable
    pattern at most 250 (evenly spaced nodes gave up to 8982 at k=6, r=3)."""
    code = Code(k, r)
    worst = max(code.condition_number(p) for p in code.erasure_patterns())
    assert worst <= 250.0, worst
    assert (code.weights > 0).all()

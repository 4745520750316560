"""Request validation, injection specs and metrics text, without Ray."""

from __future__ import annotations

import ast
import asyncio
import base64
import io
import json
import random
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from coinfer.errors import CoinferError
from coinfer.serving.injection import Injection, parse_delay
from coinfer.serving.metrics import Metrics
from coinfer.serving.validation import (
    RequestError,
    decode_npy,
    encode_npy,
    json_depth,
    parse_predict_request,
    read_body,
)

SHAPE = (1, 4, 4)


def _npy(x: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, x)
    return base64.b64encode(buf.getvalue()).decode()


def _parse(body, max_batch=8, max_body=1 << 20):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_predict_request(raw, SHAPE, max_batch, max_body)


def test_nested_lists_and_npy_give_the_same_float32_batch():
    x = np.random.default_rng(0).standard_normal((3, *SHAPE)).astype(np.float32)
    a, _ = _parse({"inputs": x.tolist()})
    b, _ = _parse({"npy": _npy(x)})
    assert a.dtype == np.float32 and a.shape == (3, *SHAPE)
    np.testing.assert_array_equal(a, b)


def test_a_single_input_gets_a_batch_dimension():
    x, _ = _parse({"inputs": np.zeros(SHAPE).tolist()})
    assert x.shape == (1, *SHAPE)


def test_int_inputs_are_accepted_and_mode_is_passed_on():
    x, opts = _parse({"npy": _npy(np.ones((2, *SHAPE), dtype=np.uint8)), "mode": "uncoded"})
    assert x.dtype == np.float32 and opts == {"mode": "uncoded"}


@pytest.mark.parametrize(
    "body,status,reason,words",
    [
        (b"{not json", 400, "bad_json", "not valid JSON"),
        (b"[1, 2]", 400, "bad_json", "JSON object"),
        ({"inputs": [[1]], "extra": 1}, 400, "bad_field", "unknown fields ['extra']"),
        ({}, 400, "bad_field", "exactly one of"),
        ({"npy": "***not base64***"}, 400, "bad_base64", "not valid base64"),
        ({"npy": base64.b64encode(b"hello").decode()}, 400, "bad_npy", "not a .npy"),
        ({"inputs": [[1, 2, 3]]}, 422, "bad_shape", "expected (B, 1, 4, 4)"),
        ({"inputs": [[1, 2], [3]]}, 422, "bad_shape", "ragged"),
        ({"inputs": "abc"}, 422, "bad_dtype", "nested list"),
        ({"inputs": [[["a"] * 4] * 4]}, 422, "bad_dtype", "dtype <U1"),
        ({"npy": _npy(np.zeros(SHAPE, dtype=bool))}, 422, "bad_dtype", "dtype bool"),
        ({"npy": _npy(np.zeros((0, *SHAPE), dtype=np.float32))}, 422, "bad_shape", "empty batch"),
        ({"npy": _npy(np.zeros((9, *SHAPE), dtype=np.float32))}, 413, "too_large", "limit of 8"),
        ({"inputs": np.zeros(SHAPE).tolist(), "mode": 3}, 422, "bad_mode", "'mode' must be a string"),
        ({"inputs": None, "npy": None}, 400, "bad_field", "fields ['inputs', 'npy'] are null"),
        ({"inputs": [[[1e39] + [0] * 3] + [[0] * 4] * 3]}, 422, "not_finite", "exceed the float32 range"),
        ({"inputs": [[[True] + [0.5] * 3] + [[0] * 4] * 3]}, 422, "bad_dtype", "got true/false"),
        (b"[" * 33 + b"]" * 33, 400, "too_deep", "33 levels deep; the limit is 32"),
        (b'{"inputs": "' + b"[" * 100 + b'"}', 422, "bad_dtype", "nested list"),
    ],
)
def test_bad_requests_name_the_problem(body, status, reason, words):
    with pytest.raises(RequestError) as ei:
        _parse(body)
    assert ei.value.status == status and ei.value.reason == reason
    assert words in ei.value.message


def test_nan_and_inf_are_rejected_with_the_index():
    x = np.zeros((2, *SHAPE), dtype=np.float32)
    x[1, 0, 2, 3] = np.nan
    with pytest.raises(RequestError) as ei:
        _parse({"npy": _npy(x)})
    assert ei.value.status == 422 and "NaN or inf" in ei.value.message and "[1, 0, 2, 3]" in ei.value.message
    body = ('{"inputs": [[[' + ",".join(["Infinity"] * 4) + "]" + ",[0,0,0,0]" * 3 + "]]}").encode()
    with pytest.raises(RequestError) as ei:
        _parse(body)
    assert ei.value.reason == "not_finite"


def test_oversize_bodies_are_rejected_before_parsing():
    with pytest.raises(RequestError) as ei:
        _parse(b"x" * 2000, max_body=1000)
    assert ei.value.status == 413 and "2000 bytes" in ei.value.message


def test_booleans_elsewhere_do_not_flag_inputs_and_big_integers_are_numbers():
    x, opts = _parse({"inputs": [[[10**20] + [0] * 3] + [[0] * 4] * 3], "return_probabilities": True})
    assert x[0, 0, 0, 0] == np.float32(1e20) and opts == {"return_probabilities": True}
    x, _ = _parse({"inputs": np.zeros(SHAPE).tolist(), "mode": "truefalse"})
    assert x.shape == (1, *SHAPE)


def test_json_depth_ignores_brackets_in_strings_and_escapes():
    doc = {"a": [[1], "]]]\\"], "b\\": '\\"[[[', "c": [{"d": '"]'}]}
    body = json.dumps(doc).encode()
    assert json_depth(body) == 3
    assert {json_depth(body, block=b) for b in (1, 2, 3, 7, 1 << 18)} == {3}  # state carried across blocks
    assert json_depth(b"[" * 100_000 + b"]" * 100_000) == 100_000


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_read_body_counts_the_stream(chunk):
    async def stream(data):
        for i in range(0, len(data), chunk):
            yield data[i : i + chunk]

    assert asyncio.run(read_body(None, stream(b"x" * 1000), 1000)) == b"x" * 1000
    with pytest.raises(RequestError) as ei:
        asyncio.run(read_body(None, stream(b"x" * 1001), 1000))
    assert ei.value.status == 413
    with pytest.raises(RequestError, match="1001 bytes"):
        asyncio.run(read_body("1001", stream(b""), 1000))
    with pytest.raises(RequestError, match="not a number"):
        asyncio.run(read_body("12abc", stream(b""), 1000))


def test_delay_specs_parse_and_reject_nonsense():
    assert parse_delay("constant:20") == Injection("constant", 20.0)
    assert parse_delay("heavy:50:0.05:2") == Injection("heavy", 50.0, 0.05, 2.0)
    assert parse_delay("exponential:5", fail_prob=0.1).fail_prob == 0.1
    for bad in ["slow:5", "constant", "heavy:50", "constant:x", "heavy:50:2.0"]:
        with pytest.raises(CoinferError):
            parse_delay(bad)
    with pytest.raises(CoinferError, match="unknown injection fields"):
        Injection.from_dict({"kind": "constant", "delay": 3})


def test_delay_models_have_the_right_scale():
    rng = random.Random(0)
    assert Injection("constant", 20).sample_delay_s(rng) == pytest.approx(0.02)
    exp = [Injection("exponential", 10).sample_delay_s(rng) for _ in range(4000)]
    assert np.mean(exp) == pytest.approx(0.010, rel=0.1)
    heavy = np.array([Injection("heavy", 50, p=0.1).sample_delay_s(rng) for _ in range(4000)])
    assert np.mean(heavy > 0) == pytest.approx(0.1, abs=0.02)
    assert heavy[heavy > 0].min() >= 0.05 and heavy.max() > 0.2  # heavy tail above the minimum
    fails = [Injection(fail_prob=0.25).sample_failure(rng) for _ in range(4000)]
    assert np.mean(fails) == pytest.approx(0.25, abs=0.03)


def test_metrics_render_prometheus_text():
    m = Metrics()
    m.request("coded", "ok", 0.012)
    m.request("coded", "ok", 0.3)
    m.reconstructed("coded", 1)
    m.worker(0, 0.01)
    m.worker(2, None, failed=True)
    m.timeout("uncoded")
    m.bad_request("bad_json")
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(m.render())
        for s in fam.samples
    }
    assert got[("coinfer_requests_total", (("mode", "coded"), ("status", "ok")))] == 2
    assert got[("coinfer_request_latency_seconds_bucket", (("le", "0.015"), ("mode", "coded")))] == 1
    assert got[("coinfer_request_latency_seconds_bucket", (("le", "+Inf"), ("mode", "coded")))] == 2
    assert got[("coinfer_request_latency_seconds_sum", (("mode", "coded"),))] == pytest.approx(0.312)
    assert got[("coinfer_reconstructions_total", (("mode", "coded"),))] == 1
    assert got[("coinfer_worker_failures_total", (("worker", "2"),))] == 1
    assert got[("coinfer_timeouts_total", (("mode", "uncoded"),))] == 1
    assert got[("coinfer_worker_latency_seconds_count", (("worker", "0"),))] == 1
    assert got[("coinfer_bad_requests_total", (("reason", "bad_json"),))] == 1
    names = {fam.name for fam in text_string_to_metric_families(m.render())}
    assert {
        "coinfer_requests",
        "coinfer_bad_requests",
        "coinfer_request_latency_seconds",
        "coinfer_reconstructions",
        "coinfer_timeouts",
        "coinfer_worker_latency_seconds",
        "coinfer_worker_failures",
    } <= names
    assert Metrics().render().count("coinfer_requests_total{") == 0  # one registry per instance


# --------------------------------------------------------------------------- strict .npy framing


def _header(descr: str, shape, fortran: bool = False) -> str:
    return f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {tuple(shape)!r}, }}"


def _npy_raw(header: str, data: bytes = b"", version=(1, 0)) -> bytes:
    """A .npy file written by hand: magic, version, header length, header, data."""
    text = header.encode("utf-8")
    width = "<H" if version[0] < 2 else "<I"
    return b"\x93NUMPY" + bytes(version) + struct.pack(width, len(text) + 1) + text + b"\n" + data


def _b64(raw: bytes) -> dict:
    return {"npy": base64.b64encode(raw).decode()}


def _saved(x: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, **kw)
    return buf.getvalue()


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


X2 = np.arange(2 * 16, dtype=np.float32).reshape(2, *SHAPE)


@pytest.mark.parametrize(
    "raw,status,reason,words",
    [
        (_saved(X2) + b"\x00" * 3, 400, "bad_npy", "3 trailing bytes after the array"),
        (_saved(X2)[:-4], 400, "bad_npy", "needs exactly 128: the array is cut short"),
        (_npz(x=X2), 400, "bad_npy", "a .npz (zip) archive"),
        (b"\x93NUM", 400, "bad_npy", "not a .npy array"),
        (b"\x93NUMPY\x01", 400, "bad_npy", "cut short: 7 bytes"),
        (_npy_raw(_header("'<f4'", (1, 1, 4, 4)), version=(3, 0)), 400, "bad_npy", "version 3.0"),
        (_npy_raw(_header("'<f4'", (1, 1, 4, 4)), version=(9, 1)), 400, "bad_npy", "expected 1.0 or 2.0"),
        (_npy_raw("{'descr': '<f4'}"), 400, "bad_npy", "invalid .npy header"),
        (_npy_raw("not a dict ((("), 400, "bad_npy", "invalid .npy header"),
        (_npy_raw(_header("'<f4'", (-1, 1, 4, 4))), 400, "bad_npy", "integers >= 0"),
        (_npy_raw(_header("'<f4'", (True, 1, 4, 4))), 400, "bad_npy", "integers >= 0"),
        (
            _npy_raw("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)" + " " * 20_000 + "}"),
            400,
            "bad_npy",
            "header of 20056 bytes; the limit is 10000",
        ),
        (_npy_raw(_header("'<f4'", SHAPE))[:12], 400, "bad_npy", "invalid .npy header (ValueError: EOF"),
        (
            _saved(np.array([{"a": 1}] * 16, dtype=object).reshape(SHAPE), allow_pickle=True),
            422,
            "bad_dtype",
            "dtype object: Python objects (a pickle)",
        ),
        (
            _npy_raw(_header("'|O'", SHAPE), b"\x00" * 128),
            422,
            "bad_dtype",
            "dtype object: Python objects (a pickle)",
        ),
        (_saved(np.zeros(SHAPE, dtype=[("a", "<f4")])), 422, "bad_dtype", "structured dtype"),
        (_npy_raw(_header("('<f4', (2,))", SHAPE)), 422, "bad_dtype", "subarray dtype"),
        (_saved(np.zeros(SHAPE, dtype=np.complex64)), 422, "bad_dtype", "dtype complex64"),
        (
            _saved(np.zeros((2, 7), dtype=np.float32)),
            422,
            "bad_shape",
            "have shape (2, 7), expected (B, 1, 4, 4)",
        ),
        (_npy_raw(_header("'<f4'", (0, 1, 4, 4))), 422, "bad_shape", "empty batch"),
        # a header claiming 292 GiB: refused from the header, nothing allocated
        (
            _npy_raw(_header("'<f4'", (4_900_000_000, 1, 4, 4)), b"\x00" * 64),
            413,
            "too_large",
            "batch of 4900000000 inputs exceeds the limit of 8",
        ),
        (_npy_raw(_header("'<f4'", (2**70, 1, 4, 4))), 413, "too_large", "limit of 8"),
    ],
)
def test_npy_framing_is_strict_and_names_the_problem(raw, status, reason, words):
    tracemalloc.start()
    try:
        with pytest.raises(RequestError) as ei:
            _parse(_b64(raw))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ei.value.status == status and ei.value.reason == reason, ei.value.message
    assert words in ei.value.message, ei.value.message
    assert peak < 200_000 + 4 * len(raw)


def test_npy_in_fortran_order_big_endian_or_version_2_gives_the_same_inputs():
    want, _ = _parse(_b64(_saved(X2)))
    assert want.flags.writeable and want.flags.c_contiguous
    fortran = np.asfortranarray(X2)
    assert _saved(fortran).count(b"'fortran_order': True") == 1
    for raw in (
        _saved(fortran),
        _saved(X2.astype(">f4")),
        _saved(X2.astype(np.float64)),
        _npy_raw(_header("'<f4'", X2.shape), X2.tobytes(), version=(2, 0)),
        _npy_raw(_header("'<f4'", X2.shape, fortran=True), X2.tobytes(order="F")),
    ):
        got, _ = _parse(_b64(raw))
        assert got.dtype == np.float32 and got.flags.writeable and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)


def test_decode_npy_is_a_view_of_the_body_and_encode_npy_is_its_inverse():
    from coinfer.serving import client, loadgen

    assert client.encode_npy is encode_npy and loadgen.encode_npy is encode_npy  # one encoder
    raw = base64.b64decode(encode_npy(X2))
    assert raw.startswith(b"\x93NUMPY\x01\x00")
    x = decode_npy(raw, SHAPE, 8)
    assert not x.flags.writeable and np.shares_memory(x, np.frombuffer(raw, np.uint8))
    np.testing.assert_array_equal(x, X2)
    one = decode_npy(base64.b64decode(encode_npy(X2[0])), SHAPE, 8)
    assert one.shape == SHAPE
    with pytest.raises(ValueError):
        encode_npy(np.array([{}], dtype=object))


_NUMERIC = ["'<f4'", "'>f8'", "'|u1'", "'<i8'", "'<f2'"]
_OTHER = [
    "'|b1'",
    "'|O'",
    "'<c8'",
    "'<U3'",
    "'V4'",
    "[('a', '<f4')]",
    "('<f4', (2,))",
    "'<M8[s]'",
    "'nonsense'",
    "7",
    "None",
]
_GOOD_SHAPES = [SHAPE, (1, *SHAPE), (3, *SHAPE), (8, *SHAPE)]
_BAD_SHAPES = st.one_of(
    st.sampled_from([(9, *SHAPE), (0, *SHAPE), (2**40, *SHAPE), (2**64, *SHAPE), (-1, *SHAPE)]),
    st.lists(st.one_of(st.integers(-3, 20), st.sampled_from([2**31, 2**40, 2**64])), max_size=5).map(tuple),
)


def _often(draw, common, rare, p_common: int = 7):
    """``common`` in ``p_common`` of 10 draws, else ``rare`` (strategies)."""
    return draw(common if draw(st.integers(0, 9)) < p_common else rare)


@st.composite
def _npy_like(draw) -> bytes:
    """Bytes that are, or are close to, a .npy of inputs; or anything at all."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=600))
    if kind == 1:
        return b"PK\x03\x04" + draw(st.binary(max_size=200))
    descr = _often(draw, st.sampled_from(_NUMERIC), st.sampled_from(_OTHER))
    shape = _often(draw, st.sampled_from(_GOOD_SHAPES), _BAD_SHAPES)
    header = _often(draw, st.just(_header(descr, shape, draw(st.booleans()))), st.text(max_size=80), 9)
    try:
        itemsize = np.dtype(ast.literal_eval(descr)).itemsize if descr not in ("7", "None") else 4
    except TypeError:
        itemsize = 4
    count = int(np.prod(shape)) if all(0 <= d < 100 for d in shape) else 0
    length = max(0, count * itemsize + _often(draw, st.just(0), st.sampled_from([-1, 1, -7, 64])))
    data = draw(st.binary(min_size=min(length, 2000), max_size=min(length, 2000)))
    version = _often(draw, st.sampled_from([(1, 0), (2, 0)]), st.sampled_from([(3, 0), (0, 0), (255, 1)]), 8)
    raw = _npy_raw(header, data, version) if version[0] in (1, 2, 3) else b"\x93NUMPY" + bytes(version) + data
    return raw if draw(st.integers(0, 9)) else raw[: draw(st.integers(0, len(raw)))]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_npy_like())
def test_any_npy_bytes_give_a_4xx_or_inputs_and_allocate_no_more_than_the_body(raw):
    body = json.dumps(_b64(raw)).encode()
    tracemalloc.start()
    try:
        try:
            x, _ = parse_predict_request(body, SHAPE, 8, 1 << 20)
        except RequestError as exc:
            event(exc.reason)
            reasons = {"bad_npy", "bad_dtype", "bad_shape", "too_large", "not_finite"}
            assert exc.status in (400, 413, 422) and exc.reason in reasons
            assert exc.message.startswith(
                ("'npy'", "inputs must be numbers", "inputs e", "inputs c", "batch of")
            )
        else:
            event("accepted")
            assert x.dtype == np.float32 and x.shape[1:] == SHAPE and 1 <= len(x) <= 8
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the JSON text, the decoded bytes and one float32 copy of at most 4 times the data (uint8 ->
    # float32): a bounded multiple of the body, never what a header claims
    assert peak <= 8 * len(body) + 300_000, (peak, len(body))

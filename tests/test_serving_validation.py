"""Request validation, injection specs and metrics text, without Ray."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coinfer.errors import CoinferError
from coinfer.serving.injection import Injection, parse_delay
from coinfer.serving.metrics import Metrics
from coinfer.serving.validation import RequestError, json_depth, parse_predict_request, read_body

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

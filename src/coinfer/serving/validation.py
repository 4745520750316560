"""Validation of prediction requests at the HTTP boundary (plain Python, no Ray).

Every rejection is a :class:`RequestError` with an HTTP status, a short reason
code (used as a metrics label) and a message that names the problem, the value
and what was expected.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

__all__ = [
    "MAX_JSON_DEPTH",
    "RequestError",
    "json_depth",
    "parse_predict_request",
    "predict_request_schema",
    "read_body",
]

_FIELDS = {"inputs", "npy", "mode", "return_probabilities"}

MAX_JSON_DEPTH = 32
"""Deepest nesting of JSON arrays and objects accepted in a request body (a batch of
images needs 1 + 1 + len(input_shape) levels)."""


class RequestError(Exception):
    """A request rejected with ``status`` (4xx); ``reason`` is a short code."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


FLOAT32_MAX = float(np.finfo(np.float32).max)
"""Largest magnitude accepted in inputs (the schema's bound; larger ones are a 422)."""

_BASE64 = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


def predict_request_schema(input_shape: tuple[int, ...], max_batch: int, modes: list[str]) -> dict[str, Any]:
    """The JSON Schema of a ``POST /v1/predict`` body, as strict as :func:`parse_predict_request`
    where JSON Schema can say it: exactly one of ``inputs`` (nested lists of one input or of a
    batch of at most ``max_batch``) or ``npy`` (a base64 string), no nulls, no other fields.
    What it cannot say: that ``npy`` decodes to a .npy array (400 bad_npy) of the right shape (422)."""
    one: dict[str, Any] = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
    for d in reversed(input_shape):
        one = {"type": "array", "items": one, "minItems": d, "maxItems": d}
    batch = {"type": "array", "items": one, "minItems": 1, "maxItems": max_batch}
    common = {
        "mode": {"type": "string", "enum": modes, "description": "Default: the server's mode."},
        "return_probabilities": {
            "type": "boolean",
            "description": "Include the probability vectors (default true).",
        },
    }
    dims = ", ".join(map(str, input_shape))
    variants = [
        ("inputs", {"anyOf": [batch, one], "description": f"Nested lists of shape (B, {dims}) or ({dims})."}),
        (
            "npy",
            {
                "type": "string",
                "pattern": _BASE64,
                "contentEncoding": "base64",
                "description": f"A base64-encoded .npy array of shape (B, {dims}) or ({dims}).",
            },
        ),
    ]
    return {
        "title": "PredictRequest",
        "description": "Give exactly one of 'inputs' or 'npy'.",
        "oneOf": [
            {
                "type": "object",
                "title": f"PredictRequest ({field})",
                "properties": {field: spec, **common},
                "required": [field],
                "additionalProperties": False,
            }
            for field, spec in variants
        ],
    }


def _too_large(size: str, max_body_bytes: int) -> RequestError:
    return RequestError(
        413, "too_large", f"request body is {size} bytes, larger than the limit of {max_body_bytes}"
    )


async def read_body(content_length: str | None, chunks: AsyncIterator[bytes], max_body_bytes: int) -> bytes:
    """Read a request body of at most ``max_body_bytes`` bytes.

    A ``Content-Length`` over the limit is refused before a byte of the body is read;
    a body without one (chunked) is read with a running count and refused as soon as
    the count passes the limit, so at most the limit plus one chunk is ever held.

    Args:
        content_length: the ``Content-Length`` header, or ``None``.
        chunks: the body stream (Starlette's ``request.stream()``).
        max_body_bytes: the limit.

    Raises:
        RequestError: 413 over the limit, 400 a malformed ``Content-Length``.
    """
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise RequestError(
                400, "bad_length", f"Content-Length is not a number: {content_length!r}"
            ) from None
        if declared > max_body_bytes:
            raise _too_large(str(declared), max_body_bytes)
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_body_bytes:
            raise _too_large(f"over {max_body_bytes} (read {size} so far)", max_body_bytes)
        parts.append(chunk)
    return b"".join(parts)


# Bytes that matter to the nesting depth of JSON text: quotes, backslashes, brackets.
_SPECIAL = np.zeros(256, dtype=bool)
_SPECIAL[list(b'"\\[]{}')] = True


def json_depth(body: bytes, block: int = 1 << 18) -> int:
    """The deepest nesting of arrays and objects in JSON text, brackets inside strings not
    counted. O(len(body)) in numpy blocks of ``block`` bytes (bounded memory), no recursion;
    a guard before ``json.loads``, whose C decoder recurses once per level. Invalid JSON
    gives some number; the parser rejects it afterwards."""
    depth = deepest = 0
    inside = 0  # 1 while in a string
    carry = 0  # backslashes that end the previous block
    for off in range(0, len(body), block):
        a = np.frombuffer(body, dtype=np.uint8, count=min(block, len(body) - off), offset=off)
        pos = np.flatnonzero(_SPECIAL[a])
        if len(pos) == 0:
            carry = 0
            continue
        c = a[pos]
        k = np.arange(len(c))
        bs = c == ord("\\")
        after = np.empty(len(c), dtype=bool)  # element j directly follows element j - 1
        after[0] = pos[0] == 0 and carry > 0
        after[1:] = pos[1:] == pos[:-1] + 1
        prev_bs = np.empty(len(c), dtype=bool)
        prev_bs[0] = carry > 0
        prev_bs[1:] = bs[:-1]
        starts = bs & ~(prev_bs & after)  # first backslash of each run
        run = k - np.maximum.accumulate(np.where(starts, k, -carry)) + 1  # run length (on bs)
        prev_run = np.empty(len(c), dtype=np.int64)
        prev_run[0] = carry
        prev_run[1:] = run[:-1]
        quote = (c == ord('"')) & ~(prev_bs & after & (prev_run % 2 == 1))  # not escaped
        outside = (inside + np.cumsum(quote)) % 2 == 0
        steps = (outside & ((c == ord("[")) | (c == ord("{")))).astype(np.int32)
        steps -= outside & ((c == ord("]")) | (c == ord("}")))
        levels = depth + np.cumsum(steps)
        deepest = max(deepest, int(levels.max()))
        depth = int(levels[-1])
        inside = (inside + int(quote.sum())) % 2
        carry = int(run[-1]) if bs[-1] and pos[-1] == len(a) - 1 else 0
    return deepest


def _decode_npy(text: Any) -> np.ndarray:
    if not isinstance(text, str):
        raise RequestError(400, "bad_base64", f"'npy' must be a base64 string, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, "bad_base64", f"'npy' is not valid base64: {exc}") from None
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as exc:
        raise RequestError(
            400, "bad_npy", f"'npy' decodes to {len(raw)} bytes that are not a .npy array: {exc}"
        ) from None


def _from_lists(value: Any) -> np.ndarray:
    if not isinstance(value, list):
        raise RequestError(
            422, "bad_dtype", f"'inputs' must be a nested list of numbers, got {type(value).__name__}"
        )
    try:
        x = np.asarray(value)
    except ValueError as exc:
        raise RequestError(422, "bad_shape", f"'inputs' is a ragged nested list: {exc}") from None
    if x.dtype == object:  # e.g. integers beyond int64: numbers all the same
        try:
            x = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            pass
    return x


def _has_bool(value: list) -> bool:
    return any(type(v) is bool for v in np.asarray(value, dtype=object).ravel())


def parse_predict_request(
    body: bytes,
    input_shape: tuple[int, ...],
    max_batch: int,
    max_body_bytes: int,
    max_depth: int = MAX_JSON_DEPTH,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Parse and check a ``POST /v1/predict`` body.

    Returns:
        ``(x, options)``: ``x`` is a ``(B, *input_shape)`` float32 array and
        ``options`` holds ``mode`` and ``return_probabilities`` if given.

    Raises:
        RequestError: 400 malformed (JSON, nesting deeper than ``max_depth``, base64,
            .npy, fields), 413 too large, 422 wrong shape, dtype or non-finite values.
    """
    if len(body) > max_body_bytes:
        raise _too_large(str(len(body)), max_body_bytes)
    # a body with at most max_depth opening brackets cannot nest deeper: two C-speed counts
    # spare the scan for the usual npy body or small batch
    shallow = body.count(b"[") + body.count(b"{") <= max_depth
    depth = 0 if shallow else json_depth(body)
    if depth > max_depth:
        raise RequestError(
            400, "too_deep", f"request body nests JSON {depth} levels deep; the limit is {max_depth}"
        )
    try:
        req = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RequestError(400, "bad_json", f"request body is not valid JSON: {exc}") from None
    if not isinstance(req, dict):
        raise RequestError(400, "bad_json", f"request body must be a JSON object, got {type(req).__name__}")
    unknown = set(req) - _FIELDS
    if unknown:
        raise RequestError(400, "bad_field", f"unknown fields {sorted(unknown)}; expected {sorted(_FIELDS)}")
    nulls = sorted(f for f, v in req.items() if v is None)
    if nulls:
        raise RequestError(
            400,
            "bad_field",
            f"fields {nulls} are null; leave a field out instead (give exactly one of 'inputs' or 'npy')",
        )
    if ("inputs" in req) == ("npy" in req):
        raise RequestError(
            400, "bad_field", "give exactly one of 'inputs' (nested lists) or 'npy' (base64 .npy)"
        )
    x = _from_lists(req["inputs"]) if "inputs" in req else _decode_npy(req["npy"])
    if x.dtype.kind not in "fiu":
        raise RequestError(
            422,
            "bad_dtype",
            f"inputs must be numbers (float or int), got dtype {x.dtype}"
            + (" (nested lists with non-numbers)" if "inputs" in req else ""),
        )
    # JSON true/false that the other fields do not explain (a fast filter before the exact check)
    literals = body.count(b"true") + body.count(b"false") - isinstance(req.get("return_probabilities"), bool)
    if "inputs" in req and literals > 0 and _has_bool(req["inputs"]):
        raise RequestError(422, "bad_dtype", "inputs must be numbers (float or int), got true/false")
    if tuple(x.shape) == tuple(input_shape):
        x = x[None]
    if x.ndim != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape):
        dims = ", ".join(map(str, input_shape))
        raise RequestError(
            422,
            "bad_shape",
            f"inputs have shape {tuple(x.shape)}, expected (B, {dims}) or ({dims}{',' if len(input_shape) == 1 else ''})",
        )
    if len(x) == 0:
        raise RequestError(422, "bad_shape", "inputs hold an empty batch (B = 0)")
    if len(x) > max_batch:
        raise RequestError(413, "too_large", f"batch of {len(x)} inputs exceeds the limit of {max_batch}")
    if x.dtype.kind == "f" and x.dtype.itemsize > 4:  # finite here, inf as float32
        big = np.isfinite(x) & (np.abs(x) > FLOAT32_MAX)
        if big.any():
            i = tuple(int(v) for v in np.argwhere(big)[0])
            raise RequestError(
                422,
                "not_finite",
                f"inputs exceed the float32 range ±{FLOAT32_MAX:.7g} (first at index {list(i)}: {x[i]:g})",
            )
    x = x.astype(np.float32, copy=False)
    finite = np.isfinite(x)
    if not finite.all():
        bad = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise RequestError(
            422, "not_finite", f"inputs contain NaN or inf (first at index {list(bad)}: {x[bad]})"
        )
    opts: dict[str, Any] = {}
    if "mode" in req:
        if not isinstance(req["mode"], str):
            raise RequestError(422, "bad_mode", f"'mode' must be a string, got {req['mode']!r}")
        opts["mode"] = req["mode"]
    if "return_probabilities" in req:
        if not isinstance(req["return_probabilities"], bool):
            raise RequestError(422, "bad_field", "'return_probabilities' must be true or false")
        opts["return_probabilities"] = req["return_probabilities"]
    return np.ascontiguousarray(x), opts

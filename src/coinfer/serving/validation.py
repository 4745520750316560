"""Validation of prediction requests at the HTTP boundary (plain Python, no Ray).

Every rejection is a :class:`RequestError` with an HTTP status, a short reason
code (used as a metrics label) and a message that names the problem, the value
and what was expected.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import math
import warnings
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import numpy.lib.format as npy_format

__all__ = [
    "MAX_JSON_DEPTH",
    "RequestError",
    "check_batch_shape",
    "decode_npy",
    "encode_npy",
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


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive's first local header; an empty zip
_NPY_VERSIONS = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
_MAX_NPY_HEADER = 10_000
"""Longest ``.npy`` header text accepted (numpy's own default; the header of a batch of inputs takes about 128)."""


def encode_npy(x: np.ndarray) -> str:
    """Base64 of ``x`` (C order) as a version 1.0 ``.npy`` (the ``npy`` request field).

    The one encoder of the client and the load generator; :func:`decode_npy` is its
    strict inverse on the server. Arrays of Python objects are refused (``ValueError``)."""
    buf = io.BytesIO()
    npy_format.write_array(buf, np.ascontiguousarray(x), version=(1, 0), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _dims(input_shape: tuple[int, ...]) -> str:
    dims = ", ".join(map(str, input_shape))
    return f"(B, {dims}) or ({dims}{',' if len(input_shape) == 1 else ''})"


def check_batch_shape(shape: tuple[int, ...], input_shape: tuple[int, ...], max_batch: int, what: str) -> int:
    """The batch size ``B`` of inputs of ``shape`` (``(B, *input_shape)`` or one input of
    ``input_shape``), from the shape alone (nothing allocated).

    Raises:
        RequestError: 422 ``bad_shape`` (another shape, an empty batch), 413 ``too_large``
            (more than ``max_batch`` inputs); ``what`` names the inputs in the message.
    """
    shape, input_shape = tuple(shape), tuple(input_shape)
    if shape == input_shape:
        return 1
    if len(shape) != len(input_shape) + 1 or shape[1:] != input_shape:
        raise RequestError(422, "bad_shape", f"{what} have shape {shape}, expected {_dims(input_shape)}")
    if shape[0] == 0:
        raise RequestError(422, "bad_shape", f"{what} hold an empty batch (B = 0)")
    if shape[0] > max_batch:
        raise RequestError(413, "too_large", f"batch of {shape[0]} inputs exceeds the limit of {max_batch}")
    return shape[0]


def _bad_npy(message: str) -> RequestError:
    return RequestError(400, "bad_npy", f"'npy' {message}")


def _npy_dtype_problem(dtype: np.dtype) -> str | None:
    if dtype.hasobject:
        return f"dtype {dtype}: Python objects (a pickle), which are never loaded"
    if dtype.names is not None:
        return f"a structured dtype {dtype}"
    if dtype.subdtype is not None:
        return f"a subarray dtype {dtype}"
    if dtype.kind not in "fiu":
        return f"dtype {dtype}"
    return None


@functools.lru_cache(maxsize=256)
def _read_npy_header(version: tuple[int, int], head: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """numpy's own header parser (its ``safe_eval``, no pickle), cached by the header's exact
    bytes: a server sees the same few headers (one per batch shape) over and over, and
    parsing one costs about as much as the rest of a small request's body."""
    fp = io.BytesIO(head)
    npy_format.read_magic(fp)
    with warnings.catch_warnings(action="ignore"):  # numpy's note on Python 2 headers
        shape, fortran_order, dtype = _NPY_VERSIONS[version](fp, max_header_size=_MAX_NPY_HEADER)
    if fp.read(1):
        raise ValueError("bytes after the header")
    return shape, fortran_order, dtype


def decode_npy(raw: bytes, input_shape: tuple[int, ...], max_batch: int) -> np.ndarray:
    """Strictly parse the bytes of a ``.npy`` array of inputs, without pickle and without
    allocating from what the header claims.

    The magic string, the format version (1.0 or 2.0), the header (at most
    ``_MAX_NPY_HEADER`` characters), the dtype (plain float or int), the shape
    (``(B, *input_shape)`` with ``1 <= B <= max_batch``, or one input) and the exact
    data length (``prod(shape) * itemsize``: neither short nor with trailing bytes)
    are all checked from the header before the data is looked at; the result is a
    read-only view of ``raw`` (``np.frombuffer``), Fortran order handled.

    Raises:
        RequestError: 400 ``bad_npy`` (not a .npy, a .npz archive, an unsupported
            version, a malformed header, a wrong data length), 422 ``bad_dtype`` or
            ``bad_shape``, 413 ``too_large`` (over ``max_batch``).
    """
    size = len(raw)
    if raw[: len(_NPY_MAGIC)] != _NPY_MAGIC:
        if raw.startswith(_ZIP_MAGICS):
            raise _bad_npy(
                f"decodes to a .npz (zip) archive of {size} bytes, not a .npy array; "
                "send one array saved with numpy.save (or coinfer.serving.client.encode_npy)"
            )
        raise _bad_npy(
            f"decodes to {size} bytes that are not a .npy array: they start with {raw[:8]!r}, "
            f"expected the magic string {_NPY_MAGIC!r}"
        )
    fp = io.BytesIO(raw)
    try:
        version = npy_format.read_magic(fp)
    except ValueError:
        raise _bad_npy(f"is a .npy array cut short: {size} bytes, not even the 8-byte magic string") from None
    read_header = _NPY_VERSIONS.get(version)
    if read_header is None:
        raise _bad_npy(
            f"is a .npy array of format version {version[0]}.{version[1]}, "
            "which is not supported; expected 1.0 or 2.0 (what numpy.save writes for numeric arrays)"
        )
    width = 2 if version == (1, 0) else 4  # the header length: little-endian uint16 (1.0) or uint32 (2.0)
    declared = int.from_bytes(raw[8 : 8 + width], "little")
    if declared > _MAX_NPY_HEADER:
        raise _bad_npy(
            f"has a .npy header of {declared} bytes; the limit is {_MAX_NPY_HEADER} "
            "(the header of a batch of inputs takes about 128)"
        )
    try:
        end = 8 + width + declared
        shape, fortran_order, dtype = _read_npy_header(version, bytes(raw[:end]))
        fp.seek(end)
    except Exception as exc:  # ValueError mostly; whatever a hostile header raises is the body's fault
        raise _bad_npy(
            f"has an invalid .npy header ({type(exc).__name__}: {str(exc)[:300]}); expected a dict "
            "literal with 'descr', 'fortran_order' and 'shape', as numpy.save writes"
        ) from None
    if any(type(d) is not int or d < 0 for d in shape):
        raise _bad_npy(f"has an invalid .npy header: its shape {shape!r} must hold integers >= 0")
    problem = _npy_dtype_problem(dtype)
    if problem is not None:
        raise RequestError(422, "bad_dtype", f"inputs must be numbers (float or int); 'npy' holds {problem}")
    batch = check_batch_shape(shape, input_shape, max_batch, "'npy' inputs")
    count = batch * math.prod(input_shape)
    need = count * dtype.itemsize
    offset = fp.tell()
    have = size - offset
    if have != need:
        extra = f"{have - need} trailing bytes after the array" if have > need else "the array is cut short"
        raise _bad_npy(
            f"holds {have} bytes of array data after its header, but shape {tuple(shape)} of dtype "
            f"{dtype.str} ({dtype.itemsize} bytes each) needs exactly {need}: {extra}"
        )
    x = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    if fortran_order:
        return x.reshape(tuple(shape)[::-1]).transpose()
    return x.reshape(tuple(shape))


def _decode_npy(text: Any, input_shape: tuple[int, ...], max_batch: int) -> np.ndarray:
    if not isinstance(text, str):
        raise RequestError(400, "bad_base64", f"'npy' must be a base64 string, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, "bad_base64", f"'npy' is not valid base64: {exc}") from None
    return decode_npy(raw, input_shape, max_batch)


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
    if "inputs" in req:
        x = _from_lists(req["inputs"])
        if x.dtype.kind not in "fiu":
            raise RequestError(
                422,
                "bad_dtype",
                f"inputs must be numbers (float or int), got dtype {x.dtype} (nested lists with non-numbers)",
            )
        # JSON true/false that the other fields do not explain (a fast filter before the exact check)
        literals = (
            body.count(b"true") + body.count(b"false") - isinstance(req.get("return_probabilities"), bool)
        )
        if literals > 0 and _has_bool(req["inputs"]):
            raise RequestError(422, "bad_dtype", "inputs must be numbers (float or int), got true/false")
        check_batch_shape(x.shape, input_shape, max_batch, "inputs")
        if tuple(x.shape) == tuple(input_shape):
            x = x[None]
    else:  # dtype, shape and length checked from the header before the data is looked at
        x = _decode_npy(req["npy"], input_shape, max_batch)
        if tuple(x.shape) == tuple(input_shape):
            x = x[None]
    if x.dtype.kind == "f" and x.dtype.itemsize > 4:  # finite here, inf as float32
        big = np.isfinite(x) & (np.abs(x) > FLOAT32_MAX)
        if big.any():
            i = tuple(int(v) for v in np.argwhere(big)[0])
            raise RequestError(
                422,
                "not_finite",
                f"inputs exceed the float32 range ±{FLOAT32_MAX:.7g} (first at index {list(i)}: {x[i]:g})",
            )
    if x.dtype.kind == "f":  # integers are always finite, also as float32
        finite = np.isfinite(x)
        if not finite.all():
            bad = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise RequestError(
                422, "not_finite", f"inputs contain NaN or inf (first at index {list(bad)}: {x[bad]})"
            )
    # one writable, C-ordered float32 copy (a .npy's array is a read-only view of the body)
    x = np.array(x, dtype=np.float32, order="C", copy=True if not x.flags.writeable else None)
    opts: dict[str, Any] = {}
    if "mode" in req:
        if not isinstance(req["mode"], str):
            raise RequestError(422, "bad_mode", f"'mode' must be a string, got {req['mode']!r}")
        opts["mode"] = req["mode"]
    if "return_probabilities" in req:
        if not isinstance(req["return_probabilities"], bool):
            raise RequestError(422, "bad_field", "'return_probabilities' must be true or false")
        opts["return_probabilities"] = req["return_probabilities"]
    return x, opts

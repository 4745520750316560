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
from typing import Any

import numpy as np

__all__ = ["RequestError", "parse_predict_request"]

_FIELDS = {"inputs", "npy", "mode", "return_probabilities"}


class RequestError(Exception):
    """A request rejected with ``status`` (4xx); ``reason`` is a short code."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


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
        return np.asarray(value)
    except ValueError as exc:
        raise RequestError(422, "bad_shape", f"'inputs' is a ragged nested list: {exc}") from None


def parse_predict_request(
    body: bytes, input_shape: tuple[int, ...], max_batch: int, max_body_bytes: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Parse and check a ``POST /v1/predict`` body.

    Returns:
        ``(x, options)``: ``x`` is a ``(B, *input_shape)`` float32 array and
        ``options`` holds ``mode`` and ``return_probabilities`` if given.

    Raises:
        RequestError: 400 malformed (JSON, base64, .npy, fields), 413 too large,
            422 wrong shape, dtype or non-finite values.
    """
    if len(body) > max_body_bytes:
        raise RequestError(
            413, "too_large", f"request body is {len(body)} bytes, larger than the limit of {max_body_bytes}"
        )
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, "bad_json", f"request body is not valid JSON: {exc}") from None
    if not isinstance(req, dict):
        raise RequestError(400, "bad_json", f"request body must be a JSON object, got {type(req).__name__}")
    unknown = set(req) - _FIELDS
    if unknown:
        raise RequestError(400, "bad_field", f"unknown fields {sorted(unknown)}; expected {sorted(_FIELDS)}")
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

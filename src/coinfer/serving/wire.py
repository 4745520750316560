"""The data plane's framing: a fixed header and raw array bytes over a byte stream.

Plain Python (struct, numpy, asyncio streams), no Ray, no pickle: a frame is
data, never code. Every frame is::

    header  (24 bytes, little endian)
        magic      4s   b"CNF1"
        kind       u8   PREDICT, RESULT, ERROR or CANCEL
        dtype      u8   0: raw bytes (an ERROR's UTF-8 text), 1: float32
        ndim       u8   0..MAX_NDIM
        flags      u8   PREDICT: bit 0 = fail on purpose (injection)
        delay_us   u32  PREDICT: delay the reply by this long after computing it (injection)
        rid        u64  request id, chosen by the sender of PREDICT, echoed by the answer
        nbytes     u64  payload length
    shape   (ndim x u32)
    payload (nbytes bytes; for float32, exactly 4 x prod(shape))

A reader is given the largest payload it accepts and checks magic, kind,
dtype, ndim and the exact payload length from the header *before* reading the
payload, so a peer cannot make it allocate more than that bound.
"""

from __future__ import annotations

import asyncio
import math
import struct
from dataclasses import dataclass

import numpy as np

from coinfer.errors import CoinferError

__all__ = [
    "CANCEL",
    "ERROR",
    "FLAG_FAIL",
    "Frame",
    "MAGIC",
    "PREDICT",
    "RESULT",
    "WireError",
    "pack",
    "read_frame",
]

MAGIC = b"CNF1"
PREDICT, RESULT, ERROR, CANCEL = 1, 2, 3, 4
KINDS = {PREDICT: "PREDICT", RESULT: "RESULT", ERROR: "ERROR", CANCEL: "CANCEL"}
RAW, FLOAT32 = 0, 1
FLAG_FAIL = 1
MAX_NDIM = 8
MAX_ERROR_BYTES = 64 * 1024
HEADER = struct.Struct("<4sBBBBIQQ")


class WireError(CoinferError):
    """A frame that breaks the framing rules (the connection cannot go on after it)."""


@dataclass(frozen=True)
class Frame:
    """One decoded frame. ``payload`` is the raw bytes; :meth:`array` and :meth:`text` read it."""

    kind: int
    rid: int
    shape: tuple[int, ...]
    payload: bytes
    dtype: int = RAW
    flags: int = 0
    delay_us: int = 0

    def array(self) -> np.ndarray:
        """The float32 array of a frame whose dtype is float32 (a writable copy of the payload)."""
        if self.dtype != FLOAT32:
            raise WireError(f"{KINDS.get(self.kind, self.kind)} frame carries no float32 array")
        return np.frombuffer(bytearray(self.payload), dtype="<f4").reshape(self.shape)

    def text(self) -> str:
        return self.payload.decode("utf-8", errors="replace")


def pack(
    kind: int,
    rid: int,
    array: np.ndarray | None = None,
    *,
    text: str | None = None,
    flags: int = 0,
    delay_us: int = 0,
) -> list[bytes | memoryview]:
    """The buffers of one frame (``writer.writelines`` them): an ``array`` (cast to
    contiguous little-endian float32), a ``text`` (UTF-8, cut at 64 KiB) or nothing."""
    if array is not None:
        a = np.ascontiguousarray(array, dtype="<f4")
        if a.ndim > MAX_NDIM:
            raise WireError(f"array of {a.ndim} dimensions; at most {MAX_NDIM} go on the wire")
        shape, dtype, payload = a.shape, FLOAT32, memoryview(a).cast("B")
    else:
        shape, dtype = (), RAW
        payload = (text or "").encode("utf-8")[:MAX_ERROR_BYTES]
    head = HEADER.pack(MAGIC, kind, dtype, len(shape), flags, delay_us, rid, len(payload))
    return [head + struct.pack(f"<{len(shape)}I", *shape), payload]


async def read_frame(reader: asyncio.StreamReader, max_payload: int) -> Frame | None:
    """Read one frame; ``None`` at a clean end of stream (between frames).

    Raises:
        WireError: bad magic, unknown kind or dtype, too many dimensions, a
            float32 payload whose length is not 4 x prod(shape), a payload over
            ``max_payload`` (checked before it is read), or a stream that ends
            inside a frame.
    """
    try:
        head = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise WireError(
            f"stream ended inside a frame header ({len(exc.partial)} of {HEADER.size} bytes)"
        ) from None
    magic, kind, dtype, ndim, flags, delay_us, rid, nbytes = HEADER.unpack(head)
    if magic != MAGIC:
        raise WireError(f"not a coinfer frame (magic {magic!r}, expected {MAGIC!r})")
    if kind not in KINDS:
        raise WireError(f"unknown frame kind {kind}")
    if dtype not in (RAW, FLOAT32):
        raise WireError(f"unknown dtype code {dtype} (0: bytes, 1: float32)")
    if ndim > MAX_NDIM:
        raise WireError(f"{ndim} dimensions; at most {MAX_NDIM}")
    limit = max_payload if dtype == FLOAT32 else MAX_ERROR_BYTES
    if nbytes > limit:
        raise WireError(f"payload of {nbytes} bytes, over the limit of {limit}")
    try:
        shape = struct.unpack(f"<{ndim}I", await reader.readexactly(4 * ndim)) if ndim else ()
        if dtype == FLOAT32 and nbytes != 4 * math.prod(shape):
            raise WireError(f"float32 payload of {nbytes} bytes does not match shape {shape}")
        payload = await reader.readexactly(nbytes) if nbytes else b""
    except asyncio.IncompleteReadError:
        raise WireError("stream ended inside a frame") from None
    return Frame(kind, rid, tuple(shape), payload, dtype, flags, delay_us)

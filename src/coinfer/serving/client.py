"""A small Python client of the HTTP API: ``coinfer.Client``."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np

from coinfer.errors import CoinferError
from coinfer.serving.validation import encode_npy

__all__ = ["Client", "ServerError", "encode_npy"]


class ServerError(CoinferError):
    """The server answered with an error; ``status`` and ``reason`` say which."""

    def __init__(self, status: int, reason: str, detail: str):
        super().__init__(f"HTTP {status} {reason}: {detail}")
        self.status, self.reason, self.detail = status, reason, detail


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        body = resp.json()
        reason, detail = body.get("error", "error"), body.get("detail", resp.text)
    except ValueError:
        reason, detail = "error", resp.text
    raise ServerError(resp.status_code, str(reason), str(detail))


class Client:
    """Client of a ``coinfer serve`` server.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8000``.
        timeout_s: HTTP timeout per call.

    Example::

        c = coinfer.Client("http://127.0.0.1:8000")
        reply = c.predict(x)             # x: (B, *input_shape) or one input
        reply["outputs"][0]["labels"]    # top-1 class names of data model 0
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout_s: float = 30.0):
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)

    def predict(
        self,
        x: np.ndarray | list,
        mode: str | None = None,
        binary: bool = True,
        return_probabilities: bool = True,
    ) -> dict[str, Any]:
        """Predict ``x``; the reply holds, per data model, ``probabilities``, ``top1``,
        ``labels`` and ``reconstructed``.

        ``binary`` sends a base64 ``.npy`` (exact float32), else nested lists.
        Raises :class:`ServerError` on an error reply."""
        body: dict[str, Any] = {}
        if binary:
            body["npy"] = encode_npy(np.asarray(x, dtype=np.float32))
        else:
            body["inputs"] = np.asarray(x).tolist() if isinstance(x, np.ndarray) else x
        if mode is not None:
            body["mode"] = mode
        if not return_probabilities:
            body["return_probabilities"] = False
        resp = self._http.post("/v1/predict", json=body)
        _raise_for(resp)
        return resp.json()

    def models(self) -> dict[str, Any]:
        """The served bundle's summary (``GET /v1/models``)."""
        resp = self._http.get("/v1/models")
        _raise_for(resp)
        return resp.json()

    def health(self) -> dict[str, Any]:
        """``GET /healthz`` (does not raise on 503 ``degraded``)."""
        return self._http.get("/healthz").json()

    def metrics(self) -> str:
        """The Prometheus text of ``GET /metrics``."""
        resp = self._http.get("/metrics")
        _raise_for(resp)
        return resp.text

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AdminClient:
    """Client of the loopback-only admin API (injection, kill, restart, mode)."""

    def __init__(self, url: str, timeout_s: float = 150.0):
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = self._http.post(path, json=body)
        _raise_for(resp)
        return resp.json()

    def state(self) -> dict[str, Any]:
        resp = self._http.get("/admin/state")
        _raise_for(resp)
        return resp.json()

    def inject(self, workers: list[int] | None = None, **injection: Any) -> dict[str, Any]:
        """Set ``kind``, ``ms``, ``p``, ``alpha``, ``fail_prob`` on ``workers`` (None: all)."""
        return self._post("/admin/inject", {"workers": workers, **injection})

    def clear(self) -> dict[str, Any]:
        return self._post("/admin/clear", {})

    def kill(self, worker: int) -> dict[str, Any]:
        return self._post("/admin/kill", {"worker": worker})

    def restart(self, worker: int) -> dict[str, Any]:
        return self._post("/admin/restart", {"worker": worker})

    def config(self, **settings: Any) -> dict[str, Any]:
        """Set ``mode``, ``timeout_s``, ``hedge_ms`` or ``decode_slack`` (ms or ``"auto"``)."""
        return self._post("/admin/config", settings)

    def close(self) -> None:
        self._http.close()

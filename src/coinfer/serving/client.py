"""A small Python client of the HTTP API: ``coinfer.Client``."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.parse
from typing import Any

import httpx
import numpy as np

from coinfer.errors import CoinferError
from coinfer.serving.validation import encode_npy

__all__ = ["Client", "ServerError", "ServerUnreachable", "encode_npy"]


class ServerError(CoinferError):
    """The server answered with an error; ``status`` and ``reason`` say which."""

    def __init__(self, status: int, reason: str, detail: str):
        super().__init__(f"HTTP {status} {reason}: {detail}")
        self.status, self.reason, self.detail = status, reason, detail


class ServerUnreachable(CoinferError, ConnectionError):
    """No HTTP answer from the server (refused, reset or timed out)."""


class _Reply:
    """The little of an HTTP response that :class:`Client` reads."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status_code, self.content = status, body

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class _Connection:
    """One keep-alive HTTP/1.1 connection (the standard library's ``http.client``: about a
    quarter of httpx's CPU per request, which a client on the server's machine shares with
    it). Reconnects once when the server closed an idle connection; thread-safe."""

    def __init__(self, url: str, timeout_s: float) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise CoinferError(f"server URL must be http://HOST[:PORT] or https://..., got {url!r}")
        self.url, self._u, self.timeout_s = url, u, timeout_s
        self._prefix = u.path.rstrip("/")
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def _open(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._u.scheme == "https" else http.client.HTTPConnection
        return cls(self._u.hostname, self._u.port, timeout=self.timeout_s)

    def request(self, method: str, path: str, body: bytes | None = None) -> _Reply:
        headers = {"content-type": "application/json"} if body is not None else {}
        with self._lock:
            for attempt in (1, 2):
                if self._conn is None:
                    self._conn = self._open()
                try:
                    self._conn.request(method, self._prefix + path, body=body, headers=headers)
                    resp = self._conn.getresponse()
                    data = resp.read()
                    if resp.will_close:
                        self.close_locked()
                    return _Reply(resp.status, data)
                except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                    self.close_locked()  # a kept-alive connection the server had closed: once more
                    if attempt == 2:
                        raise ServerUnreachable(f"no answer from {self.url}: {exc}") from None
                except (OSError, http.client.HTTPException) as exc:
                    self.close_locked()
                    raise ServerUnreachable(
                        f"no answer from {self.url}: {type(exc).__name__}: {exc}"
                    ) from None
        raise AssertionError("unreachable")

    def close_locked(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()


def _raise_for(resp: httpx.Response | _Reply) -> None:
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
        self._http = _Connection(self.url, timeout_s)

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
        resp = self._http.request("POST", "/v1/predict", json.dumps(body).encode())
        _raise_for(resp)
        return resp.json()

    def models(self) -> dict[str, Any]:
        """The served bundle's summary (``GET /v1/models``)."""
        resp = self._http.request("GET", "/v1/models")
        _raise_for(resp)
        return resp.json()

    def health(self) -> dict[str, Any]:
        """``GET /healthz`` (does not raise on 503 ``degraded``)."""
        return self._http.request("GET", "/healthz").json()

    def metrics(self) -> str:
        """The Prometheus text of ``GET /metrics``."""
        resp = self._http.request("GET", "/metrics")
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
        """Set ``kind``, ``ms``, ``p``, ``alpha``, ``fail_prob``, ``corrupt`` on ``workers`` (None: all)."""
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

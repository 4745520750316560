"""The HTTP boundary without Ray: bounded body reading, JSON depth, the published
schema, the admin Host check, the port check before startup and /metrics.

The apps run on a stub runtime (no workers): these tests are about what happens
before a request reaches the workers."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from coinfer.errors import CoinferError
from coinfer.serving.app import build_admin_app, build_app
from coinfer.serving.metrics import Metrics
from coinfer.serving.runtime import ServeConfig

LIMIT = 1000
SHAPE = (4,)


class StubRuntime:
    """What the apps read from a Runtime; predict answers every data model with zeros."""

    def __init__(self, max_body_bytes: int = LIMIT, max_batch: int = 4, **config):
        self.config = ServeConfig(Path("stub"), max_batch=max_batch, max_body_bytes=max_body_bytes, **config)
        self.input_shape = SHAPE
        self.mode = "coded"
        self.class_names = ["a", "b", "c"]
        self.code = SimpleNamespace(k=2, r=1, n=3, weights=np.ones((1, 2)))
        self.manifest = {"architecture": {"name": "stub"}, "encoder": None}
        self.metrics = Metrics()
        self.down: set[int] = set()
        self.calls = 0

    async def predict(self, x: np.ndarray, mode: str):
        self.calls += 1
        out = torch.full((2, len(x), 3), 1 / 3)  # the runtime returns torch outputs
        return SimpleNamespace(
            outputs=out, reconstructed=[False, False], used={0: 0, 1: 1}, failed={}, late=[]
        )

    def state(self) -> dict:
        return {"mode": self.mode, "workers": [], "down": []}

    def health_report(self) -> dict:
        return {"status": "ok", "mode": self.mode, "down": [], "failing": [], "unavailable": {}}


def _scope(headers: list[tuple[bytes, bytes]]) -> dict:
    """The ASGI scope of a ``POST /v1/predict`` from a loopback client."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/predict",
        "raw_path": b"/v1/predict",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }


def _asgi_post(app, chunks: list[bytes], content_length: int | None) -> tuple[int, dict, int]:
    """POST /v1/predict straight through ASGI; returns (status, JSON body, body bytes the app consumed)."""
    consumed = 0
    pending = list(chunks)
    sent: list[dict] = []

    async def receive():
        nonlocal consumed
        if not pending:
            return {"type": "http.request", "body": b"", "more_body": False}
        chunk = pending.pop(0)
        consumed += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message):
        sent.append(message)

    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    scope = _scope(headers)
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), consumed


def test_a_body_that_stops_arriving_gets_a_408_and_frees_its_reader_slot():
    rt = StubRuntime(max_inflight=1, max_body_readers=1, body_timeout_s=0.2)
    app = build_app(rt)
    ok = json.dumps({"inputs": [1, 2, 3, 4]}).encode()

    async def stalled_receive():
        if not hasattr(stalled_receive, "sent"):
            stalled_receive.sent = True
            return {"type": "http.request", "body": ok[:5], "more_body": True}
        await asyncio.Event().wait()  # the client never sends the rest (nor disconnects)

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = _scope([(b"host", b"127.0.0.1"), (b"content-type", b"application/json")])
    t0 = time.perf_counter()
    asyncio.run(asyncio.wait_for(app(scope, stalled_receive, send), 5.0))
    assert time.perf_counter() - t0 < 3.0
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    assert status == 408 and body["error"] == "body_timeout" and "0.2s" in body["detail"]
    status, _, _ = _asgi_post(app, [ok], content_length=len(ok))  # the one reader slot is free again
    assert status == 200


OK_BODY = json.dumps({"inputs": [1, 2, 3, 4]}).encode()


async def _slow_post(app, release: asyncio.Event) -> int:
    """POST /v1/predict whose body stops after 5 bytes until ``release`` is set (a client
    sending at 1 byte/s, or stalled); returns the status of the answer."""
    chunks = [OK_BODY[:5], OK_BODY[5:]]
    sent: list[dict] = []

    async def receive():
        if len(chunks) == 1:
            await release.wait()
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    async def send(message):
        sent.append(message)

    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
    await app(_scope(headers + [(b"content-length", str(len(OK_BODY)).encode())]), receive, send)
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def test_slow_bodies_do_not_take_the_admission_slots():
    """The fault probe's case: 100 clients sending their body at 1 byte/s got normal requests a
    503 while the admission slot was taken before the body was read. Now a request is admitted
    once its body has arrived; the slow bodies only hold body-reader slots."""
    rt = StubRuntime(max_inflight=1, max_body_readers=101, body_timeout_s=60)
    app = build_app(rt)

    async def main() -> None:
        release = asyncio.Event()
        slow = [asyncio.ensure_future(_slow_post(app, release)) for _ in range(100)]
        await asyncio.sleep(0.05)  # every slow body has begun and waits
        assert not any(t.done() for t in slow)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            t0 = time.perf_counter()
            for _ in range(3):
                resp = await client.post("/v1/predict", content=OK_BODY)
                assert resp.status_code == 200, resp.text
            assert time.perf_counter() - t0 < 2.0 and rt.calls == 3
            release.set()  # the slow bodies arrive: each is admitted and answered in turn
            assert await asyncio.gather(*slow) == [200] * 100
            assert rt.calls == 103

    asyncio.run(main())


def test_more_slow_bodies_than_max_body_readers_get_a_fast_503_with_retry_after():
    rt = StubRuntime(max_inflight=1, max_body_readers=3, body_timeout_s=60)
    assert rt.config.body_reader_limit == 3
    app = build_app(rt)

    async def main() -> None:
        release = asyncio.Event()
        slow = [asyncio.ensure_future(_slow_post(app, release)) for _ in range(3)]
        await asyncio.sleep(0.05)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            t0 = time.perf_counter()
            resp = await client.post("/v1/predict", content=OK_BODY)
            assert time.perf_counter() - t0 < 1.0
            assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
            body = resp.json()
            assert body["error"] == "overloaded" and body["body_readers"] == 3 and body["limit"] == 3
            assert "3 request bodies are being received" in body["detail"]
            assert "--max-body-readers" in body["detail"] and "retry after 1s" in body["detail"]
            assert rt.calls == 0
            release.set()
            assert await asyncio.gather(*slow) == [200] * 3
            assert (await client.post("/v1/predict", content=OK_BODY)).status_code == 200  # slots free again
            assert "coinfer_overloaded_total 1" in (await client.get("/metrics")).text

    asyncio.run(main())


def test_a_content_length_over_the_limit_is_refused_before_the_body_is_read():
    rt = StubRuntime()
    status, body, consumed = _asgi_post(build_app(rt), [b"x" * 600] * 100, content_length=60_000)
    assert status == 413 and body["error"] == "too_large"
    assert "60000 bytes" in body["detail"] and f"limit of {LIMIT}" in body["detail"]
    assert consumed == 0 and rt.calls == 0


def test_a_chunked_body_over_the_limit_is_refused_after_at_most_one_chunk_too_many():
    rt = StubRuntime()
    status, body, consumed = _asgi_post(build_app(rt), [b"[" * 300] * 100, content_length=None)
    assert status == 413 and body["error"] == "too_large"
    assert LIMIT < consumed <= LIMIT + 300
    ok = json.dumps({"inputs": [1, 2, 3, 4]}).encode()
    status, body, _ = _asgi_post(build_app(rt), [ok[:5], ok[5:]], content_length=None)
    assert status == 200 and body["batch"] == 1


def test_a_real_socket_gets_413_for_headers_alone():
    """Only the request line and headers are sent: the 413 comes without waiting for the body."""
    from coinfer.serving.server import Server

    srv = Server(StubRuntime(), port=0).start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 50000000\r\n\r\n"
            )
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.endswith(b"}"):  # the headers, then the JSON body
                chunk = s.recv(65536)
                assert chunk, f"connection closed after {reply!r}"
                reply += chunk
            reply = reply.decode()
        assert reply.startswith("HTTP/1.1 413"), reply
        assert '"error":"too_large"' in reply and "50000000 bytes" in reply
        assert httpx.get(srv.url + "/healthz").status_code == 200  # still up
    finally:
        srv.stop()


def test_deep_json_is_a_400_naming_the_cap_and_the_server_stays_up():
    rt = StubRuntime(max_body_bytes=1_000_000)
    tc = TestClient(build_app(rt), raise_server_exceptions=False)
    deep = b"[" * 100_000 + b"]" * 100_000
    for body in (deep, b'{"inputs": ' + deep + b"}", b'{"inputs": ' + b"[" * 100_000):
        r = tc.post("/v1/predict", content=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"] == "too_deep" and "limit is 32" in r.json()["detail"]
    # brackets inside a string do not count
    r = tc.post("/v1/predict", content=json.dumps({"inputs": [1, 2, 3, 4], "mode": "[" * 5000}).encode())
    assert r.status_code == 422 and r.json()["error"] == "bad_mode"
    assert tc.post("/v1/predict", json={"inputs": [[1, 2, 3, 4]]}).status_code == 200


def test_recursion_in_the_parser_is_a_400_not_a_500(monkeypatch):
    """Without the depth cap the C JSON decoder raises RecursionError; it is still a 400."""
    import coinfer.serving.validation as v

    monkeypatch.setattr(v, "json_depth", lambda body: 0)
    tc = TestClient(build_app(StubRuntime(max_body_bytes=1_000_000)), raise_server_exceptions=False)
    r = tc.post("/v1/predict", content=b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert r.status_code == 400 and r.json()["error"] == "bad_json" and "recursion" in r.json()["detail"]


@pytest.mark.parametrize(
    "body,reason",
    [
        ({"inputs": None, "npy": None}, "bad_field"),
        ({"inputs": None}, "bad_field"),
        ({"inputs": [1, 2, 3, 4], "mode": None}, "bad_field"),
        ({"inputs": [1, True, 3, 4]}, "bad_dtype"),
    ],
)
def test_nulls_and_booleans_get_a_clear_4xx(body, reason):
    r = TestClient(build_app(StubRuntime())).post("/v1/predict", json=body)
    assert 400 <= r.status_code < 500 and r.json()["error"] == reason
    if reason == "bad_field":
        assert "null" in r.json()["detail"]


def test_big_integers_within_the_schema_are_accepted():
    r = TestClient(build_app(StubRuntime())).post(
        "/v1/predict", content=b'{"inputs": [1e30, 10000000000000000000000, 0, -3]}'
    )
    assert r.status_code == 200


def test_the_published_schema_says_exactly_one_of_inputs_or_npy():
    spec = TestClient(build_app(StubRuntime())).get("/openapi.json").json()
    post = spec["paths"]["/v1/predict"]["post"]
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    variants = schema["oneOf"]
    assert [v["required"] for v in variants] == [["inputs"], ["npy"]]
    for v in variants:
        assert v["additionalProperties"] is False
        assert "null" not in json.dumps(v)
    inputs = variants[0]["properties"]["inputs"]["anyOf"]
    assert inputs[0]["maxItems"] == 4 and inputs[1]["minItems"] == inputs[1]["maxItems"] == 4
    err = {"$ref": "#/components/schemas/ErrorResponse"}
    for code in ("400", "408", "413", "422", "502", "503", "504"):
        assert post["responses"][code]["content"]["application/json"]["schema"] == err


def test_the_admin_api_refuses_a_foreign_host_header():
    rt = StubRuntime()
    for url in ("http://evil.example", "http://evil.example:8001", "http://localhost.evil.example:8001"):
        r = TestClient(build_admin_app(rt), base_url=url).get("/admin/state")
        assert r.status_code == 403 and r.json()["error"] == "forbidden_host"
        assert "Host was" in r.json()["detail"] and url.split("//")[1] in r.json()["detail"]
    for url in ("http://localhost:8001", "http://127.0.0.1:8001", "http://[::1]:8001", "http://localhost"):
        assert TestClient(build_admin_app(rt), base_url=url).get("/admin/state").status_code == 200
    r = TestClient(build_admin_app(rt), base_url="http://localhost", client=("10.1.2.3", 5000)).get(
        "/admin/state"
    )
    assert r.status_code == 403 and r.json()["error"] == "forbidden"


@pytest.fixture
def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


def test_a_busy_admin_port_fails_fast_before_ray(busy_port, monkeypatch):
    from coinfer.serving import runtime, server

    started = []
    monkeypatch.setattr(runtime.Runtime, "start", classmethod(lambda cls, cfg: started.append(cfg)))
    t0 = time.perf_counter()
    with pytest.raises(CoinferError, match=f"127.0.0.1:{busy_port} for the admin API.*--admin-port"):
        server.serve_bundle(ServeConfig(Path("unused")), port=0, admin_port=busy_port)
    with pytest.raises(CoinferError, match=f"127.0.0.1:{busy_port} for the public API.*--port"):
        server.serve_bundle(ServeConfig(Path("unused")), port=busy_port, admin_port=0)
    assert time.perf_counter() - t0 < 1.0 and started == []


def test_coinfer_serve_names_the_busy_port_without_starting_ray(busy_port, monkeypatch, capsys, tmp_path):
    from coinfer.cli import main
    from coinfer.serving import runtime

    started = []
    monkeypatch.setattr(runtime.Runtime, "start", classmethod(lambda cls, cfg: started.append(cfg)))
    monkeypatch.setattr(
        sys, "argv", ["coinfer", "serve", str(tmp_path), "--port", "0", "--admin-port", str(busy_port)]
    )
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as ei:
        main()
    assert ei.value.code == 1 and time.perf_counter() - t0 < 1.0 and started == []
    err = capsys.readouterr().err
    assert f"127.0.0.1:{busy_port}" in err and "admin API" in err and "in use" in err


def test_metrics_is_prometheus_text_with_the_expected_families():
    rt = StubRuntime()
    tc = TestClient(build_app(rt))
    tc.post("/v1/predict", content=b"{bad")
    rt.metrics.request("coded", "ok", 0.01)
    r = tc.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert {"coinfer_requests", "coinfer_bad_requests", "coinfer_request_latency_seconds"} <= set(fams)
    bad = {
        s.labels["reason"]: s.value for s in fams["coinfer_bad_requests"].samples if s.name.endswith("_total")
    }
    assert bad == {"bad_json": 1.0}


def test_connections_on_the_pre_bound_sockets_get_tcp_nodelay():
    # uvicorn serves the sockets of bind_sockets through asyncio's create_server(sock=...);
    # asyncio sets TCP_NODELAY on accepted connections only if the listening socket's proto is
    # IPPROTO_TCP. With proto 0 every reply waited ~40 ms (Nagle + delayed ACK): /healthz took
    # 44 ms instead of 1 ms.
    from coinfer.serving.server import bind_sockets

    public, admin = bind_sockets("127.0.0.1", 0, 0)
    admin.close()
    got: dict[str, int] = {}

    class Probe(asyncio.Protocol):
        def connection_made(self, transport):
            sock = transport.get_extra_info("socket")
            got["nodelay"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    async def main():
        srv = await asyncio.get_running_loop().create_server(Probe, sock=public)
        _, writer = await asyncio.open_connection(*public.getsockname())
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.01)
        writer.close()
        srv.close()
        await srv.wait_closed()

    asyncio.run(main())
    assert got == {"nodelay": 1}


def _npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def _npz_bytes() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((1, 4), np.float32))
    return buf.getvalue()


@pytest.mark.parametrize(
    "raw,status,reason,words",
    [
        (_npy_bytes(np.zeros((1, 4), np.float32)) + b"junk", 400, "bad_npy", "4 trailing bytes"),
        (_npz_bytes(), 400, "bad_npy", ".npz (zip) archive"),
        (
            _npy_bytes(np.zeros((1, 4), np.float32)).replace(b"(1, 4)", b"(9999999999999, 4)", 1)[:200],
            413,
            "too_large",
            "batch of 9999999999999 inputs exceeds the limit of 4",
        ),
    ],
)
def test_a_malformed_npy_is_a_named_4xx_over_http(raw, status, reason, words):
    """Not the catch-all ``bad_body`` with an internal exception, nor numpy's "Unable to allocate"."""
    tc = TestClient(build_app(StubRuntime()), raise_server_exceptions=False)
    r = tc.post("/v1/predict", json={"npy": base64.b64encode(raw).decode()})
    assert r.status_code == status and r.json()["error"] == reason, r.text
    assert words in r.json()["detail"]


def test_the_client_keeps_one_connection_names_errors_and_reconnects_after_the_server_closes_it():
    import threading

    from coinfer import Client
    from coinfer.serving.client import ServerError, ServerUnreachable
    from coinfer.serving.server import Server

    srv = Server(StubRuntime(), port=0).start()
    try:
        with Client(srv.url) as c:
            x = np.zeros((2, 4), np.float32)
            reply = c.predict(x)
            assert reply["batch"] == 2 and reply["outputs"][0]["labels"] == ["a", "a"]
            sock = c._http._conn.sock
            assert c.predict(x[0].tolist(), binary=False)["batch"] == 1
            assert c._http._conn.sock is sock  # kept alive
            with pytest.raises(ServerError) as ei:
                c.predict(np.zeros((2, 5), np.float32))
            assert ei.value.status == 422 and "(B, 4)" in ei.value.detail
            assert c.health()["status"] == "ok" and "coinfer_requests_total" in c.metrics()
            c._http._conn.sock.shutdown(socket.SHUT_RDWR)  # as if the server dropped an idle connection
            assert c.predict(x)["batch"] == 2  # reconnected once, transparently
            answers = []
            threads = [
                threading.Thread(target=lambda: answers.append(c.predict(x)["batch"])) for _ in range(4)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert answers == [2, 2, 2, 2]  # one connection, shared safely
    finally:
        srv.stop()
    with pytest.raises(ServerUnreachable, match="no answer from http://127.0.0.1"), Client(srv.url, 2.0) as c:
        c.predict(np.zeros((1, 4), np.float32))

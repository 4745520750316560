"""Two micro-benchmarks behind choices of the request path, between two processes.

* ``sockets``: round trip of a 3200-byte request and a 64-byte answer (an MNIST
  input and a 10-class answer) over asyncio streams, loopback TCP (TCP_NODELAY)
  against a Unix socket, the echo server in a child process.
* ``client``: CPU per request of an HTTP client posting a 4.2 kB JSON body to a raw
  ASGI app under uvicorn in a child process (an ``npy`` body of one MNIST input):
  httpx's ``Client`` against one keep-alive ``http.client`` connection (what
  ``coinfer.Client`` uses).

    python benchmarks/transport.py --out benchmarks/results/transport.json
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAYLOAD, ANSWER = 3200, 64

_ECHO = rf"""
import asyncio, sys
PAYLOAD, ANSWER = {PAYLOAD}, {ANSWER}
async def echo(reader, writer):
    while True:
        try:
            d = await reader.readexactly(PAYLOAD)
        except Exception:
            return
        writer.write(d[:ANSWER])
async def main():
    if sys.argv[1] == "tcp":
        srv = await asyncio.start_server(echo, "127.0.0.1", 0)
        print(srv.sockets[0].getsockname()[1], flush=True)
    else:
        srv = await asyncio.start_unix_server(echo, sys.argv[2])
        print(0, flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""

_ASGI = r"""
import sys, uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"ok":1}'})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False, lifespan="off")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _round_trips(kind: str, where: str | int, n: int) -> dict[str, float]:
    if kind == "tcp":
        r, w = await asyncio.open_connection("127.0.0.1", where)
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        r, w = await asyncio.open_unix_connection(where)
    data = b"x" * PAYLOAD
    for _ in range(200):
        w.write(data)
        await r.readexactly(ANSWER)
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        w.write(data)
        await r.readexactly(ANSWER)
    out = {
        "rtt_us": (time.perf_counter() - t0) / n * 1e6,
        "client_cpu_us": (time.process_time() - c0) / n * 1e6,
    }
    w.close()
    return out


def sockets(n: int) -> dict[str, dict[str, float]]:
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("tcp", "unix"):
            path = str(Path(tmp) / "echo.sock")
            p = subprocess.Popen([sys.executable, "-c", _ECHO, kind, path], stdout=subprocess.PIPE, text=True)
            try:
                port = int(p.stdout.readline())
                res[kind] = asyncio.run(_round_trips(kind, port if kind == "tcp" else path, n))
            finally:
                p.kill()
                p.wait()
    return res


def client(n: int) -> dict[str, dict[str, float]]:
    import httpx

    port = _free_port()
    p = subprocess.Popen([sys.executable, "-c", _ASGI, str(port)])
    body = json.dumps({"npy": "A" * 4200}).encode()
    headers = {"content-type": "application/json"}
    res = {}
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        hx = httpx.Client(base_url=f"http://127.0.0.1:{port}")
        conn = http.client.HTTPConnection("127.0.0.1", port)

        def via_httpx() -> None:
            hx.post("/v1/predict", content=body, headers=headers).json()

        def via_http_client() -> None:
            conn.request("POST", "/v1/predict", body=body, headers=headers)
            json.loads(conn.getresponse().read())

        for name, f in (("httpx.Client", via_httpx), ("http.client keep-alive", via_http_client)):
            for _ in range(100):
                f()
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(n):
                f()
            res[name] = {
                "wall_us": (time.perf_counter() - t0) / n * 1e6,
                "client_cpu_us": (time.process_time() - c0) / n * 1e6,
            }
        hx.close()
        conn.close()
    finally:
        p.kill()
        p.wait()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="round trips / requests per case")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/transport.json"))
    args = ap.parse_args()
    out = {
        "command": " ".join(["python", *sys.argv]),
        "cpus": os.cpu_count(),
        "load_avg_start": os.getloadavg()[0],
        "sockets": sockets(args.n),
        "client": client(args.n),
    }
    out["load_avg_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(
        "| asyncio streams, 3200 B out / 64 B back | round trip (µs) | client CPU (µs) |\n| --- | ---: | ---: |"
    )
    for k, v in out["sockets"].items():
        print(f"| {k} | {v['rtt_us']:.0f} | {v['client_cpu_us']:.0f} |")
    print("\n| HTTP client, 4.2 kB JSON POST | wall (µs) | client CPU (µs) |\n| --- | ---: | ---: |")
    for k, v in out["client"].items():
        print(f"| {k} | {v['wall_us']:.0f} | {v['client_cpu_us']:.0f} |")
    print(f"load {out['load_avg_start']:.1f}-{out['load_avg_end']:.1f}; wrote {args.out}")


if __name__ == "__main__":
    main()

"""Memory of the HTTP frontend when a client sends a body far over the limit.

Starts the frontend apps on a stub runtime (no Ray, no workers: ``StubRuntime`` of
tests/test_serving_http.py) in a child process with ``--max-body-bytes`` 8 MiB,
sends one ``--mb`` MB predict body with ``Content-Length`` and one chunked, and
prints the answer and the child's resident memory (now / peak, from
``/proc/PID/status``). Linux only.

    PYTHONPATH=src python benchmarks/http_body_memory.py            # this checkout
    PYTHONPATH=OTHER/src python benchmarks/http_body_memory.py      # another one
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

TESTS = Path(__file__).resolve().parents[1] / "tests"

CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from test_serving_http import StubRuntime
from coinfer.serving.server import Server
srv = Server(StubRuntime(max_body_bytes=8 * 1024 * 1024), port=0, admin_port=0).start()
print(srv.port, flush=True)
time.sleep(600)
"""


def _memory_mb(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=50.0, help="Body size in MB.")
    args = ap.parse_args()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(tests=str(TESTS))],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ,
    )
    try:
        port = int(child.stdout.readline())
        url = f"http://127.0.0.1:{port}/v1/predict"
        print(f"start: RSS {_memory_mb(child.pid)[0]} MB")
        body = b'{"inputs": [' + b"0.5," * int(args.mb * 1e6 / 4) + b"0.5]}"
        chunked = (body[i : i + 65536] for i in range(0, len(body), 65536))
        for name, content in [("Content-Length", body), ("chunked", chunked)]:
            t0 = time.perf_counter()
            try:
                r = httpx.post(url, content=content, timeout=120)
                answer = f"{r.status_code} {r.json().get('error')}"
            except httpx.HTTPError as exc:
                answer = type(exc).__name__
            rss, peak = _memory_mb(child.pid)
            print(
                f"{name}: {len(body) / 1e6:.0f} MB -> {answer} in {time.perf_counter() - t0:.2f}s; RSS {rss} MB, peak {peak} MB"
            )
    finally:
        child.kill()


if __name__ == "__main__":
    main()

"""Frontend overhead of ``coded`` against a direct call of one model, and decode time.

On one local Ray instance, one request at a time (closed loop, batch 1):

* ``direct``: one data-plane call to data worker 0 (a frame over its socket and the answer);
* ``coded``: ``await runtime.predict(x, "coded")`` — the fan-out to all n
  workers, the first-decodable-set collector and the decode;
* ``http``: ``POST /v1/predict`` of the same input (base64 .npy, with the
  probabilities, as ``coinfer.Client`` sends it) to the frontend running in a
  background thread of this process, through one keep-alive httpx connection —
  what a user sees, less the network;
* ``http healthz``: ``GET /healthz`` on the same connection (the HTTP transport
  and routing alone, no worker);
* ``collector only``: :func:`collect` with workers that answer at once (the
  pure-Python cost of the collection logic);
* ``decode``: ``Code.decode`` of a (1, C = 10) batch with one data output missing,
  with the projection onto the simplex;
* ``frontend parts``: parsing a batch-1 ``npy`` body of the bundle's input shape
  (``parse_predict_request``), and building the batch-1 reply with the
  probabilities: as the frontend does it (plain values, one ``json.dumps``) and
  as FastAPI's ``response_model`` path did it before (pydantic validation of
  ``PredictResponse``, a JSON-mode dump, then ``json.dumps``).

The overhead is median(coded) − median(direct), and over HTTP median(http) −
median(direct). Writes JSON and prints a table.

    python benchmarks/serving_overhead.py runs/mnist-k2r1 --out runs/serving-overhead.json
    python benchmarks/serving_overhead.py --no-serve --out runs/decode.json   # decode + collector only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import coinfer.code as code_mod
from coinfer import Code
from coinfer.serving.collector import Plan, collect


def _q(v: list[float]) -> dict[str, float]:
    a = np.array(v) * 1e3
    return {
        "median_ms": float(np.median(a)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "n": len(a),
    }


def decode_times(k: int, r: int, iters: int, small: int | None = None) -> dict[str, float]:
    """Time ``Code.decode``; ``small`` overrides ``coinfer.code.SMALL_DECODE``
    (``-1`` forces the torch path that larger batches take)."""
    code = Code(k, r)
    data = torch.softmax(torch.randn(k, 1, 10), -1)
    outs = code.encode_outputs(data)
    avail = {i: outs[i] for i in range(1, code.n)}  # data output 0 missing
    saved = code_mod.SMALL_DECODE
    if small is not None:
        code_mod.SMALL_DECODE = small
    try:
        for _ in range(200):
            code.decode(avail, project=True)
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            code.decode(avail, project=True)
            ts.append(time.perf_counter() - t0)
    finally:
        code_mod.SMALL_DECODE = saved
    return {
        "k": k,
        "r": r,
        "path": "torch" if small == -1 else "default",
        "median_us": statistics.median(ts) * 1e6,
        "p90_us": float(np.percentile(ts, 90) * 1e6),
    }


async def collector_times(k: int, r: int, iters: int) -> dict[str, float]:
    code = Code(k, r)
    outs = code.encode_outputs(torch.softmax(torch.randn(k, 1, 10), -1)).numpy()

    async def call(w: int) -> np.ndarray:
        return outs[w]

    row_of = {i: i for i in range(code.n)}
    plan = Plan(tuple(range(code.n)))
    ts = []
    for i in range(iters + 100):
        t0 = time.perf_counter()
        await collect(code, row_of, call, plan, 5.0)
        if i >= 100:
            ts.append(time.perf_counter() - t0)
    return {
        "k": k,
        "r": r,
        "median_us": statistics.median(ts) * 1e6,
        "p90_us": float(np.percentile(ts, 90) * 1e6),
    }


def frontend_parts(input_shape: tuple[int, ...], k: int, iters: int) -> dict[str, float]:
    """Median µs of the frontend's own per-request work, outside Ray and HTTP."""
    from fastapi.responses import JSONResponse

    try:
        from coinfer.serving.app import PredictResponse, _json, predict_reply
    except ImportError:  # a version of coinfer before predict_reply
        return {}
    from coinfer.serving.client import encode_npy
    from coinfer.serving.collector import Collection
    from coinfer.serving.validation import parse_predict_request

    body = json.dumps({"npy": encode_npy(np.zeros((1, *input_shape), dtype=np.float32))}).encode()
    outputs = torch.softmax(torch.randn(k, 1, 10), -1)
    res = Collection(outputs, [True] + [False] * (k - 1), {1: 1, k: k}, {}, {}, [0], [])
    names = [str(i) for i in range(10)]

    def reply_new() -> None:
        _json({**predict_reply(res, "coded", 1, names), "latency_ms": 1.0})

    def reply_fastapi() -> None:
        content = {**predict_reply(res, "coded", 1, names), "latency_ms": 1.0}
        JSONResponse(PredictResponse.model_validate(content).model_dump(mode="json"))

    def parse() -> None:
        parse_predict_request(body, input_shape, 1024, 8 * 1024 * 1024)

    out = {}
    for name, f in [("parse", parse), ("reply", reply_new), ("reply via response_model", reply_fastapi)]:
        for _ in range(100):
            f()
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        out[name] = statistics.median(ts) * 1e6
    return out


async def served(rt, x: np.ndarray, iters: int, url: str | None) -> dict[str, dict]:
    import httpx

    from coinfer.serving.client import encode_npy

    body = json.dumps({"npy": encode_npy(x)}).encode()
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url or "http://unused", timeout=30.0) as http:

        async def post() -> None:
            resp = await http.post("/v1/predict", content=body, headers=headers)
            resp.raise_for_status()

        async def healthz() -> None:
            (await http.get("/healthz")).raise_for_status()

        paths = {"direct": lambda: rt._call(0, x, inject=False), "coded": lambda: rt.predict(x, "coded")}
        if url:
            paths.update({"http": post, "http healthz": healthz})
        for _ in range(30):  # warm-up
            for f in paths.values():
                await f()
        res: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(iters):  # interleaved, so drifting machine load hits all alike
            for name, f in paths.items():
                t0 = time.perf_counter()
                await f()
                res[name].append(time.perf_counter() - t0)
    return {k: _q(v) for k, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, nargs="?", help="bundle to serve (not needed with --no-serve)")
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument(
        "--trust-code", action="store_true", help="allow a package.module:factory architecture (code)"
    )
    ap.add_argument("--out", type=Path, default=Path("runs/serving-overhead.json"))
    ap.add_argument(
        "--no-serve", action="store_true", help="only the decode and collector timings (no Ray, no bundle)"
    )
    ap.add_argument("--no-http", action="store_true", help="skip the HTTP paths")
    args = ap.parse_args()
    if args.bundle is None and not args.no_serve:
        ap.error("give a bundle, or --no-serve for the decode and collector timings only")

    out: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_start": os.getloadavg(),
        },
        "command": "python benchmarks/serving_overhead.py "
        + (f"{args.bundle} --iters {args.iters}" if not args.no_serve else "--no-serve")
        + (" --no-http" if args.no_http else ""),
        "decode": [decode_times(k, r, 5000, small) for k, r in [(2, 1), (4, 2)] for small in (None, -1)],
        "collector": [asyncio.run(collector_times(k, r, 2000)) for k, r in [(2, 1), (4, 2)]],
    }
    out["frontend_parts_us"] = frontend_parts((1, 28, 28), 2, 2000)
    if args.no_serve:
        _print_parts(out)
        _write(args.out, out)
        return
    from coinfer.serving.runtime import Runtime, ServeConfig
    from coinfer.serving.server import Server

    rt = Runtime.start(ServeConfig(args.bundle, baselines=False, trust_code=args.trust_code))
    server = None
    try:
        if not args.no_http:
            server = Server(rt, port=0, admin_port=0).start()
        x = np.zeros((1, *rt.input_shape), dtype=np.float32)
        out["served"] = asyncio.run(served(rt, x, args.iters, server.url if server else None))
        out["k"], out["r"] = rt.code.k, rt.code.r
    finally:
        if server is not None:
            server.stop()
        rt.shutdown()
    s = out["served"]
    out["overhead_median_ms"] = s["coded"]["median_ms"] - s["direct"]["median_ms"]
    if "http" in s:
        out["http_overhead_median_ms"] = s["http"]["median_ms"] - s["direct"]["median_ms"]
    _write(args.out, out)
    print(f"bundle {args.bundle} (k={out['k']}, r={out['r']}), {args.iters} sequential requests of batch 1")
    print("| path | median (ms) | p90 (ms) | p99 (ms) |")
    print("| --- | ---: | ---: | ---: |")
    for name, q in s.items():
        print(f"| {name} | {q['median_ms']:.2f} | {q['p90_ms']:.2f} | {q['p99_ms']:.2f} |")
    print(f"\nfrontend overhead of coded (median coded − median direct): {out['overhead_median_ms']:.2f} ms")
    if "http" in s:
        print(f"over HTTP (median http − median direct): {out['http_overhead_median_ms']:.2f} ms")
    _print_parts(out)


def _write(path: Path, out: dict) -> None:
    out["machine"]["loadavg_end"] = os.getloadavg()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))


def _print_parts(out: dict) -> None:
    for name, us in out["frontend_parts_us"].items():
        print(f"frontend {name} (batch 1, 1x28x28): median {us:.0f} µs")
    for d in out["collector"]:
        print(
            f"collector alone, k={d['k']} r={d['r']}: median {d['median_us']:.0f} µs (p90 {d['p90_us']:.0f})"
        )
    for d in out["decode"]:
        print(
            f"decode one missing output, k={d['k']} r={d['r']}, C=10, {d['path']} path: "
            f"median {d['median_us']:.1f} µs (p90 {d['p90_us']:.1f})"
        )


if __name__ == "__main__":
    main()

"""Load shedding: a burst of concurrent requests against a local server.

Starts a runtime and its HTTP frontend on a bundle (one local Ray instance, the
``coinfer serve`` defaults unless given), then a client in a separate process
sends ``--requests`` requests at once (:func:`coinfer.serving.loadgen.burst`:
one connection each, one input each, ``return_probabilities: false``) and records each reply's status, error and
latency; afterwards it checks ``/healthz`` and one normal request. Writes JSON
and prints a table.

    python benchmarks/serving_overload.py runs/mnist-k2r1 --requests 1000 --out runs/serving-overload.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np


def _client(url: str, n: int, body: bytes, timeout_s: float, queue: mp.Queue) -> None:
    from coinfer.serving.loadgen import burst

    t0 = time.perf_counter()
    replies = burst(url, body, n, timeout_s)
    queue.put(
        {"results": [(r.status, r.error, r.seconds) for r in replies], "wall_s": time.perf_counter() - t0}
    )


def _q(v: list[float]) -> dict[str, float] | None:
    if not v:
        return None
    a = np.array(v) * 1e3
    return {
        "n": len(a),
        "median_ms": float(np.median(a)),
        "p90_ms": float(np.percentile(a, 90)),
        "max_ms": float(a.max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--max-inflight", type=int, default=None, help="default: the server's default")
    ap.add_argument("--timeout", type=float, default=5.0, help="the server's request timeout, seconds")
    ap.add_argument("--out", type=Path, default=Path("runs/serving-overload.json"))
    args = ap.parse_args()

    from coinfer.serving.client import Client, encode_npy
    from coinfer.serving.runtime import ServeConfig
    from coinfer.serving.server import serve_bundle

    extra = {} if args.max_inflight is None else {"max_inflight": args.max_inflight}
    cfg = ServeConfig(args.bundle, timeout_s=args.timeout, **extra)
    load0 = os.getloadavg()
    server = serve_bundle(cfg)
    try:
        x = np.zeros((1, *server.runtime.input_shape), dtype=np.float32)
        body = json.dumps({"npy": encode_npy(x), "return_probabilities": False}).encode()
        with Client(server.url) as c:
            for _ in range(5):  # warm-up
                c.predict(x)
        queue: mp.Queue = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(
            target=_client, args=(server.url, args.requests, body, args.timeout * 6, queue)
        )
        proc.start()
        burst = queue.get()
        proc.join()
        with Client(server.url) as c:
            health = c.health()
            try:
                after = "answered" if c.predict(x)["batch"] == 1 else "wrong reply"
            except Exception as exc:
                after = f"failed: {exc}"
    finally:
        server.close()
    res = burst["results"]
    counts = Counter(f"{s} {e}".strip() for s, e, _ in res)
    out = {
        "command": f"python benchmarks/serving_overload.py {args.bundle} --requests {args.requests}"
        + (f" --max-inflight {args.max_inflight}" if args.max_inflight is not None else "")
        + f" --timeout {args.timeout:g}",
        "machine": {"cpus": os.cpu_count(), "loadavg_start": load0, "loadavg_end": os.getloadavg()},
        "inflight_limit": getattr(cfg, "inflight_limit", None),
        "counts": dict(counts),
        "wall_s": burst["wall_s"],
        "latency": {key: _q([t for s, e, t in res if f"{s} {e}".strip() == key]) for key in sorted(counts)},
        "healthz_after": health.get("status"),
        "request_after": after,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(
        f"{args.requests} concurrent requests, limit {out['inflight_limit']}, all done in {burst['wall_s']:.2f} s"
    )
    print("| reply | count | median (ms) | p90 (ms) | max (ms) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for key, q in out["latency"].items():
        print(f"| {key} | {q['n']} | {q['median_ms']:.0f} | {q['p90_ms']:.0f} | {q['max_ms']:.0f} |")
    print(f"afterwards: /healthz {out['healthz_after']}, a normal request {after}")


if __name__ == "__main__":
    main()

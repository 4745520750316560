"""The serving half of ``coinfer demo``: serve the digits bundle on local Ray,
drive a short load through the HTTP API without and then with injected
stragglers, compare coded against uncoded, kill a worker, and shut down."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["serve_demo"]


def _task_accuracy(res, splits: list[list[int]]) -> list[float]:
    """Served top-1 accuracy of each data model on its own classes."""
    ok = ~np.isnan(res.latency_s)
    accs = []
    for j, classes in enumerate(splits):
        m = ok & np.isin(res.labels, classes)
        accs.append(float(res.correct[m, j].mean()) if m.any() else float("nan"))
    return accs


def serve_demo(
    bundle: str | Path,
    x_test: np.ndarray,
    y_test: np.ndarray,
    splits: list[list[int]],
    rate: float = 25.0,
    requests: int = 250,
    straggler: dict[str, Any] | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Serve ``bundle``; run a coded load without injection (with the default ``auto``
    decode slack almost nothing is reconstructed), coded and uncoded loads under
    stragglers, then a burst with a killed worker.

    Returns ``{"runs": {name: summary}, "seconds": ...}``; summaries hold the
    latency percentiles, the reconstructed fraction and the served task accuracy."""
    from coinfer.serving.client import AdminClient
    from coinfer.serving.loadgen import run_load, summarize
    from coinfer.serving.runtime import ServeConfig
    from coinfer.serving.server import serve_bundle

    t0 = time.perf_counter()
    straggler = straggler or {"kind": "heavy", "ms": 40.0, "p": 0.1}
    log("starting a local Ray instance and one worker process per model ...")
    srv = serve_bundle(ServeConfig(Path(bundle), timeout_s=5.0, worker_cpus=0.25, seed=seed))
    runs: dict[str, Any] = {}
    try:
        admin = AdminClient(srv.admin_url)
        log(f"serving on {srv.url} (admin {srv.admin_url}); warming up")
        run_load(srv.url, x_test, y_test, rate=rate, requests=40, duration_s=5, mode="coded", seed=seed)
        log(f"no injection: {requests} requests at {rate:g}/s in coded mode")
        res = run_load(
            srv.url, x_test, y_test, rate=rate, requests=requests, duration_s=60, mode="coded", seed=seed
        )
        s = summarize(res)
        s["task_accuracy"] = _task_accuracy(res, splits)
        runs["calm/coded"] = s
        admin.inject(None, **straggler)
        log(f"injected stragglers on every worker: {straggler}; {requests} requests at {rate:g}/s per mode")
        for mode in ("coded", "uncoded"):
            res = run_load(
                srv.url, x_test, y_test, rate=rate, requests=requests, duration_s=60, mode=mode, seed=seed
            )
            s = summarize(res)
            s["task_accuracy"] = _task_accuracy(res, splits)
            runs[f"straggle/{mode}"] = s
        admin.clear()
        admin.kill(0)
        log("killed worker 0's process; a burst of requests in coded mode:")
        res = run_load(
            srv.url, x_test, y_test, rate=rate, requests=50, duration_s=10, mode="coded", seed=seed + 1
        )
        s = summarize(res)
        s["task_accuracy"] = _task_accuracy(res, splits)
        runs["killed/coded"] = s
        admin.close()
    finally:
        srv.close()
        log("server stopped, Ray shut down")
    return {"runs": runs, "seconds": time.perf_counter() - t0}

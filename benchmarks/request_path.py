"""What the server adds to a request, against the in-process floor, in one run.

The floor: the bundle's n models called one after another on one thread in this
process (batch 1), i.e. what one request costs with no server at all. Against it,
``coinfer serve BUNDLE`` (a separate process, local Ray, default settings) is
driven over HTTP through ``coinfer.Client``:

* one request at a time, coded mode: median and p99 latency, and the server
  process's CPU time per request (``/proc/PID/stat`` utime + stime over the
  round, divided by the requests: the frontend and the Ray driver threads in it;
  the worker processes are not counted);
* ``--concurrency`` closed-loop clients (threads of this process, one
  ``coinfer.Client`` each) for ``--seconds``: requests per second, against the
  floor's rate (1 / floor time).

Rounds interleave the floor and the server so both see the same machine load.
``--old-src DIR`` also measures another checkout's server (e.g. the Serve-based
plane, ``git worktree add ../wt-old 5a84dbc``), started with ``PYTHONPATH=DIR/src``,
after the current one, with its own interleaved floor. Startup (process start to
``/healthz`` 200) and shutdown (SIGINT to exit) are timed too.

    python benchmarks/request_path.py runs/mnist-k2r1 --rounds 3 --out benchmarks/results/request_path.json
    python benchmarks/request_path.py runs/demo --rounds 0 --warmup 0 --out runs/startup.json   # startup only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_latency import start_server  # noqa: E402

from coinfer import Bundle, Client  # noqa: E402


def _cpu_s(pid: int) -> float:
    """utime + stime of process ``pid`` in seconds (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def floor_ms(models: list[torch.nn.Module], x: torch.Tensor, iters: int) -> np.ndarray:
    """Per-request time of the n models called one after another (softmax included), ms."""
    out = np.empty(iters)
    with torch.inference_mode():
        for i in range(iters):
            t0 = time.perf_counter()
            for m in models:
                torch.softmax(m(x), -1).cpu()  # the answer on the host, as a server returns it
            out[i] = (time.perf_counter() - t0) * 1000
    return out


def worker_pids() -> list[int]:
    """Processes of coinfer workers on this machine (Ray names them after the actor class)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if b"ModelWorker" in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def sequential(url: str, x: np.ndarray, iters: int, pid: int) -> tuple[np.ndarray, dict[str, float]]:
    """Latencies (ms) of ``iters`` requests one at a time, and CPU ms per request of the
    server process, of this (client) process and of the worker processes together."""
    lat = np.empty(iters)
    workers = worker_pids()
    with Client(url) as c:
        c.predict(x)
        cpu0, me0, w0 = _cpu_s(pid), time.process_time(), sum(_cpu_s(p) for p in workers)
        for i in range(iters):
            t0 = time.perf_counter()
            c.predict(x)
            lat[i] = (time.perf_counter() - t0) * 1000
        cpu = {
            "server": (_cpu_s(pid) - cpu0) * 1000 / iters,
            "client": (time.process_time() - me0) * 1000 / iters,
            # None: no ModelWorker processes found (e.g. another checkout's Serve replicas)
            "workers": (sum(_cpu_s(p) for p in workers) - w0) * 1000 / iters if workers else None,
        }
    return lat, cpu


def concurrent(url: str, x: np.ndarray, concurrency: int, seconds: float) -> dict[str, float]:
    """``concurrency`` closed-loop clients (threads, one ``coinfer.Client`` each) for ``seconds``."""
    import threading

    from coinfer.serving.client import ServerError

    counts = [[0, 0] for _ in range(concurrency)]
    stop = time.perf_counter() + seconds

    def one(i: int) -> None:
        with Client(url) as c:
            while time.perf_counter() < stop:
                try:
                    c.predict(x)
                    counts[i][0] += 1
                except ServerError:
                    counts[i][1] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "rps": sum(c[0] for c in counts) / (time.perf_counter() - t0),
        "errors": sum(c[1] for c in counts),
    }


def measure(label: str, bundle: Path, args, env: dict | None, models, x) -> dict:
    log = args.out.with_suffix(f".{label}.log")
    t0 = time.perf_counter()
    proc, url, _ = start_server(bundle, args.serve_args.split(), log, env=env)
    startup = time.perf_counter() - t0
    rounds = []
    try:
        with Client(url) as c:  # warm up
            for _ in range(args.warmup):
                c.predict(x.cpu().numpy())
        for r in range(args.rounds):
            fl = floor_ms(models, x, args.iters)
            lat, cpu = sequential(url, x.cpu().numpy(), args.iters, proc.pid)
            fl2 = floor_ms(models, x, args.iters)
            conc = concurrent(url, x.cpu().numpy(), args.concurrency, args.seconds)
            floor_med = float(np.median(np.concatenate([fl, fl2])))
            row = {
                "round": r,
                "floor_ms": floor_med,
                "floor_rps": 1000.0 / floor_med,
                "http_p50_ms": float(np.median(lat)),
                "http_p99_ms": float(np.quantile(lat, 0.99)),
                "ratio_to_floor": float(np.median(lat)) / floor_med,
                "server_cpu_ms_per_request": cpu["server"],
                "client_cpu_ms_per_request": cpu["client"],
                "workers_cpu_ms_per_request": cpu["workers"],
                f"rps_{args.concurrency}_clients": conc["rps"],
                "rps_ratio_to_floor": conc["rps"] / (1000.0 / floor_med),
                "errors": conc["errors"],
                "load_avg": os.getloadavg()[0],
            }
            rounds.append(row)
            print(
                f"{label:>8} round {r}: floor {floor_med:.2f} ms | http p50 {row['http_p50_ms']:.2f} ms "
                f"({row['ratio_to_floor']:.2f}x) p99 {row['http_p99_ms']:.2f} | CPU ms/req server {cpu['server']:.2f} client {cpu['client']:.2f} workers {cpu['workers'] if cpu['workers'] is None else round(cpu['workers'], 2)} | "
                f"{args.concurrency} clients {conc['rps']:.0f} req/s ({row['rps_ratio_to_floor']:.2f} of floor) | "
                f"load {row['load_avg']:.1f}",
                flush=True,
            )
    finally:
        t1 = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(60)
        except Exception:
            proc.kill()
            code = None
        shutdown = time.perf_counter() - t1
    text = log.read_text()
    return {
        "label": label,
        "startup_s": startup,
        "shutdown_s": shutdown,
        "exit_code": code,
        "error_lines_in_log": sum("ERROR" in ln for ln in text.splitlines()),
        "rounds": rounds,
        "median": {  # empty with --rounds 0 (startup and shutdown only)
            key: None if rounds[0][key] is None else float(np.median([r[key] for r in rounds]))
            for key in (rounds[0] if rounds else {})
            if key != "round"
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=300, help="requests per sequential round")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each concurrent round")
    ap.add_argument("--serve-args", default="", help="extra arguments of coinfer serve")
    ap.add_argument("--old-src", type=Path, default=None, help="another checkout whose server to measure too")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/request_path.json"))
    ap.add_argument("--device", default="cpu", help="device of the in-process floor's models")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    b = Bundle.load(args.bundle)
    dev = torch.device(args.device)
    models = [m.eval().to(dev) for m in list(b.data_models) + list(b.coded_models)]
    x = torch.zeros((1, *b.input_shape), device=dev)
    runs = [measure("current", args.bundle, args, None, models, x)]
    if args.old_src is not None:
        env = {**os.environ, "PYTHONPATH": str(args.old_src.resolve() / "src")}
        runs.append(measure("old", args.bundle, args, env, models, x))
    result = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}",
        "bundle": str(args.bundle),
        "n_models": len(models),
        "runs": runs,
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(
        f"\n| path | startup s | floor ms | HTTP p50 ms | ratio | server CPU ms/req | {args.concurrency} clients req/s | of floor rate |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        m = run["median"]
        if not m:
            print(
                f"| {run['label']} | {run['startup_s']:.1f} | (no rounds: shutdown {run['shutdown_s']:.1f} s, exit {run['exit_code']}) |"
            )
            continue
        print(
            f"| {run['label']} | {run['startup_s']:.1f} | {m['floor_ms']:.2f} | {m['http_p50_ms']:.2f} | "
            f"{m['ratio_to_floor']:.2f}x | {m['server_cpu_ms_per_request']:.2f} | "
            f"{m[f'rps_{args.concurrency}_clients']:.0f} | {m['rps_ratio_to_floor']:.2f} |"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

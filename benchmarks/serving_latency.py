"""Tail latency of every serving mode under every injection scenario, on one runtime.

Starts ``coinfer serve BUNDLE`` as a separate process (local Ray), then for each
scenario sets the injection through the admin API and drives an open-loop
Poisson load in each mode from this process; ``coded`` runs once per
``--decode-slack`` value (set through the admin API between runs). Beside the
latency percentiles it reports the reconstructed fraction, the served accuracy
(on each model's own classes with ``--tasks classes``) and how often served
outputs agree with what the data model itself says (computed here from the
bundle). Writes one JSON with every run's summary and latencies, a markdown
table and one CDF plot per scenario.

    python benchmarks/serving_latency.py runs/mnist-k2r1 --data runs/mnist-k2r1.test.npz \\
        --rate 15 --requests 600 --decode-slack 0,auto,10 --out runs/serving-k2r1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np

from coinfer.errors import CoinferError
from coinfer.experiments.data import class_split
from coinfer.serving.client import AdminClient
from coinfer.serving.loadgen import LoadResult, plot_cdf, reference_top1, run_load, summarize

MODES = ["coded", "uncoded", "replicated", "hedged"]


def scenarios(straggler: str, slow_ms: float) -> dict[str, dict]:
    kind, ms, p = straggler.split(":")
    return {
        "none": {},
        "stragglers": {"inject": {"workers": None, "kind": kind, "ms": float(ms), "p": float(p)}},
        "slow-worker": {"inject": {"workers": [0], "kind": "constant", "ms": slow_ms}},
        "killed-worker": {"kill": 0},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    bundle: Path, extra: list[str], log: Path, env: dict | None = None
) -> tuple[subprocess.Popen, str, str]:
    """``coinfer serve BUNDLE`` on free ports (``env``: the process's environment); returns once
    ``/healthz`` answers 200: (process, public URL, admin URL)."""
    port, admin_port = _free_port(), _free_port()
    exe = Path(sys.executable).parent / "coinfer"  # this interpreter's entry point, else the module
    cmd = [
        *([str(exe)] if exe.exists() else [sys.executable, "-m", "coinfer.cli"]),
        "serve",
        str(bundle),
        f"--port={port}",
        f"--admin-port={admin_port}",
        *extra,
    ]
    proc = subprocess.Popen(
        cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        if proc.poll() is not None:
            text = log.read_text()
            taken = "address already in use: " if "Errno 98" in text else ""
            raise RuntimeError(f"server exited: {taken}{text[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("server did not start within 180 s")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return proc, url, f"http://127.0.0.1:{admin_port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--data", type=Path, required=True, help=".npz with x and y")
    ap.add_argument("--rate", type=float, default=30.0)
    ap.add_argument("--requests", type=int, default=750)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--straggler", default="heavy:40:0.05", help="kind:ms:p for every worker")
    ap.add_argument("--slow-ms", type=float, default=50.0, help="extra delay of the one slow worker")
    ap.add_argument("--hedge-ms", type=float, default=20.0)
    ap.add_argument("--scenarios", default=",".join(scenarios("heavy:1:1", 1)))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--serve-args", default="", help="extra arguments of coinfer serve")
    ap.add_argument(
        "--decode-slack",
        default="0,auto",
        help="comma-separated decode slacks (ms or auto) of the coded runs",
    )
    ap.add_argument(
        "--tasks",
        choices=["all", "classes"],
        default="all",
        help="classes: model j's task is its class_split block (class-split bundles); all: every class",
    )
    ap.add_argument(
        "--auto-warmup", type=int, default=40, help="requests before each auto run (not measured)"
    )
    ap.add_argument("--rounds", type=int, default=1, help="interleave the settings in this many rounds")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with np.load(args.data) as z:
        x, y = z["x"].astype(np.float32), z["y"]
    slacks = [v.strip() for v in args.decode_slack.split(",") if v.strip()]
    serve_args = [f"--hedge-ms={args.hedge_ms}", *args.serve_args.split()]
    for attempt in range(3):  # a free port can be taken by Ray's processes before uvicorn binds it
        try:
            proc, url, admin_url = start_server(args.bundle, serve_args, args.out / "server.log")
            break
        except RuntimeError as exc:
            if attempt == 2 or "address already in use" not in str(exc):
                raise
            print("port taken while the server started; retrying", flush=True)
    admin = AdminClient(admin_url)
    info = httpx.get(url + "/v1/models").json()
    try:
        reference = reference_top1(args.bundle, x, info["k"], served=info)
    except CoinferError as exc:  # e.g. a bundle that needs --trust-code: no agreement columns
        print(f"agreement not computed: {exc}", flush=True)
        reference = None
    tasks = class_split(10, info["k"]) if args.tasks == "classes" else [list(range(10))] * info["k"]
    results: dict = {
        "bundle": str(args.bundle),
        "k": info["k"],
        "r": info["r"],
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_start": os.getloadavg(),
        },
        "settings": vars(args) | {"out": str(args.out), "bundle": str(args.bundle), "data": str(args.data)},
        "runs": {},
    }
    results["settings"] = {k: str(v) for k, v in results["settings"].items()}
    try:
        # warm-up outside the measurement
        run_load(url, x, y, rate=args.rate, requests=60, duration_s=5, mode="coded", k=info["k"])
        scen = scenarios(args.straggler, args.slow_ms)
        for name in args.scenarios.split(","):
            sc = scen[name]
            curves = {}
            runs = [
                (mode, slack)
                for mode in args.modes.split(",")
                for slack in (slacks if mode == "coded" else [None])
            ]
            parts: dict[str, list] = {}
            loads: dict[str, list[float]] = {}
            for rnd in range(args.rounds):
                # interleaved rounds, the order rotated each round: a drift of the machine's
                # background load hits every setting alike
                for mode, slack in runs[rnd % len(runs) :] + runs[: rnd % len(runs)]:
                    label = mode if slack is None else f"{mode}@{slack}"
                    admin.clear()
                    if slack is not None:
                        admin.config(decode_slack=slack)
                    if "inject" in sc:
                        admin.inject(**sc["inject"])
                    if "kill" in sc:
                        admin.kill(sc["kill"])
                    if slack == "auto" and args.auto_warmup:  # let the tracker see this scenario and slack
                        run_load(url, x, y, rate=args.rate, requests=args.auto_warmup, mode=mode, k=info["k"])
                    t0 = time.time()
                    loads.setdefault(label, []).append(os.getloadavg()[0])
                    res = run_load(
                        url,
                        x,
                        y,
                        rate=args.rate,
                        requests=max(1, args.requests // args.rounds),
                        duration_s=args.duration,
                        mode=mode,
                        seed=zlib.crc32(name.encode()) + rnd,  # same arrivals and inputs in every mode
                        k=info["k"],
                    )
                    loads[label].append(os.getloadavg()[0])
                    parts.setdefault(label, []).append(res)
                    if "kill" in sc:
                        admin.restart(sc["kill"])
                    print(
                        f"  {name} {label} round {rnd + 1}/{args.rounds} ({time.time() - t0:.0f}s)",
                        flush=True,
                    )
            for label, chunks in parts.items():
                res = _merge(chunks)
                s = summarize(res, reference=reference, tasks=tasks)
                s["decode_slack"] = label.split("@")[1] if "@" in label else None
                s["loadavg_1min"] = [min(loads[label]), max(loads[label])]
                s["latency_ms"] = [None if np.isnan(v) else round(float(v) * 1000, 4) for v in res.latency_s]
                results["runs"][f"{name}/{label}"] = s
                curves[label] = res.latency_s * 1000
                print(
                    f"{name:14s} {label:14s} p50 {s.get('p50_ms', float('nan')):7.2f}  "
                    f"p99 {s.get('p99_ms', float('nan')):7.2f}  p99.9 {s.get('p999_ms', float('nan')):8.2f}  "
                    f"answered {s['answered']}/{s['sent']}  rec {s['reconstructed_fraction']:.3f}  "
                    f"task acc {s.get('task_accuracy') or float('nan'):.4f}  "
                    f"agree(rec) {s.get('agreement_reconstructed') or float('nan'):.3f}  "
                    f"load {s['loadavg_1min'][0]:.1f}-{s['loadavg_1min'][1]:.1f}",
                    flush=True,
                )
            results["auto_slack_state"] = admin.state().get("auto_slack")
            plot_cdf(
                curves,
                args.out / f"cdf-{name}.png",
                title=f"k={info['k']} r={info['r']}, {name}, {args.rate:g} req/s",
            )
    finally:
        admin.close()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    (args.out / "results.json").write_text(json.dumps(results))
    (args.out / "table.md").write_text(table(results))
    print(table(results))


def _merge(chunks: list[LoadResult]) -> LoadResult:
    """One :class:`LoadResult` of several rounds of the same setting."""
    cat = {f: np.concatenate([getattr(c, f) for c in chunks]) for f in _ARRAYS}
    errors: dict[str, int] = {}
    for c in chunks:
        for key, v in c.errors.items():
            errors[key] = errors.get(key, 0) + v
    config = dict(chunks[0].config, requests=int(len(cat["status"])), rounds=len(chunks))
    return LoadResult(
        **cat,
        has_label=chunks[0].has_label,
        duration_s=sum(c.duration_s for c in chunks),
        errors=errors,
        config=config,
    )


_ARRAYS = (
    "latency_s",
    "status",
    "reconstructed",
    "correct",
    "reconstructed_outputs",
    "labels",
    "top1",
    "index",
)


def table(results: dict) -> str:
    """Markdown table of every run (latency in ms).

    ``task acc``: served top-1 against the label on inputs of each model's own
    classes; ``agree (rec.)``: reconstructed outputs whose top-1 equals the data
    model's own (on inputs of its own classes); ``load``: lowest and highest
    1-minute load average seen at the start and end of the setting's rounds."""
    lines = [
        "| scenario | mode | slack | p50 | p90 | p99 | p99.9 | p99.9 − p50 | req/s | answered "
        "| reconstructed | task acc | agree (rec.) | load |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def f(v, fmt="{:.1f}"):
        return fmt.format(v) if v is not None else "–"

    for key, s in results["runs"].items():
        name, label = key.split("/")
        mode = label.split("@")[0]
        slack = s.get("decode_slack")
        lines.append(
            f"| {name} | {mode} | {slack if slack is not None else '–'} | {f(s.get('p50_ms'))} | "
            f"{f(s.get('p90_ms'))} | {f(s.get('p99_ms'))} | {f(s.get('p999_ms'))} | "
            f"{f(s.get('gap_p999_p50_ms'))} | {s['throughput_rps']:.1f} | {s['answered']}/{s['sent']} | "
            f"{s['reconstructed_fraction']:.3f} | {f(s.get('task_accuracy'), '{:.4f}')} | "
            f"{f(s.get('agreement_reconstructed'), '{:.3f}')} | "
            f"{s['loadavg_1min'][0]:.1f}–{s['loadavg_1min'][1]:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""The CUDA check: Fisher throughput, an encode and a served bundle on a GPU, plus the
k = 4, r = 2 tail benchmark on a many-core machine. Run by ``benchmarks/gpu_check.sh``.

Every part runs in its own ``try`` so one failure does not hide the others; each
writes ``OUT/<part>.json`` (and its log), and ``OUT/summary.json`` collects them.

    python benchmarks/gpu_check.py --bundle-k2 runs/gpu/mnist-k2r1 --bundle-k4 runs/gpu/mnist-k4r2 \\
        --data runs/gpu/test.npz --out OUT [--parts env,fisher,encode,serve,tail] [--device cuda]

``--device cpu`` runs the same steps without a GPU (how the script is tested before
it is spent on a lent machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("env", "pytest", "fisher", "encode", "serve", "path", "tail")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(cmd: list[str], log: Path, timeout_s: float) -> dict:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=ROOT)
    return {"command": " ".join(cmd), "rc": p.returncode, "seconds": round(time.perf_counter() - t0, 1)}


def part_env(args: argparse.Namespace) -> dict:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    try:
        import ray

        info["ray"] = ray.__version__
    except Exception as exc:  # recorded, the serving parts will fail with the reason
        info["ray"] = f"not importable: {exc}"
    return info


def part_pytest(args: argparse.Namespace) -> dict:
    """tests/test_cuda.py: Fisher, encoders and decoding on the device equal the CPU's."""
    res = _run(
        [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider"],
        args.out / "pytest.log",
        240,
    )
    res["tail"] = (args.out / "pytest.log").read_text()[-1500:]
    return res


def part_fisher(args: argparse.Namespace) -> dict:
    out = args.out / "fisher_bench.json"
    cmd = [sys.executable, "benchmarks/fisher.py", "--device", args.device, "--samples", "512"]
    cmd += ["--loop-samples", "32", "--chunks", "64,256", "--out", str(out)]
    res = _run(cmd, args.out / "fisher.log", args.fisher_timeout)
    if out.exists():
        res["results"] = json.loads(out.read_text())
    return res


def part_encode(args: argparse.Namespace) -> dict:
    """Encode the k = 2 bundle's data models on the device and on the CPU: time and agreement."""
    from coinfer import Bundle, encode

    b = Bundle.load(args.bundle_k2)
    with np.load(args.data) as z:
        x = torch.from_numpy(z["x"][:1024].astype(np.float32))
    calib, probe = x[:256], x[256:]
    dev = torch.device(args.device)
    res: dict = {"bundle": str(args.bundle_k2), "calibration": len(calib), "device": args.device}
    for method, opts in (("coin", {"estimator": "exact"}), ("heads", {})):
        row: dict = {}
        outs = {}
        for where in ("cpu", args.device):
            d = torch.device(where)
            models = [m.to(d).eval() for m in b.data_models]
            _sync(d)
            t0 = time.perf_counter()
            coded = encode(models, b.code, calib.to(d), method=method, **opts)
            _sync(d)
            row[f"{where}_seconds"] = round(time.perf_counter() - t0, 3)
            with torch.no_grad():
                p = torch.softmax(coded[0].to(d).eval()(probe.to(d)), -1).cpu()
            outs[where] = p
            if method == "heads":
                row[f"{where}_split"] = coded.info.get("split")
                row[f"{where}_parity_cost"] = coded.info.get("parity_cost")
        row["max_abs_prob_diff_cpu_vs_device"] = float((outs["cpu"] - outs[args.device]).abs().max())
        row["top1_agreement_cpu_vs_device"] = float(
            (outs["cpu"].argmax(-1) == outs[args.device].argmax(-1)).float().mean()
        )
        res[method] = row
        for m in b.data_models:
            m.to("cpu")
    res["device_name"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return res


def _gpu_processes() -> list[str]:
    try:
        q = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"]
        return [
            line
            for line in subprocess.run(q, capture_output=True, text=True, timeout=20).stdout.splitlines()
            if line
        ]
    except (OSError, subprocess.SubprocessError):
        return []


def part_serve(args: argparse.Namespace) -> dict:
    """``coinfer serve --worker-gpus`` on the k = 2 bundle, then ``coinfer bench latency`` per mode."""
    from serving_latency import start_server  # benchmarks/serving_latency.py, beside this script

    gpus = "0.2" if args.device == "cuda" else "0"
    extra = ["--worker-gpus", gpus, "--worker-cpus", "1"]
    t0 = time.time()
    proc, url, _ = start_server(args.bundle_k2, extra, args.out / "serve_server.log")
    res: dict = {"serve_args": extra, "startup_seconds": round(time.time() - t0, 1)}
    try:
        res["gpu_processes"] = _gpu_processes()
        warm = ["coinfer", "bench", "latency", "--url", url, "--data", str(args.data), "--rate", "50"]
        warm += ["--requests", "100", "--mode", "coded", "--out", str(args.out / "serve_warmup.json")]
        res["warmup"] = _run(warm, args.out / "serve_warmup.log", 60)  # CUDA's first-use costs, not measured
        for mode in ("coded", "uncoded"):
            out = args.out / f"serve_{mode}.json"
            bench = ["coinfer", "bench", "latency", "--url", url, "--data", str(args.data), "--rate", "50"]
            bench += ["--requests", "500", "--mode", mode, "--out", str(out)]
            r = _run(bench, args.out / f"serve_{mode}.log", 120)
            if out.exists():
                s = json.loads(out.read_text())
                s.pop("latency_ms", None)
                r["summary"] = s
            res[mode] = r
    finally:
        proc.send_signal(2)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return res


def part_path(args: argparse.Namespace) -> dict:
    """benchmarks/request_path.py on the k = 2 bundle: the request path against the in-process
    floor (the models on the same device), with the workers on the GPU."""
    out = args.out / "request_path.json"
    gpus = "0.2" if args.device == "cuda" else "0"
    cmd = [
        sys.executable,
        "benchmarks/request_path.py",
        str(args.bundle_k2),
        "--rounds",
        "2",
        "--iters",
        "200",
    ]
    cmd += ["--seconds", "5", "--serve-args", f"--worker-gpus {gpus} --worker-cpus 1", "--out", str(out)]
    cmd += ["--device", args.device]
    res = _run(cmd, args.out / "request_path.log", 150)
    if out.exists():
        res["results"] = [
            {k: v for k, v in r.items() if k != "rounds"} for r in json.loads(out.read_text())["runs"]
        ]
    return res


def part_tail(args: argparse.Namespace) -> dict:
    """The docs' k = 4, r = 2 tail benchmark, on this machine's cores (one CPU per worker)."""
    out = args.out / "tail"
    cmd = [sys.executable, "benchmarks/serving_latency.py", str(args.bundle_k4), "--data", str(args.data)]
    cmd += ["--rate", "15", "--requests", str(args.tail_requests), "--out", str(out)]
    cmd += ["--scenarios", "none,stragglers,slow-worker", "--modes", "coded,uncoded,replicated"]
    cmd += ["--decode-slack", "0,auto", "--serve-args", "--worker-cpus 1"]
    res = _run(cmd, args.out / "tail.log", args.tail_timeout)
    if (out / "results.json").exists():
        r = json.loads((out / "results.json").read_text())
        for s in r["runs"].values():
            s.pop("latency_ms", None)
        res["results"] = r
    if (out / "table.md").exists():
        res["table"] = (out / "table.md").read_text()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle-k2", type=Path, required=True)
    ap.add_argument("--bundle-k4", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help=".npz with x, y (normalised test images)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--fisher-timeout", type=float, default=150)
    ap.add_argument("--tail-requests", type=int, default=300)
    ap.add_argument("--tail-timeout", type=float, default=330)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"argv": sys.argv}
    for part in args.parts.split(","):
        t0 = time.perf_counter()
        print(f"== {part}", flush=True)
        try:
            summary[part] = globals()[f"part_{part}"](args)
        except Exception:
            summary[part] = {"error": traceback.format_exc()[-3000:]}
        summary[part]["part_seconds"] = round(time.perf_counter() - t0, 1)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        print(json.dumps(summary[part], default=str)[:1500], flush=True)


if __name__ == "__main__":
    main()

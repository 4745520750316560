"""Throughput of the diagonal Fisher estimators: the batched backends against the per-sample loop.

    python benchmarks/fisher.py --out benchmarks/results/fisher.json

Prints a table of samples/second for each architecture, estimator and backend
(``layers``: layer-wise contractions; ``vmap``: torch.func per-sample
gradients; ``loop``: per-sample autograd), the speed of the one-gradient
estimators (``sampled``, ``empirical``) relative to ``exact`` on each backend,
plus a sweep of the chunk size of both batched backends, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from coinfer import build_model, diagonal_fisher

SHAPES = {"lenet5": (1, 28, 28), "resnet20": (3, 32, 32)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(model, x, estimator, backend, batch_size, labels=None, repeats=2) -> float:
    w = min(4, len(x))
    diagonal_fisher(
        model,
        x[:w],
        estimator,
        labels=None if labels is None else labels[:w],
        batch_size=batch_size,
        backend=backend,
        seed=0,
    )
    best = float("inf")
    for _ in range(repeats):
        _sync(x.device)
        t = time.perf_counter()
        diagonal_fisher(model, x, estimator, labels=labels, batch_size=batch_size, backend=backend, seed=0)
        _sync(x.device)
        best = min(best, time.perf_counter() - t)
    return len(x) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="lenet5,resnet20")
    ap.add_argument("--samples", type=int, default=256, help="samples per vectorised measurement")
    ap.add_argument("--loop-samples", type=int, default=32, help="samples per loop measurement")
    ap.add_argument("--chunks", default="4,8,16,32,64,128", help="vmap chunk sizes swept")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fisher.json"))
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timings include a device synchronise)")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, sweep = [], []
    for arch in args.archs.split(","):
        model = build_model(arch).eval().to(device)
        x = torch.randn(args.samples, *SHAPES[arch]).to(device)
        y = torch.randint(0, 10, (args.samples,)).to(device)
        for est in ("exact", "sampled", "empirical"):
            lab = y if est == "empirical" else None
            lay = rate(model, x, est, "layers", None, lab)
            vec = rate(model, x, est, "vmap", None, lab)
            n = args.loop_samples
            loop = rate(model, x[:n], est, "loop", None, None if lab is None else lab[:n], repeats=1)
            rows.append(
                {
                    "arch": arch,
                    "estimator": est,
                    "layers_samples_per_s": lay,
                    "vmap_samples_per_s": vec,
                    "loop_samples_per_s": loop,
                    "layers_speedup": lay / loop,
                    "vmap_speedup": vec / loop,
                }
            )
            print(
                f"{arch:9s} {est:9s} layers {lay:8.1f}/s  vmap {vec:8.1f}/s  loop {loop:7.1f}/s  "
                f"speedup {lay / loop:5.1f}x / {vec / loop:5.1f}x",
                flush=True,
            )
        for backend in ("layers", "vmap"):
            for c in map(int, args.chunks.split(",")):
                r = rate(model, x, "exact", backend, c)
                rs = rate(model, x, "sampled", backend, c)
                sweep.append(
                    {
                        "arch": arch,
                        "backend": backend,
                        "chunk": c,
                        "exact_samples_per_s": r,
                        "sampled_samples_per_s": rs,
                    }
                )
                print(
                    f"{arch:9s} {backend:6s} chunk {c:4d}: exact {r:9.1f}/s sampled {rs:9.1f}/s", flush=True
                )
    machine = {
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "processor": platform.processor(),
        "load_average_at_end": os.getloadavg(),
    }
    print(
        "\n| arch | estimator | layers samples/s | vmap samples/s | loop samples/s "
        "| layers / loop | vmap / loop |\n|---|---|---:|---:|---:|---:|---:|"
    )
    for r in rows:
        print(
            f"| {r['arch']} | {r['estimator']} | {r['layers_samples_per_s']:.1f} | "
            f"{r['vmap_samples_per_s']:.1f} | {r['loop_samples_per_s']:.1f} | "
            f"{r['layers_speedup']:.1f}x | {r['vmap_speedup']:.1f}x |"
        )
    ratios = []
    for arch in args.archs.split(","):
        by_est = {r["estimator"]: r for r in rows if r["arch"] == arch}
        for backend in ("layers", "vmap", "loop"):
            exact = by_est["exact"][f"{backend}_samples_per_s"]
            ratios.append(
                {
                    "arch": arch,
                    "backend": backend,
                    "sampled_over_exact": by_est["sampled"][f"{backend}_samples_per_s"] / exact,
                    "empirical_over_exact": by_est["empirical"][f"{backend}_samples_per_s"] / exact,
                }
            )
    print("\n| arch | backend | sampled / exact | empirical / exact |\n|---|---|---:|---:|")
    for r in ratios:
        print(
            f"| {r['arch']} | {r['backend']} | {r['sampled_over_exact']:.1f}x | "
            f"{r['empirical_over_exact']:.1f}x |"
        )
    print("\n| arch | backend | chunk | exact samples/s | sampled samples/s |\n|---|---|---:|---:|---:|")
    for s in sweep:
        print(
            f"| {s['arch']} | {s['backend']} | {s['chunk']} | {s['exact_samples_per_s']:.1f} | "
            f"{s['sampled_samples_per_s']:.1f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"machine": machine, "estimators": rows, "ratios": ratios, "chunk_sweep": sweep}, indent=2)
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

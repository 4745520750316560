"""Build cost of the coded model: ``coin`` (each Fisher estimator) and ``heads``
(trunk average / COIN, at its split points) against ``distill`` at several
epoch budgets, for ``lenet5`` and ``resnet20``, with each parity's serving cost
(``parity_cost``: its FLOPs over one data model's).

Timing does not depend on what the models learned, so the k = 2 data models
are freshly initialised copies and the inputs are random tensors of the right
shape. Prints a markdown table, writes JSON, and (with --write-docs) replaces
the "Build cost" section of docs/performance.md.

    OMP_NUM_THREADS=1 python benchmarks/build_cost.py --threads 1 --write-docs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path

import torch

from coinfer import Code, build_model, encode

ROOT = Path(__file__).parents[1]
SETTINGS = {
    "lenet5": {
        "spec": {"name": "lenet5", "kwargs": {"in_channels": 1, "image_size": 28}},
        "shape": (1, 28, 28),
        "calibration": 1000,
        "train_inputs": 10000,
        "epochs": [1, 5],
        "splits": ["auto", "fc1"],
    },
    "resnet20": {
        "spec": {"name": "resnet20", "kwargs": {"width": 16}},
        "shape": (3, 32, 32),
        "calibration": 128,
        "train_inputs": 1000,
        "epochs": [1, 2],
        "splits": ["fc", "layers.6", "layers.3"],
    },
}


def _models(spec, k=2):
    out = []
    for i in range(k):
        torch.manual_seed(i)
        out.append(build_model(spec))
    return out


def bench(arch: str, repeats: int = 1) -> list[dict]:
    s = SETTINGS[arch]
    g = torch.Generator().manual_seed(0)
    calib = torch.randn(s["calibration"], *s["shape"], generator=g)
    labels = torch.randint(0, 10, (s["calibration"],), generator=g)
    train = torch.randn(s["train_inputs"], *s["shape"], generator=g)
    models = _models(s["spec"])
    code = Code(2, 1)
    rows = []
    jobs = [
        (f"coin {e}", "coin", {"estimator": e}, (calib, labels)) for e in ("exact", "sampled", "empirical")
    ]
    jobs += [("average", "average", {}, calib)]
    for split in s["splits"]:
        jobs.append((f"heads average {split}", "heads", {"trunk": "average", "split": split}, calib))
        jobs.append((f"heads coin-exact {split}", "heads", {"trunk": "coin", "split": split}, calib))
    for e in s["epochs"]:
        jobs.append((f"distill calib E={e}", "distill", {"init": "random", "epochs": e}, calib))
        jobs.append(
            (f"distill train E={e}", "distill", {"init": "random", "epochs": e, "train_inputs": train}, calib)
        )
    for label, method, opts, cal in jobs:
        secs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = (
                encode(models, code, cal, method=method, progress=False, **opts)
                if method != "average"
                else encode(models, code, cal, method=method)
            )
            secs.append(time.perf_counter() - t0)
        rows.append(
            {
                "arch": arch,
                "method": label,
                "seconds": min(secs),
                "calibration": s["calibration"],
                "train_inputs": s["train_inputs"] if "train_inputs" in opts else s["calibration"],
                "forward_passes": res.info.get("forward_passes"),
                "backward_passes": res.info.get("backward_passes"),
                "parity_cost": res.info.get("parity_cost", 1.0),
                "split": res.info.get("split", [None])[0],
            }
        )
        print(
            f"{arch:9s} {label:28s} {min(secs):8.2f} s  parity cost {rows[-1]['parity_cost']:.3f}", flush=True
        )
    return rows


def markdown(rows: list[dict], machine: dict) -> str:
    lines = [
        "## Build cost",
        "",
        "Seconds to build one coded model (k = 2, r = 1) with each encoder, from "
        "`benchmarks/build_cost.py` (command below). Inputs are random tensors of the "
        "right shape: timing does not depend on what the models learned. `coin` "
        "costs one Fisher pass per model over the calibration inputs (exact: one "
        "backward per class per sample; sampled/empirical: one per sample); "
        "`distill` costs the teachers' forward passes plus epochs × inputs "
        "forward/backward passes of the student. `heads` costs a merge (`average`: "
        "none; `coin-exact`: the Fisher passes), feature passes of every model over "
        "the calibration inputs, one ridge solve per head and α (6 α values, chosen "
        "on a 20% held-out slice; with `split=auto`, for every split whose parity "
        "cost fits 1.25). Parity cost is the parity's FLOPs over one data model's "
        "(torch's FlopCounterMode), the serving cost.",
        "",
        f"Machine: {machine['cpu_count']} CPU cores (shared), torch {machine['torch']} "
        f"with {machine['torch_threads']} thread(s), no GPU; {machine['platform']}.",
        "",
        "    OMP_NUM_THREADS=1 python benchmarks/build_cost.py --threads 1 --write-docs",
        "",
        "| arch | method | calibration | inputs trained on | build s | fwd passes | bwd passes | parity cost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['method']} | {r['calibration']} | "
            f"{r['train_inputs'] if r['method'].startswith('distill') else '–'} | {r['seconds']:.2f} | "
            f"{r['forward_passes']} | {r['backward_passes']} | "
            f"{r.get('parity_cost', 1.0):.3f}{' (' + r['split'] + ')' if r.get('split') else ''} |"
        )
    return "\n".join(lines) + "\n"


def write_docs(section: str) -> Path:
    path = ROOT / "docs" / "performance.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    start, end = "<!-- build-cost:start -->", "<!-- build-cost:end -->"
    block = f"{start}\n{section}{end}\n"
    text = path.read_text() if path.exists() else "# Performance\n\n"
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end) + "\n?", lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "build_cost.json"))
    ap.add_argument("--write-docs", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    machine = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    rows = [r for arch in a.arch for r in bench(arch, a.repeats)]
    md = markdown(rows, machine)
    print(md)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    if a.write_docs:
        print(f"wrote {write_docs(md)}")


if __name__ == "__main__":
    main()

"""The table of docs/results.md, "Heads on a pre-norm ViT and on MNIST k = 4",
from the runs kept under experiments/results/ (no retraining):

    python experiments/summarize_modern.py > docs/results/modern_summary.md

Every figure is the *test* metric of the variant chosen on validation (one
seed); "worst" is the worst single erasure (the model reconstructed least often).
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "results"

#: (config, the runs of the same data models with other methods)
CONFIGS = [
    ("fashion_class-split_k2r1_vit", ["fashion_class-split_k2r1_vit_coin"]),
    (
        "fashion_class-split_k4r1_vit",
        ["fashion_class-split_k4r1_vit_cost2", "fashion_class-split_k4r1_vit_groups"],
    ),
    ("cifar10_class-split_k2r1_vit", []),
    ("mnist_class-split_k4r1_seed0", []),
    ("mnist_mlp_class-split_k4r1_seed0", []),
]
FAMILIES = [
    "heads",
    "heads-polish",
    "heads-regmean",
    "heads-2.0",
    "heads-3.0",
    "distill-common",
    "coin-exact",
    "average",
    "base",
]


def _chosen(run: dict) -> dict[str, dict]:
    out = {}
    for m in run["methods"]:
        if m.get("chosen"):
            out[m["family"]] = m
    return out


def _cell(m: dict | None) -> str:
    if m is None:
        return "–"
    rows = [r["reconstruction_acc"] for r in m.get("rows", [])]
    worst = f" / {min(rows):.3f}" if rows else ""
    groups = max(m.get("trunk_groups") or [1])
    trunks = f", {groups} trunks" if groups > 1 else ""
    return (
        f"{m['test']['reconstruction_acc']:.3f}{worst} ({m['parity_cost']:.2f}, {m['seconds']:.0f} s{trunks})"
    )


def main() -> None:
    print(
        "Test reconstruction, mean / worst erased model (parity cost, build seconds, and the number of "
        "merged trunks where more than one) of the variant chosen on validation; seed 0; `–`: not run.\n"
    )
    print("| config | models' own-task acc | " + " | ".join(FAMILIES) + " |")
    print("|---|---|" + "---|" * len(FAMILIES))
    for name, extra in CONFIGS:
        path = ROOT / name / "seed0" / "results.json"
        if not path.exists():
            continue
        run = json.loads(path.read_text())
        chosen = _chosen(run)
        for e in extra:
            p = ROOT / e / "seed0" / "results.json"
            if p.exists():
                chosen.update(_chosen(json.loads(p.read_text())))
        own = min(m["task_test_acc"] for m in run["models"])
        arch = run["arch"]["name"] if isinstance(run["arch"], dict) else run["arch"]
        cells = [_cell(chosen.get(f)) for f in FAMILIES]
        print(f"| {name} ({arch}, k={run['k']}) | ≥ {own:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

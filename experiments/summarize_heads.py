"""The tables that lead docs/results.md: the heads parity against COIN and the
baselines on every committed config, from the runs kept under
experiments/results/ (no retraining):

    python experiments/summarize_heads.py > docs/results/heads_summary.md

The heads runs (``<config>_heads``) are each config rerun with ``--methods``
restricted to the heads presets and the main baselines, so that every
comparison is between parities of the same data models, built in the same
run on the same (shared) machine. Every figure is the *test* metric of the
variant chosen on validation, mean ± std over the seeds present; the data
models' own accuracies are listed beside, with their largest difference from
the committed runs of the same config (a different realisation of the same
recipe: training there ran on an earlier version of the code).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "results"

CONFIGS = [
    "mnist_class-split_k2r1",
    "mnist_class-split_k3r1",
    "mnist_class-split_k4r1",
    "mnist_class-split_k3r2",
    "fashion_class-split_k2r1",
    "mnist_dirichlet_k2r1",
    "mnist_iid_k2r1",
    "fashion_dirichlet_k2r1",
    "fashion_iid_k2r1",
    "cifar10_class-split_k2r1_reduced",
    "cifar10_dirichlet_k2r1_reduced",
    "cifar10_iid_k2r1_reduced",
]
FAMILIES = [
    "heads",
    "heads-1.5",
    "heads-coin",
    "heads-copy",
    "coin-exact",
    "average",
    "distill-common",
    "distill-calib",
    "base",
    "substitute",
]


def _runs(name: str) -> dict[int, dict]:
    out = {}
    for f in sorted((ROOT / name).glob("seed*/results.json")):
        d = json.loads(f.read_text())
        out[int(d["seed"])] = d
    return out


def _chosen(run: dict, family: str) -> dict | None:
    for m in run["methods"]:
        if m["family"] == family and m.get("chosen"):
            return m
    return None


def _ms(vals: list[float]) -> str:
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def _same_models(new: dict, old: dict) -> float:
    """Largest difference of a data model's test accuracy between two runs of one seed."""
    return max(abs(a["test_acc"] - b["test_acc"]) for a, b in zip(new["models"], old["models"], strict=True))


def summary() -> str:
    lines = [
        "| config | seeds | family | chosen on val (seed 0) | test recon acc | build s | parity cost |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for name in CONFIGS:
        new, old = _runs(name + "_heads"), _runs(name)
        if not new:
            notes.append(f"- {name}: no heads run yet")
            continue
        own = [m["task_test_acc"] for run in new.values() for m in run["models"]]
        diff = [_same_models(new[s], old[s]) for s in new if s in old]
        notes.append(
            f"- {name}: seeds {sorted(new)}; the data models' own-task test accuracy "
            f"{min(own):.3f}–{max(own):.3f}"
            + (
                f"; largest test-accuracy difference from the committed runs' models {max(diff):.3f}"
                if diff
                else ""
            )
        )
        for fam in FAMILIES:
            picked = [_chosen(new[s], fam) for s in sorted(new)]
            picked = [p for p in picked if p is not None]
            if not picked:
                continue
            recon = [p["test"]["reconstruction_acc"] for p in picked]
            secs = [p["seconds"] for p in picked]
            cost = [p.get("parity_cost", 1.0) for p in picked]
            lines.append(
                f"| {name} | {len(picked)} | {fam} | {picked[0]['label']} | {_ms(recon)} | "
                f"{statistics.mean(secs):.2f} | {statistics.mean(cost):.3f} |"
            )
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def lead_table() -> str:
    """One row per config: test reconstruction of the variant chosen on validation."""
    fams = ["heads", "heads-1.5", "coin-exact", "average", "distill-common", "distill-calib", "base"]
    lines = [
        "| config | seeds | heads | parity cost | build s | heads-1.5 (cost) | "
        + " | ".join(fams[2:])
        + " | distill-common build s |",
        "|---|---|---|---|---|---|" + "---|" * (len(fams) - 2) + "---|",
    ]
    for name in CONFIGS:
        new = _runs(name + "_heads")
        if not new:
            continue
        cells, secs, costs = {}, {}, {}
        for fam in fams:
            picked = [p for p in (_chosen(new[s], fam) for s in sorted(new)) if p is not None]
            cells[fam] = _ms([p["test"]["reconstruction_acc"] for p in picked])
            secs[fam] = statistics.mean(p["seconds"] for p in picked) if picked else float("nan")
            costs[fam] = (
                statistics.mean(p.get("parity_cost", 1.0) for p in picked) if picked else float("nan")
            )
        lines.append(
            f"| {name} | {len(new)} | **{cells['heads']}** | {costs['heads']:.2f} | {secs['heads']:.1f} | "
            f"{cells['heads-1.5']} ({costs['heads-1.5']:.2f}) | "
            + " | ".join(cells[f] for f in fams[2:])
            + f" | {secs['distill-common']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _variants_table(configs: list[str], keep, with_val: bool) -> str:
    """Every variant (not only the chosen ones) of the families ``keep(family)``
    accepts, per config: test (and validation) reconstruction, build s, parity cost."""
    head = "| config | variant | seeds | " + ("val recon acc | " if with_val else "")
    lines = [head + "test recon acc | build s | parity cost |", "|---" * (6 + with_val) + "|"]
    for name in configs:
        by_label: dict[str, list[dict]] = {}
        for run in _runs(name + "_heads").values():
            for m in run["methods"]:
                if keep(m["family"]):
                    by_label.setdefault(m["label"], []).append(m)
        for label, ms in by_label.items():
            val = f"{_ms([m['val']['reconstruction_acc'] for m in ms])} | " if with_val else ""
            lines.append(
                f"| {name} | {label} | {len(ms)} | {val}{_ms([m['test']['reconstruction_acc'] for m in ms])} | "
                f"{statistics.mean(m['seconds'] for m in ms):.2f} | "
                f"{statistics.mean(m.get('parity_cost', 1.0) for m in ms):.3f} |"
            )
    return "\n".join(lines) + "\n"


def sizes_table() -> str:
    """Build cost at equal calibration size: every heads, heads-coin and coin-exact
    variant of the class-split LeNet-5 runs."""
    lenet = [c for c in CONFIGS if "class-split" in c and not c.startswith("cifar10")]
    return _variants_table(lenet, lambda f: f in ("heads", "heads-coin", "coin-exact"), with_val=False)


def splits_table() -> str:
    """Every heads variant of the CIFAR-10 runs (one per split point and calibration size)."""
    cifar = [c for c in CONFIGS if c.startswith("cifar10")]
    return _variants_table(cifar, lambda f: f.startswith("heads"), with_val=True)


def main() -> None:
    sys.stdout.write("## The answer in one table (test reconstruction accuracy, chosen on validation)\n\n")
    sys.stdout.write(lead_table())
    sys.stdout.write("\n## Heads against COIN and the baselines (chosen on validation)\n\n")
    sys.stdout.write(summary())
    sys.stdout.write("\n## LeNet-5 class-split: heads and COIN at each calibration size\n\n")
    sys.stdout.write(sizes_table())
    sys.stdout.write("\n## ResNet-20 (CIFAR-10 reduced): every heads variant\n\n")
    sys.stdout.write(splits_table())


if __name__ == "__main__":
    main()

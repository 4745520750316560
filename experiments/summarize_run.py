"""One run's chosen variants as a markdown table, from the results kept under
experiments/results/ (no retraining):

    python experiments/summarize_run.py cifar10_class-split_k2r1_resnet20 > docs/results/resnet20_summary.md

Every figure is the *test* metric of the variant chosen on validation (seed 0);
"worst" is the worst single erasure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "results"


def main(name: str) -> None:
    run = json.loads((ROOT / name / "seed0" / "results.json").read_text())
    own = ", ".join(f"{m['task_test_acc']:.3f}" for m in run["models"])
    print(
        f"`{name}`, seed 0: the data models' own-task test accuracies {own}. Test reconstruction, "
        "mean / worst erased model, of the variant chosen on validation.\n"
    )
    print("| method | chosen on validation | reconstruction | parity cost | split | build s |")
    print("|---|---|---|---|---|---|")
    rows = [m for m in run["methods"] if m.get("chosen") and m["parity_cost"] > 0]
    for m in sorted(rows, key=lambda m: -m["test"]["reconstruction_acc"]):
        worst = min(r["reconstruction_acc"] for r in m["rows"]) if m.get("rows") else float("nan")
        split = ", ".join(m["split"]) if m.get("split") else "–"
        print(
            f"| {m['family']} | {m['label']} | {m['test']['reconstruction_acc']:.3f} / {worst:.3f} | "
            f"{m['parity_cost']:.2f} | {split} | {m['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1])

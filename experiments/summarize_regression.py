"""The lead table's heads cells, seed 0, against a rerun of the same configs with
the current code (the same cached data models), from the runs kept under
experiments/results/ (no retraining):

    python experiments/summarize_regression.py > docs/results/regression_summary.md

The reruns: ``coinfer experiment experiments/<config>.toml --seeds 0 --name <config>_rerun
--methods heads,heads-1.5``.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "results"
CONFIGS = [
    "mnist_class-split_k2r1",
    "mnist_class-split_k3r1",
    "mnist_class-split_k3r2",
    "fashion_class-split_k2r1",
]
FAMILIES = ["heads", "heads-1.5"]


def _chosen(path: Path) -> tuple[dict[str, dict], list[float]]:
    run = json.loads(path.read_text())
    return {m["family"]: m for m in run["methods"] if m.get("chosen")}, [
        m["task_test_acc"] for m in run["models"]
    ]


def main() -> None:
    print(
        "Test reconstruction (parity cost) of the variant chosen on validation, seed 0: the lead "
        "table's run (`<config>_heads`) and the rerun with the current code (`<config>_rerun`), on the "
        "same data models (their own-task test accuracies are compared in the last column).\n"
    )
    print("| config | " + " | ".join(f"{f} (table) | {f} (now)" for f in FAMILIES) + " | same data models |")
    print("|---|" + "---|---|" * len(FAMILIES) + "---|")
    for name in CONFIGS:
        old_p, new_p = (
            ROOT / f"{name}_heads" / "seed0" / "results.json",
            ROOT / f"{name}_rerun" / "seed0" / "results.json",
        )
        if not (old_p.exists() and new_p.exists()):
            continue
        (old, acc_old), (new, acc_new) = _chosen(old_p), _chosen(new_p)
        cells = []
        for f in FAMILIES:
            for m in (old.get(f), new.get(f)):
                cells.append(
                    "–" if m is None else f"{m['test']['reconstruction_acc']:.4f} ({m['parity_cost']:.2f})"
                )
        same = "yes" if acc_old == acc_new else "no"
        print(f"| {name} | " + " | ".join(cells) + f" | {same} |")


if __name__ == "__main__":
    main()

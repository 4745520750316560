"""Markdown tables of benchmarks/results/byzantine_k2r2.json and
benchmarks/results/query_coding.json, quoted into docs/results.md:

    python benchmarks/summarize_coding.py byzantine > docs/results/byzantine_summary.md
    python benchmarks/summarize_coding.py query > docs/results/query_summary.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def byzantine() -> None:
    res = json.loads((RESULTS / "byzantine_k2r2.json").read_text())
    print(
        "One worker's answer corrupted, each of the n = k + r workers in turn (test set); threshold: "
        "the clean residual's 99th percentile on validation.\n"
    )
    print(
        "| config | k | r | parity cost | corruption | located | served = clean answer | false alarms (clean) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for run in res["runs"]:
        name = Path(run["config"]).stem
        for kind, v in run["kinds"].items():
            print(
                f"| {name} | {run['k']} | {run['r']} | {run['parity_cost']:.2f} | {kind} | {v['located']:.3f} "
                f"| {v['served_agrees_with_clean']:.3f} | {run['false_alarms']:.4f} |"
            )


def query() -> None:
    res = json.loads((RESULTS / "query_coding.json").read_text())
    print(
        "Groups of K test queries, one extra worker, one worker late. Berrut: N = K + 1 workers, the "
        "mean over which one is late; agreement = the decoded top-1 equals the model's own. ParM and the "
        f"backup ({res.get('epochs', '?')} training epochs each): a data worker late, the late query's "
        "agreement.\n"
    )
    print(
        "| dataset | base accuracy | K | Berrut: all queries | Berrut: the late query | Berrut: degraded "
        "accuracy (/ base) | ParM: the late query | backup: the late query (its FLOPs share) | "
        "Berrut N = K + 2: corrupt located (false alarms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for run in res["runs"]:
        for r in run["rows"]:
            loc = r["locate_n_k_plus_2"]
            parm, backup = r.get("parm"), r.get("backup")
            p = "–" if parm is None else f"{parm['agreement_late_query']:.3f}"
            b = (
                "–"
                if backup is None
                else f"{backup['agreement_late_query']:.3f} ({backup['student_flops_share']:.2f})"
            )
            print(
                f"| {run['dataset']} | {run['base_accuracy']:.3f} | {r['k']} | {r['agreement']:.3f} | "
                f"{r['agreement_late_query']:.3f} | {r['degraded_accuracy']:.3f} ({r['degraded_over_base']:.2f}) | "
                f"{p} | {b} | {loc['located']:.3f} ({loc['false_alarms']:.3f}) |"
            )


if __name__ == "__main__":
    {"byzantine": byzantine, "query": query}[sys.argv[1]]()

"""Reports: aggregate experiment runs over seeds into tables and plots.

A *group* is one setting (dataset, architecture, scenario, k, r); within it,
each method family's validation-chosen variant is averaged over seeds
(mean ± sample std). Plots: reconstruction and decoded task accuracy per
method and scenario, and reconstruction accuracy against build seconds for
every variant (the accuracy/cost frontier), each point coloured by its parity
cost (the coded model's inference cost in units of one data model).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from coinfer.errors import CoinferError

__all__ = [
    "summary_rows",
    "parity_cost_of",
    "load_results",
    "aggregate",
    "frontier",
    "markdown_table",
    "plot_accuracy",
    "plot_frontier",
    "write_report",
]

_SHOWN = (
    ("reconstruction_acc", "recon acc (all test)"),
    ("reconstruction_acc_task", "recon acc (task)"),
    ("decoded_task_acc", "decoded task acc"),
    ("own_task_acc", "own task acc"),
    ("tv", "TV to true"),
    ("negative_mass", "neg. mass"),
)


_NO_PARITY = ("substitute", "default")


def parity_cost_of(method: dict) -> float:
    """A variant's parity cost; results written before it was recorded get 1.0
    (a coded model with the data models' architecture), 0 for the no-parity controls."""
    if "parity_cost" in method:
        return float(method["parity_cost"])
    return 0.0 if method["family"] in _NO_PARITY else 1.0


def summary_rows(results: Sequence[dict]) -> list[dict]:
    """Per method family, the validation-chosen variant's test metrics, mean over seeds."""
    fams: dict[str, list[dict]] = {}
    for res in results:
        for r in res["methods"]:
            if r["chosen"]:
                fams.setdefault(r["family"], []).append(r)
    rows = []
    for fam, rs in fams.items():
        row = {"family": fam, "label": ", ".join(sorted({r["label"] for r in rs})), "n": len(rs)}
        for m in ("reconstruction_acc", "reconstruction_acc_task", "decoded_task_acc", "own_task_acc", "tv"):
            row[m] = sum(r["test"][m] for r in rs) / len(rs)
        row["seconds"] = sum(r["seconds"] for r in rs) / len(rs)
        row["parity_cost"] = sum(parity_cost_of(r) for r in rs) / len(rs)
        rows.append(row)
    return rows


def load_results(paths: Iterable[str | Path]) -> list[dict]:
    """Read ``results.json`` files: each path is one, or a directory searched recursively."""
    out = []
    for p in map(Path, paths):
        if p.is_file():
            files = [p]
        elif p.is_dir():
            files = sorted(p.rglob("results.json"))
            if not files:
                raise CoinferError(f"run directory {p} holds no results.json")
        else:
            raise CoinferError(f"run directory {p} does not exist")
        for f in files:
            try:
                out.append(json.loads(f.read_text()))
            except json.JSONDecodeError as exc:
                raise CoinferError(f"{f} is not valid JSON: {exc}") from None
    return out


def _group_key(res: dict) -> tuple:
    return (res["dataset"], res["arch"]["name"], res["scenario"], res["k"], res["r"])


def _ms(vals: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in vals if v is not None and v == v]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, s


def aggregate(results: Sequence[dict]) -> list[dict]:
    """One entry per group: models' accuracies and, per method family, the
    chosen variants' test metrics as (mean, std) over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for res in results:
        groups.setdefault(_group_key(res), []).append(res)
    out = []
    for key, runs in groups.items():
        seeds = sorted({r["seed"] for r in runs})
        fams: dict[str, list[dict]] = {}
        for res in runs:
            for m in res["methods"]:
                if m.get("chosen"):
                    fams.setdefault(m["family"], []).append(m)
        methods = []
        for fam, ms in fams.items():
            row = {"family": fam, "labels": sorted({m["label"] for m in ms}), "n": len(ms)}
            for metric, _ in _SHOWN:
                row[metric] = _ms([m["test"].get(metric) for m in ms])
            row["seconds"] = _ms([m["seconds"] for m in ms])
            row["parity_cost"] = _ms([parity_cost_of(m) for m in ms])
            row["coded_tv"] = _ms([m["coded_tv"][0] if m.get("coded_tv") else None for m in ms])
            row["forward_passes"] = _ms([m["forward_passes"] for m in ms])
            row["backward_passes"] = _ms([m["backward_passes"] for m in ms])
            ft = [m["fisher_totals"] for m in ms if m.get("fisher_totals")]
            if ft:
                row["fisher_ratio"] = _ms([max(t) / max(min(t), 1e-30) for t in ft])
            methods.append(row)
        task_acc = [m["task_test_acc"] for res in runs for m in res["models"]]
        out.append(
            {
                "dataset": key[0],
                "arch": key[1],
                "scenario": key[2],
                "k": key[3],
                "r": key[4],
                "seeds": seeds,
                "model_task_acc": _ms(task_acc),
                "model_task_acc_min": min(task_acc),
                "base_test_acc": _ms([res["base_model"]["test_acc"] for res in runs]),
                "methods": methods,
                "runs": runs,
            }
        )
    return out


def _fmt(ms: tuple[float, float], digits: int = 3, single: bool = False) -> str:
    """``mean ± std``, or the mean alone when there is one seed (no spread to show)."""
    m, s = ms
    if m != m:
        return "–"
    return f"{m:.{digits}f}" if single else f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(group: dict) -> str:
    """A markdown table of one group: one row per method family, mean ± std over seeds."""
    one = len(group["seeds"]) == 1
    head = (
        f"**{group['dataset']} / {group['arch']} / {group['scenario']} / k={group['k']} r={group['r']}**"
        f" — seeds {group['seeds']}; data models' own-task test accuracy "
        f"{_fmt(group['model_task_acc'], 4, one)} (min {group['model_task_acc_min']:.4f}); "
        f"base model test accuracy {_fmt(group['base_test_acc'], 4, one)}\n\n"
    )
    cols = ["method", "chosen on validation", *[c for _, c in _SHOWN], "coded TV to mixture", "build s"]
    cols += ["parity cost"]
    cols += ["fwd / bwd passes", "Fisher max/min"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows = sorted(group["methods"], key=lambda r: -r["reconstruction_acc"][0])
    for r in rows:
        cells = [r["family"], "; ".join(r["labels"])]
        cells += [_fmt(r[m], single=one) for m, _ in _SHOWN]
        cells.append(_fmt(r["coded_tv"], single=one))
        cells.append(_fmt(r["seconds"], 2, one))
        cells.append(f"{r['parity_cost'][0]:.2f}")
        cells.append(f"{r['forward_passes'][0]:.3g} / {r['backward_passes'][0]:.3g}")
        cells.append(_fmt(r["fisher_ratio"], 2, one) if "fisher_ratio" in r else "–")
        lines.append("| " + " | ".join(cells) + " |")
    front = " → ".join(f"{lab} ({s:.2f} s, {a:.3f}, parity ×{c:.2f})" for lab, s, a, c in frontier(group))
    tail = (
        "\nAccuracy/cost frontier over all variants (mean build s, mean test reconstruction acc, "
        f"parity cost): {front}\n"
    )
    return head + "\n".join(lines) + "\n" + tail


def _slug(group: dict) -> str:
    return f"{group['dataset']}_{group['arch']}_{group['scenario']}_k{group['k']}_r{group['r']}"


def plot_accuracy(groups: Sequence[dict], path: str | Path) -> Path:
    """Bars of reconstruction accuracy and decoded task accuracy per method, one panel per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(groups)
    fig, axes = plt.subplots(n, 1, figsize=(11, 3.4 * n), squeeze=False)
    for ax, g in zip(axes[:, 0], groups, strict=True):
        rows = sorted(g["methods"], key=lambda r: -r["reconstruction_acc"][0])
        xs = range(len(rows))
        bars = (("reconstruction_acc", "reconstruction acc"), ("decoded_task_acc", "decoded task acc"))
        for off, (metric, lab) in zip((-0.2, 0.2), bars, strict=True):
            ax.bar(
                [x + off for x in xs],
                [r[metric][0] for r in rows],
                0.4,
                yerr=[r[metric][1] for r in rows],
                label=lab,
            )
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["family"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{g['dataset']} {g['arch']} {g['scenario']} k={g['k']} r={g['r']} (seeds {g['seeds']})")
        ax.legend(fontsize=8, loc="lower left")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _variant_means(group: dict) -> tuple[dict[str, tuple[float, float, float]], dict[str, str]]:
    """Per variant label: (mean build seconds, mean test reconstruction acc, mean parity cost)."""
    pts: dict[str, list[tuple[float, float, float]]] = {}
    fam_of: dict[str, str] = {}
    for res in group["runs"]:
        for m in res["methods"]:
            pts.setdefault(m["label"], []).append(
                (m["seconds"], m["test"]["reconstruction_acc"], parity_cost_of(m))
            )
            fam_of[m["label"]] = m["family"]
    means = {lab: tuple(sum(p[i] for p in v) / len(v) for i in range(3)) for lab, v in pts.items()}
    return means, fam_of


def frontier(group: dict) -> list[tuple[str, float, float, float]]:
    """The accuracy/build-cost frontier over every variant of a group: ``(label,
    mean build seconds, mean test reconstruction accuracy, parity cost)``,
    cheapest build first, each more accurate than every cheaper one. (Variants
    are not chosen on test here: this is a description of cost against
    accuracy, not a model selection.)"""
    means, _ = _variant_means(group)
    order = sorted(means.items(), key=lambda kv: (kv[1][0], -kv[1][1]))
    out, best = [], -1.0
    for lab, (s, a, c) in order:
        if a > best:
            out.append((lab, s, a, c))
            best = a
    return out


_MARKERS = "osD^vP*Xph<>d8H"


def plot_frontier(group: dict, path: str | Path) -> Path:
    """Reconstruction accuracy against build seconds for every variant of one group
    (mean over seeds): one marker shape per method family, colour by parity cost
    (the coded model's inference cost in units of one data model; 0 for the
    no-parity controls). Zero-cost builds are drawn at the left edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    means, fam_of = _variant_means(group)
    positive = [s for s, _, _ in means.values() if s > 0]
    floor = min(positive) / 3 if positive else 1e-2
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    fams = sorted(set(fam_of.values()))
    on_front = {lab for lab, _, _, _ in frontier(group)}
    # the colour scale spans the parities' costs; the no-parity controls (cost 0) are grey
    costs = [c for _, _, c in means.values() if c > 0]
    lo, hi = (min(costs), max(costs)) if costs else (1.0, 1.0)
    if hi - lo < 0.05:
        lo, hi = lo - 0.05, hi + 0.05
    norm = Normalize(vmin=lo, vmax=hi)
    cmap = plt.get_cmap("viridis")
    n_label = 0
    for i, fam in enumerate(fams):
        labs = [lab for lab in means if fam_of[lab] == fam]
        xs = [max(means[lab][0], floor) for lab in labs]
        ys = [means[lab][1] for lab in labs]
        colours = [cmap(norm(means[lab][2])) if means[lab][2] > 0 else (0.6, 0.6, 0.6, 1.0) for lab in labs]
        ax.scatter(
            xs,
            ys,
            c=colours,
            marker=_MARKERS[i % len(_MARKERS)],
            label=fam,
            s=40,
            edgecolors="k",
            linewidths=0.4,
        )
        for lab, x, y in zip(labs, xs, ys, strict=True):
            # only the frontier's points are labelled, staggered (labels of every variant overlap)
            extra = lab[len(fam) :].replace("split=auto", "").strip()
            if extra and lab in on_front:
                dy = (-10, 5, -18)[n_label % 3]
                ax.annotate(extra, (x, y), fontsize=6, xytext=(4, dy), textcoords="offset points")
                n_label += 1
    # the frontier: variants not beaten by a cheaper-or-equal, more accurate one
    front = [(max(s, floor), a) for _, s, a, _ in frontier(group)]
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="k", lw=1, alpha=0.6)
    fig.colorbar(
        plt.cm.ScalarMappable(norm=norm, cmap=cmap),
        ax=ax,
        label="parity cost (× one data model; grey: no parity)",
    )
    ax.set_xscale("log")
    ax.set_xlabel(f"build seconds (log; zero-cost methods drawn at {floor:.2g} s)")
    ax.set_ylabel("reconstruction accuracy (test, mean over seeds)")
    ax.set_title(
        f"accuracy/cost: {group['dataset']} {group['arch']} {group['scenario']} k={group['k']} r={group['r']}"
    )
    ax.grid(alpha=0.3)
    leg = ax.legend(fontsize=7, loc="lower right")
    for h in leg.legend_handles:
        h.set_facecolor("lightgrey")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(paths: Iterable[str | Path], out_dir: str | Path) -> dict:
    """Aggregate runs and write ``report.md``, ``summary.csv``, ``accuracy.png``
    and one ``frontier_<group>.png`` per group under ``out_dir``."""
    results = load_results(paths)
    if not results:
        raise CoinferError("no results to report")
    groups = aggregate(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = ["# coinfer experiment report\n"]
    files = {"accuracy": str(plot_accuracy(groups, out / "accuracy.png")), "frontier": []}
    for g in groups:
        md.append(markdown_table(g))
        f = plot_frontier(g, out / f"frontier_{_slug(g)}.png")
        files["frontier"].append(str(f))
        md.append(f"![frontier]({f.name})\n")
    md.append("![accuracy](accuracy.png)\n")
    text = "\n".join(md)
    (out / "report.md").write_text(text)
    with open(out / "summary.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["dataset", "arch", "scenario", "k", "r", "family", "n_seeds"]
            + [f"{m}_{s}" for m, _ in _SHOWN for s in ("mean", "std")]
            + ["seconds_mean", "seconds_std", "parity_cost_mean"]
        )
        for g in groups:
            for r in g["methods"]:
                w.writerow(
                    [g["dataset"], g["arch"], g["scenario"], g["k"], g["r"], r["family"], r["n"]]
                    + [f"{v:.4f}" for m, _ in _SHOWN for v in r[m]]
                    + [f"{v:.3f}" for v in r["seconds"]]
                    + [f"{r['parity_cost'][0]:.3f}"]
                )
    files["markdown"] = str(out / "report.md")
    files["csv"] = str(out / "summary.csv")
    return {"groups": groups, "markdown": text, "files": files}

"""Coding over queries with the Berrut (ApproxIFER) code, on real data.

The one model F is the base model an experiment config trains (the common
initialisation of its k data models, trained on its own share of the training
set; loaded from the run cache when it was trained before). The test set is cut
into groups of K queries; each group goes to N = K + 1 workers (one extra) and
F's answer to each query is read back with one worker late, averaged over which
worker is late. Reported per K:

* **agreement**: the decoded top-1 equals F's own top-1 (over every query of a
  group, and over the late worker's query only when it was a systematic one);
* **degraded accuracy**: the decoded answers' test accuracy, against F's own.

Beside it, on the same groups, the two baselines of one extra worker:

* **ParM** (addition encoder): a parity model of F's architecture, started
  from F and trained (``--epochs`` of Adam, MSE in logits) on the pool's
  inputs so that P(Σ X) ≈ Σ F(X); the late query is P(Σ X) − Σ_{i≠j} F(X_i);
* **cheap backup**: an MLP student with at most 1/K of F's FLOPs (one hidden
  layer, as wide as fits), distilled from F on the pool, answering every query
  of the group; the late query is the student's answer.

For these two the late worker is a data worker (the extra worker's lateness
costs nothing), so "agreement, the late query" is the figure to compare.

With N = K + 2 workers it also tries to *locate* a corrupted worker (its logits
replaced by random ones of the same mean and spread), with the threshold set to
the 99th percentile of the clean answers' score (so about 1 % false alarms).

    python benchmarks/query_coding.py experiments/mnist_iid_k2r1.toml \\
        experiments/fashion_iid_k2r1.toml experiments/cifar10_iid_k2r1_reduced.toml \\
        --out benchmarks/results/query_coding.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from coinfer import build_model
from coinfer.experiments.config import load_config
from coinfer.experiments.run import prepare_data, train_models
from coinfer.query import BerrutCode, parm_decode, train_backup, train_parm
from coinfer.split import count_flops


def _groups(x: torch.Tensor, k: int) -> torch.Tensor:
    g = len(x) // k
    return x[: g * k].reshape(g, k, *x.shape[1:]).transpose(0, 1)  # (k, groups, ...)


@torch.no_grad()
def _answers(model, code: BerrutCode, queries: torch.Tensor, batch: int = 1000) -> dict[int, torch.Tensor]:
    u = code.encode(queries.double()).float()
    return {
        i: torch.cat([model(u[i][s : s + batch]) for s in range(0, u.shape[1], batch)]).double()
        for i in range(code.n)
    }


def _locate_rates(code: BerrutCode, answers: dict[int, torch.Tensor], seed: int = 0) -> dict[str, float]:
    clean, _ = code.inconsistency(answers)
    thr = float(torch.quantile(clean, 0.99))
    g = torch.Generator().manual_seed(seed)
    located = []
    for bad in range(code.n):
        corrupt = dict(answers)
        y = answers[bad]
        corrupt[bad] = torch.randn(y.shape, generator=g, dtype=y.dtype) * y.std() + y.mean()
        r, who = code.inconsistency(corrupt)
        located.append(float(((r > thr) & (who == bad)).double().mean()))
    return {
        "threshold": thr,
        "false_alarms": float((clean > thr).double().mean()),
        "located": float(np.mean(located)),
    }


def _student(model, x: torch.Tensor, k: int, classes: int) -> torch.nn.Module:
    """The widest one-hidden-layer MLP with at most 1/k of ``model``'s FLOPs."""
    budget = count_flops(model, x[:1]) / k
    d = int(x[0].numel())
    hidden = max(1, int(budget // (2 * (d + classes))))
    return build_model(
        {"name": "mlp", "kwargs": {"in_features": d, "hidden": [hidden], "num_classes": classes}}
    )


def _learned(model, pool: torch.Tensor, x, own, labels, k: int, epochs: int) -> dict:
    """ParM and cheap-backup figures for groups of k test queries."""
    q, truth, ys = _groups(x, k), _groups(own, k), _groups(labels, k)
    out = {}
    t0 = time.perf_counter()
    parity = train_parm(model, pool, k, epochs=epochs, progress=False)
    with torch.no_grad():
        p = torch.cat([parity(q[:, s : s + 1000].sum(0)) for s in range(0, q.shape[1], 1000)]).double()
    agree, acc = [], []
    for j in range(k):
        rec = parm_decode(p, [truth[i] for i in range(k) if i != j])
        agree.append(float((rec.argmax(-1) == truth[j].argmax(-1)).double().mean()))
        acc.append(float((rec.argmax(-1) == ys[j]).double().mean()))
    out["parm"] = {
        "agreement_late_query": float(np.mean(agree)),
        "late_query_accuracy": float(np.mean(acc)),
        "seconds": time.perf_counter() - t0,
    }
    t0 = time.perf_counter()
    student = _student(model, x, k, own.shape[-1])
    flops = count_flops(student, x[:1]) / count_flops(model, x[:1])
    student = train_backup(model, student, pool, epochs=epochs, progress=False)
    with torch.no_grad():
        b = torch.cat([student(x[s : s + 1000]) for s in range(0, len(x), 1000)]).double()
    hit = b.argmax(-1) == own.argmax(-1)
    out["backup"] = {
        "agreement_late_query": float(hit.double().mean()),
        "late_query_accuracy": float((b.argmax(-1) == labels).double().mean()),
        "student_flops_share": flops,
        "seconds": time.perf_counter() - t0,
    }
    return out


def run(config: Path, ks: list[int], limit: int | None, epochs: int) -> dict:
    cfg = load_config(config)
    torch.manual_seed(0)
    data = prepare_data(cfg, 0)
    model = train_models(cfg, data, 0, progress=False).base.eval()
    x, y = data.ds.x_test, data.ds.y_test
    if limit:
        x, y = x[:limit], y[:limit]
    with torch.no_grad():
        own = torch.cat([model(x[s : s + 1000]) for s in range(0, len(x), 1000)]).double()
    out = {
        "config": str(config),
        "dataset": cfg.dataset,
        "arch": data.spec,
        "test_queries": len(x),
        "base_accuracy": float((own.argmax(-1) == y).double().mean()),
        "rows": [],
    }
    for k in ks:
        q, truth, labels = _groups(x, k), _groups(own, k), _groups(y, k)
        t0 = time.perf_counter()
        code = BerrutCode(k, k + 1)
        ans = _answers(model, code, q)
        agree, agree_sys, acc = [], [], []
        for late in range(code.n):
            dec = code.decode({i: a for i, a in ans.items() if i != late})
            hit = dec.argmax(-1) == truth.argmax(-1)
            agree.append(float(hit.double().mean()))
            if late < k:
                agree_sys.append(float(hit[late].double().mean()))
            acc.append(float((dec.argmax(-1) == labels).double().mean()))
        row = {
            "k": k,
            "n": k + 1,
            "agreement": float(np.mean(agree)),
            "agreement_late_query": float(np.mean(agree_sys)),
            "degraded_accuracy": float(np.mean(acc)),
            "degraded_over_base": float(np.mean(acc)) / out["base_accuracy"],
            "seconds": time.perf_counter() - t0,
        }
        code2 = BerrutCode(k, k + 2)
        row["locate_n_k_plus_2"] = _locate_rates(code2, _answers(model, code2, q))
        row.update(_learned(model, data.pool_x, x, own, y, k, epochs))
        out["rows"].append(row)
        print(
            f"{cfg.dataset} K={k}: agreement {row['agreement']:.3f} (late query {row['agreement_late_query']:.3f}), "
            f"degraded acc {row['degraded_accuracy']:.3f} / base {out['base_accuracy']:.3f}; "
            f"N=K+2 locate {row['locate_n_k_plus_2']['located']:.3f} at "
            f"{row['locate_n_k_plus_2']['false_alarms']:.3f} false alarms; the late query: ParM "
            f"{row['parm']['agreement_late_query']:.3f}, backup {row['backup']['agreement_late_query']:.3f}"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="+", type=Path, help="experiment configs whose base model is F")
    ap.add_argument("--k", default="2,4,8", help="group sizes K (comma-separated)")
    ap.add_argument("--limit", type=int, default=None, help="first N test queries only")
    ap.add_argument("--epochs", type=int, default=5, help="training epochs of ParM and the backup")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/query_coding.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(v) for v in args.k.split(",")]
    res = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
            "processor": platform.processor() or platform.machine(),
        },
        "epochs": args.epochs,
        "runs": [run(c, ks, args.limit, args.epochs) for c in args.configs],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

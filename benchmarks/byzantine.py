"""Locating a corrupt worker under model coding (``Code.locate``), on real data.

An experiment config's k data models (trained, or loaded from the run cache)
and ``--r`` heads parities built on its calibration inputs. On the test set
every worker answers; then one worker's answer is corrupted, in turn each of
the n = k + r workers:

* ``random``: random probabilities (a Dirichlet(1) draw per query);
* ``other``: another worker's answer (data worker i answers as data worker i+1;
  a parity as data worker 0).

The threshold is the 99th percentile of the clean outputs' residual
(``Code.residual``) on the validation split, never the test set. Reported per corruption kind: how often the
corrupt worker is named (located), how often a clean set raises an alarm
(false alarms, on test), and how often the served answer (every data model's
top-1, decoded from the workers left after dropping the named one) equals the
clean answer.

    python benchmarks/byzantine.py experiments/mnist_class-split_k2r1.toml --r 2 \\
        --out benchmarks/results/byzantine_mnist_k2r2.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from coinfer import Code, encode, predict_probs
from coinfer.experiments.config import load_config
from coinfer.experiments.run import prepare_data, train_models


def _probs(models, x: torch.Tensor) -> dict[int, torch.Tensor]:
    return {i: predict_probs(m, x).double() for i, m in enumerate(models)}


def _corrupt(kind: str, bad: int, outs: dict[int, torch.Tensor], k: int, g: torch.Generator) -> torch.Tensor:
    y = outs[bad]
    if kind == "random":
        e = -torch.log(torch.rand(y.shape, generator=g, dtype=y.dtype))
        return e / e.sum(-1, keepdim=True)
    src = (bad + 1) % k if bad < k else 0
    return outs[src]


def run(config: Path, r: int, seed: int = 0) -> dict:
    cfg = load_config(config)
    data = prepare_data(cfg, seed)
    models = [m.eval() for m in train_models(cfg, data, seed, progress=False).models]
    code = Code(cfg.k, r)
    coded = encode(models, code, data.calib_x, method="heads", progress=False)
    workers = models + list(coded)
    val, test = _probs(workers, data.val_x), _probs(workers, data.ds.x_test)
    threshold = float(torch.quantile(code.residual(val), 0.99))
    clean_top1 = torch.stack([test[j] for j in range(cfg.k)]).argmax(-1)  # (k, N)
    out = {
        "config": str(config),
        "k": cfg.k,
        "r": r,
        "parity_cost": coded.info["parity_cost"],
        "threshold": threshold,
        "false_alarms": float((code.locate(test, threshold) != -1).double().mean()),
        "kinds": {},
    }
    g = torch.Generator().manual_seed(seed)
    for kind in ("random", "other"):
        located, served = [], []
        for bad in range(code.n):
            outs = dict(test)
            outs[bad] = _corrupt(kind, bad, test, cfg.k, g)
            named = code.locate(outs, threshold)
            located.append(float((named == bad).double().mean()))
            # serve: drop the named worker (nothing named: drop none) and decode from the rest
            answer = torch.empty_like(clean_top1)
            for w in [-1, *range(code.n)]:
                mask = named == w
                if not mask.any():
                    continue
                keep = {i: v[mask] for i, v in outs.items() if i != w}
                dec = code.decode({i: keep[i] for i in code.choose_rows(keep.keys())}, project=True)
                answer[:, mask] = dec.argmax(-1)
            served.append(float((answer == clean_top1).double().mean()))
        out["kinds"][kind] = {
            "located": sum(located) / len(located),
            "located_per_worker": located,
            "served_agrees_with_clean": sum(served) / len(served),
        }
        print(
            f"{config.stem} k={cfg.k} r={r} {kind}: located {out['kinds'][kind]['located']:.3f}, "
            f"served = clean {out['kinds'][kind]['served_agrees_with_clean']:.3f}; "
            f"false alarms {out['false_alarms']:.4f} (threshold {threshold:.3g})"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="+", type=Path)
    ap.add_argument("--r", type=int, default=2, help="parities (r >= 2 to locate)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/byzantine.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads},
        "runs": [run(c, args.r) for c in args.configs],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

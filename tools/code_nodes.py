"""Search Cauchy nodes for the default parity weights of ``Code(k, r)``, r >= 2.

The default W is a positive Cauchy matrix ``1 / (x_i + y_j)`` with rows
normalised to sum to one, so every k-subset of ``[I_k; W]`` is invertible for
any distinct positive nodes. Decoding multiplies the coded models' error by up
to the condition number of the rows used, so this script picks the nodes that
minimise the worst condition number over every decodable erasure pattern
(Nelder-Mead on log-nodes, several starts, nodes capped at 1e4), and prints the
table that ``coinfer/code.py`` embeds as ``_NODES``:

    python tools/code_nodes.py --kmax 6 --rmax 3
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
from scipy.optimize import minimize

CAP = 1e4


def weights(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    c = 1.0 / (x[:, None] + y[None, :])
    return c / c.sum(axis=1, keepdims=True)


def decode_rows(k: int, r: int) -> np.ndarray:
    """Rows of the generator used to decode each pattern (as Code.choose_rows)."""
    n, out = k + r, []
    for size in range(1, r + 1):
        for pat in itertools.combinations(range(n), size):
            if not any(i < k for i in pat):
                continue
            avail = [i for i in range(n) if i not in pat]
            data = [i for i in avail if i < k]
            par = [i for i in avail if i >= k]
            out.append(data + par[: k - len(data)])
    return np.array(out)


def worst_cond(w: np.ndarray, rows: np.ndarray) -> float:
    k = w.shape[1]
    g = np.vstack([np.eye(k), w])
    return float(np.linalg.cond(g[rows]).max())


def heuristic(k: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(r) * 2.0 + 0.5, np.arange(k) + 0.5


def search(k: int, r: int, starts: int, seed: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    rows = decode_rows(k, r)
    x0, y0 = heuristic(k, r)
    base = worst_cond(weights(x0, y0), rows)

    def f(z):
        z = np.clip(z, -8, np.log(CAP))
        return np.log(worst_cond(weights(np.exp(z[:r]), np.exp(z[r:])), rows))

    rng = np.random.default_rng(seed)
    best = None
    for t in range(starts):
        z0 = np.log(np.concatenate([x0, y0])) + (rng.normal(0, 0.7, r + k) if t else 0.0)
        res = minimize(f, z0, method="Nelder-Mead", options={"maxiter": 4000, "xatol": 1e-5, "fatol": 1e-7})
        if best is None or res.fun < best.fun:
            best = res
    z = np.clip(best.x, -8, np.log(CAP))
    x, y = np.exp(z[:r]), np.exp(z[r:])
    return x, y, base, worst_cond(weights(x, y), rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kmax", type=int, default=6)
    ap.add_argument("--rmax", type=int, default=3)
    ap.add_argument("--starts", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print("_NODES = {")
    for r in range(2, args.rmax + 1):
        for k in range(2, args.kmax + 1):
            x, y, base, opt = search(k, r, args.starts, args.seed)
            print(f"    # worst condition number {opt:.1f} (heuristic nodes: {base:.1f})")
            print(f"    ({k}, {r}): ({[round(float(v), 6) for v in x]}, {[round(float(v), 6) for v in y]}),")
    print("}")


if __name__ == "__main__":
    main()

"""Build an MNIST LeNet-5 bundle for the serving benchmarks.

k data models are fine-tuned copies of one base model, each on a disjoint slice
of the training set (``--split slices``: all ten classes, so every model's top-1
can be checked against the labels; ``--split classes``: model j only sees its
own contiguous block of classes, as in ``coinfer demo``, so a reconstructed
output is only right if decoding recovers that model's specialism); r coded
models are encoded with ``--method`` (``coin`` by default, or ``heads``). Also
writes the normalised test set as ``x``/``y`` in an ``.npz`` for
``coinfer bench latency``.

    python benchmarks/make_mnist_bundle.py DATA/mnist.npz --k 2 --r 1 --out runs/mnist-k2r1
    python benchmarks/make_mnist_bundle.py DATA/mnist.npz --k 2 --r 1 --split classes --out runs/mnist-cls-k2r1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from coinfer import Bundle, Code, build_model, encode
from coinfer.experiments.data import class_split
from coinfer.experiments.train import accuracy, finetune_copies, fit

MEAN, STD = 0.1307, 0.3081
ARCH = {"name": "lenet5", "kwargs": {}}


def _norm(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((x.astype(np.float32) / 255.0 - MEAN) / STD)[:, None])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="mnist.npz with x_train, y_train, x_test, y_test (uint8)")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--r", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True, help="bundle directory")
    ap.add_argument("--test-out", type=Path, help="test-set .npz (default: OUT.test.npz)")
    ap.add_argument("--train-samples", type=int, default=24000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--split", choices=["slices", "classes"], default="slices", help="data of each model")
    ap.add_argument("--method", default="coin", help="encoder of the coded models (coin, heads, ...)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with np.load(args.data) as z:
        xtr, ytr, xte, yte = z["x_train"], z["y_train"], z["x_test"], z["y_test"]
    g = np.random.default_rng(args.seed)
    idx = g.permutation(len(xtr))[: args.train_samples]
    x, y = _norm(xtr[idx]), torch.from_numpy(ytr[idx].astype(np.int64))
    x_test, y_test = _norm(xte), torch.from_numpy(yte.astype(np.int64))
    n_base = len(x) // 3
    torch.manual_seed(args.seed)
    base = fit(build_model(ARCH), x[:n_base], y[:n_base], epochs=args.epochs, lr=2e-3, seed=args.seed)
    rest_x, rest_y = x[n_base:], y[n_base:]
    if args.split == "classes":
        splits = class_split(10, args.k)
        masks = [torch.isin(rest_y, torch.tensor(c)) for c in splits]
        parts = [(rest_x[m], rest_y[m]) for m in masks]
    else:
        splits = [list(range(10))] * args.k
        parts = [(px, py) for px, py in zip(rest_x.chunk(args.k), rest_y.chunk(args.k), strict=True)]
    models = finetune_copies(base, parts, seed=args.seed, epochs=args.epochs, lr=1e-3)
    code = Code(args.k, args.r)
    coded = encode(models, code, rest_x[:512], method=args.method)
    bundle = Bundle(ARCH, code, models, list(coded), (1, 28, 28), [str(i) for i in range(10)], coded.info)
    bundle.save(args.out, overwrite=True)
    test_out = args.test_out or args.out.with_suffix(".test.npz")
    np.savez_compressed(test_out, x=x_test.numpy(), y=y_test.numpy())
    accs = [accuracy(m, x_test, y_test) for m in models + list(coded)]
    own = [torch.isin(y_test, torch.tensor(c)) for c in splits]
    task = [accuracy(m, x_test[o], y_test[o]) for m, o in zip(models, own, strict=True)]
    info = {
        "bundle": str(args.out),
        "test": str(test_out),
        "k": args.k,
        "r": args.r,
        "split": args.split,
        "method": args.method,
        "classes": splits,
        "test_accuracy": accs,
        "task_accuracy": task,
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()

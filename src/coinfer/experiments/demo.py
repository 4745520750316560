"""The main job on the embedded default: scikit-learn's digits, k = 2, r = 1.

Trains a base model on a held-out third of the training set, fine-tunes two
copies on disjoint class halves, encodes a parity with ``heads`` (merged trunk
+ each model's refit head), ``coin`` and ``average``, and measures each model's
decoded outputs when it is erased. The ``heads`` bundle is the one saved (and
served by ``coinfer demo``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from coinfer.architectures import build_model
from coinfer.bundle import Bundle
from coinfer.code import Code
from coinfer.encoders import encode
from coinfer.experiments.data import class_split, load_digits
from coinfer.experiments.evaluate import evaluate_patterns, target_mixture_tv
from coinfer.experiments.train import accuracy, finetune_copies, fit
from coinfer.predict import predict_probs

__all__ = ["run_demo"]

ARCH = {"name": "mlp", "kwargs": {"in_features": 64, "hidden": [64], "num_classes": 10}}


def run_demo(out: str | Path = "runs/demo", seed: int = 0, progress: bool | None = None) -> dict:
    """Train, encode and evaluate; save the ``heads`` bundle under ``out``.

    Returns a dict with the models' accuracies and, per method, the decoded
    metrics of each erased model."""
    t0 = time.perf_counter()
    ds = load_digits(seed=seed)
    k = 2
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(ds.x_train), generator=g)
    n_base = len(perm) // 3
    base_idx, rest = perm[:n_base], perm[n_base:]
    torch.manual_seed(seed)
    base = build_model(ARCH)
    fit(
        base,
        ds.x_train[base_idx],
        ds.y_train[base_idx],
        epochs=10,
        lr=3e-3,
        seed=seed,
        progress=progress,
        desc="base model",
    )
    splits = class_split(ds.num_classes, k)
    parts, task_masks = [], []
    for classes in splits:
        cls = torch.tensor(classes)
        m = torch.isin(ds.y_train[rest], cls)
        parts.append((ds.x_train[rest][m], ds.y_train[rest][m]))
        task_masks.append(torch.isin(ds.y_test, cls))
    models = finetune_copies(base, parts, seed=seed, epochs=30, lr=3e-3, progress=progress)
    code = Code(k, 1)
    calib = ds.x_train[rest]
    result = {"models": [], "methods": {}, "bundle": None}
    for j, m in enumerate(models):
        mask = task_masks[j]
        result["models"].append(
            {
                "classes": splits[j],
                "task_acc": accuracy(m, ds.x_test[mask], ds.y_test[mask]),
                "test_acc": accuracy(m, ds.x_test, ds.y_test),
            }
        )
    data_out = torch.stack([predict_probs(m, ds.x_test) for m in models])
    candidates = {
        "heads": lambda: encode(models, code, calib, method="heads", progress=progress),
        "coin": lambda: encode(models, code, calib, method="coin", progress=progress),
        "average": lambda: encode(models, code, calib, method="average"),
        "base (control)": lambda: [base],
    }
    for name, build in candidates.items():
        coded = build()
        outputs = torch.cat([data_out, torch.stack([predict_probs(c, ds.x_test) for c in coded])])
        rows = evaluate_patterns(code, outputs, ds.y_test, task_masks)
        info = getattr(coded, "info", {})
        result["methods"][name] = {
            "rows": rows,
            "coded_tv": target_mixture_tv(code, outputs),
            "build_seconds": info.get("seconds", 0.0),
            "parity_cost": info.get("parity_cost", 1.0),
        }
        if name == "heads":
            bundle = Bundle(ARCH, code, models, list(coded), ds.input_shape, ds.class_names, coded.info)
            result["bundle"] = str(bundle.save(out, overwrite=True))
    result["seconds"] = time.perf_counter() - t0
    return result

"""One experiment run (a config and a seed), step by step.

:func:`run_seed` does, left to right, one function per step:

1. :func:`prepare_data` — load the dataset; carve a validation split and a
   held-out *base* part out of the training set (the rest is the *pool*);
   partition the pool by the scenario; draw the calibration sample;
2. :func:`train_models` — train the base model (the common initialisation)
   on the base part, then fine-tune k copies on their partitions; every
   trained model is cached on disk under a hash of its whole configuration;
3. :func:`coinfer.experiments.presets.build_variants` and :func:`build_coded`
   — build the coded models of every method variant in the config (see the
   presets table) and the controls;
4. :func:`evaluate_variant` — decode every erasure pattern on the validation
   and the test split and measure reconstruction accuracy, decoded task
   accuracy, TV, negative mass, build cost and parity cost;
5. :func:`select_on_validation` — choose each method's hyper-parameters
   (calibration size, ε, epochs, ...) by validation reconstruction accuracy,
   never on test;
6. :func:`write_results` — write ``results.json`` and ``results.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from coinfer.architectures import build_model
from coinfer.code import Code
from coinfer.errors import CoinferError
from coinfer.experiments.config import ExperimentConfig, TrainConfig
from coinfer.experiments.data import Dataset, load_dataset, random_crop_flip
from coinfer.experiments.evaluate import evaluate_estimates, evaluate_patterns, summarize, target_mixture_tv
from coinfer.experiments.presets import BuildContext, Variant, build_variants
from coinfer.experiments.scenarios import Partition, partition
from coinfer.experiments.train import accuracy, fit
from coinfer.predict import predict_probs

__all__ = [
    "run_experiment",
    "run_seed",
    "prepare_data",
    "train_models",
    "build_coded",
    "evaluate_variant",
    "select_on_validation",
    "write_results",
    "write_csv",
]


# --------------------------------------------------------------------------- trained models, cached
def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _train_cached(
    key: dict,
    cache_dir: Path,
    make: Callable[[], nn.Module],
    train: Callable[[nn.Module], None],
) -> tuple[nn.Module, dict]:
    """Load the model trained under ``key`` from the cache, or train and store it."""
    h = _hash(key)
    path, meta_path = cache_dir / f"{h}.pt", cache_dir / f"{h}.json"
    model = make()
    if path.is_file() and meta_path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.eval()
        meta = json.loads(meta_path.read_text())
        meta["cached"] = True
        return model, meta
    t0 = time.perf_counter()
    train(model)
    meta = {"key": key, "hash": h, "train_seconds": time.perf_counter() - t0}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    meta_path.write_text(json.dumps(meta, indent=1, default=str))
    meta["cached"] = False
    return model, meta


@dataclass
class _Splits:
    val: torch.Tensor
    base: torch.Tensor
    pool: torch.Tensor


def _splits(n: int, cfg: ExperimentConfig, seed: int) -> _Splits:
    g = torch.Generator().manual_seed(10_000 + seed)
    perm = torch.randperm(n, generator=g)
    n_val = int(cfg.val_size) if cfg.val_size >= 1 else int(round(cfg.val_size * n))
    if not 0 < n_val < n:
        raise CoinferError(f"val_size {cfg.val_size} gives {n_val} of {n} training samples")
    rest = perm[n_val:]
    n_base = int(round(cfg.base_fraction * len(rest)))
    if n_base < 1 or n_base >= len(rest):
        raise CoinferError(f"base_fraction {cfg.base_fraction} leaves no base or no pool samples")
    return _Splits(perm[:n_val], rest[:n_base], rest[n_base:])


def _fit_kwargs(tc: TrainConfig, progress: bool | None) -> dict:
    return {
        "epochs": tc.epochs,
        "lr": tc.lr,
        "batch_size": tc.batch_size,
        "weight_decay": tc.weight_decay,
        "optimizer": tc.optimizer,
        "augment": random_crop_flip if tc.augment else None,
        "progress": progress,
    }


# --------------------------------------------------------------------------- step 1: data
@dataclass
class RunData:
    """The dataset of one run and how it is split (step 1)."""

    ds: Dataset
    spec: dict  #: the architecture spec, sizes filled in from the data
    splits: _Splits
    part: Partition
    calib_x: torch.Tensor  #: the largest calibration sample, drawn from the pool
    calib_y: torch.Tensor
    val_masks: list[torch.Tensor]  #: per model, which validation samples are its task's
    test_masks: list[torch.Tensor]

    @property
    def val_x(self) -> torch.Tensor:
        return self.ds.x_train[self.splits.val]

    @property
    def val_y(self) -> torch.Tensor:
        return self.ds.y_train[self.splits.val]

    @property
    def pool_x(self) -> torch.Tensor:
        return self.ds.x_train[self.splits.pool]


def prepare_data(cfg: ExperimentConfig, seed: int) -> RunData:
    """Load the data, split it (validation / base / pool), partition the pool among
    the k models by the scenario, and draw a seeded calibration sample of the pool
    (the coder sees the k models' training inputs)."""
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.train_limit, cfg.test_limit)
    sp = _splits(len(ds.x_train), cfg, seed)
    part = partition(ds.y_train[sp.pool], cfg.scenario, cfg.k, ds.num_classes, seed=seed, alpha=cfg.alpha)
    g = torch.Generator().manual_seed(20_000 + seed)
    cperm = sp.pool[torch.randperm(len(sp.pool), generator=g)[: max(cfg.calibration_sizes)]]
    return RunData(
        ds=ds,
        spec=cfg.arch_spec(ds),
        splits=sp,
        part=part,
        calib_x=ds.x_train[cperm],
        calib_y=ds.y_train[cperm],
        val_masks=part.task_masks(ds.y_train[sp.val]),
        test_masks=part.task_masks(ds.y_test),
    )


# --------------------------------------------------------------------------- step 2: training
@dataclass
class Trained:
    """The base model, the k fine-tuned data models, and what is known about them (step 2)."""

    base: nn.Module
    models: list[nn.Module]
    base_info: dict
    models_info: list[dict]


def train_models(cfg: ExperimentConfig, data: RunData, seed: int, progress: bool | None = None) -> Trained:
    """Train the base model on the base part and fine-tune one copy per partition,
    each loaded from the cache when the same configuration was trained before;
    then measure their accuracies."""
    ds, sp, spec = data.ds, data.splits, data.spec
    cache = Path(cfg.cache_dir)
    common = {
        "data": ds.fingerprint(),
        "arch": spec,
        "val_size": cfg.val_size,
        "base_fraction": cfg.base_fraction,
        "seed": seed,
    }
    base_key = {**common, "role": "base", "train": dataclasses.asdict(cfg.base)}

    def make() -> nn.Module:
        torch.manual_seed(seed)
        return build_model(spec)

    base, base_meta = _train_cached(
        base_key,
        cache,
        make,
        lambda m: fit(
            m,
            ds.x_train[sp.base],
            ds.y_train[sp.base],
            seed=seed,
            desc="base model",
            **_fit_kwargs(cfg.base, progress),
        ),
    )
    models, model_meta = [], []
    for i, idx in enumerate(data.part.indices):
        gi = sp.pool[idx]
        key = {
            **common,
            "role": "finetune",
            "base": base_meta["hash"] if "hash" in base_meta else _hash(base_key),
            "scenario": cfg.scenario,
            "alpha": cfg.alpha if cfg.scenario == "dirichlet" else None,
            "k": cfg.k,
            "index": i,
            "train": dataclasses.asdict(cfg.finetune),
        }

        def train_copy(m: nn.Module, gi=gi, i=i) -> None:
            m.load_state_dict(base.state_dict())
            fit(
                m,
                ds.x_train[gi],
                ds.y_train[gi],
                seed=seed * 100 + i + 1,
                desc=f"fine-tune model {i}",
                **_fit_kwargs(cfg.finetune, progress),
            )

        m, meta = _train_cached(key, cache, make, train_copy)
        models.append(m)
        model_meta.append((meta, len(gi)))

    xv, yv, tm, vm = data.val_x, data.val_y, data.test_masks, data.val_masks
    models_info = [
        {
            "index": i,
            "task_classes": data.part.task_classes[i],
            "train_samples": n_train,
            "task_test_acc": accuracy(m, ds.x_test[tm[i]], ds.y_test[tm[i]]),
            "test_acc": accuracy(m, ds.x_test, ds.y_test),
            "task_val_acc": accuracy(m, xv[vm[i]], yv[vm[i]]),
            "train_seconds": meta["train_seconds"],
            "cached": meta["cached"],
        }
        for i, (m, (meta, n_train)) in enumerate(zip(models, model_meta, strict=True))
    ]
    base_info = {
        "train_samples": len(sp.base),
        "test_acc": accuracy(base, ds.x_test, ds.y_test),
        "train_seconds": base_meta["train_seconds"],
        "cached": base_meta["cached"],
    }
    return Trained(base, models, base_info, models_info)


# --------------------------------------------------------------------------- steps 3-4: build, evaluate
def build_coded(variant: Variant, seed: int) -> tuple[list[nn.Module], dict]:
    """Build one variant's coded models (torch seeded first, so a rebuild is identical)."""
    if variant.build is None:
        raise CoinferError(f"variant {variant.label!r} builds no coded models")
    torch.manual_seed(seed)
    return variant.build()


def parity_cost(variant: Variant, info: dict | None) -> float:
    """The coded model's inference cost in units of one data model: the encoder's
    ``info["parity_cost"]`` when it reports one, else 1.0 (a coded model with the
    data models' architecture); 0 for the no-parity controls."""
    if variant.build is None:
        return 0.0
    return float((info or {}).get("parity_cost", 1.0))


@dataclass
class _Outputs:
    """The k data models' softmax outputs on validation and test, computed once per run."""

    val: torch.Tensor
    test: torch.Tensor


def evaluate_variant(
    variant: Variant,
    *,
    code: Code,
    data: RunData,
    outputs: _Outputs,
    seed: int,
) -> dict:
    """Build ``variant`` (if it has coded models), decode every erasure pattern on
    validation and test, and return its result record."""
    ds, patterns = data.ds, code.erasure_patterns()
    xv, yv = data.val_x, data.val_y
    rec: dict[str, Any] = {"family": variant.family, "label": variant.label, "params": variant.params}
    if variant.build is None:
        fn = variant.estimates
        rows_val = evaluate_estimates(outputs.val, fn(outputs.val, patterns), yv, data.val_masks)
        rows = evaluate_estimates(outputs.test, fn(outputs.test, patterns), ds.y_test, data.test_masks)
        rec.update({"seconds": 0.0, "forward_passes": 0, "backward_passes": 0, "coded_tv": None})
        rec["parity_cost"] = parity_cost(variant, None)
    else:
        coded, info = build_coded(variant, seed)
        out_val = torch.cat([outputs.val, torch.stack([predict_probs(c, xv) for c in coded])])
        out_test = torch.cat([outputs.test, torch.stack([predict_probs(c, ds.x_test) for c in coded])])
        rows_val = evaluate_patterns(code, out_val, yv, data.val_masks, patterns)
        rows = evaluate_patterns(code, out_test, ds.y_test, data.test_masks, patterns)
        rec.update(
            {
                "seconds": float(info.get("seconds", 0.0)),
                "forward_passes": int(info.get("forward_passes", 0)),
                "backward_passes": int(info.get("backward_passes", 0)),
                "parity_cost": parity_cost(variant, info),
                "coded_tv": target_mixture_tv(code, out_test),
                "coded_test_acc": [
                    float((out_test[code.k + j].argmax(-1) == ds.y_test).float().mean())
                    for j in range(code.r)
                ],
            }
        )
        for key in (
            "fisher_totals",
            "fallback_entries",
            "split",
            "rank",
            "alpha",
            "parity_costs",
            "trunk",
            "trunk_groups",
            "refit_layers",
            "heldout_recon",
            "calibration_recon",
            "polish_seconds",
        ):
            if key in info:
                rec[key] = info[key]
    rec["val"] = summarize(rows_val)
    rec["test"] = summarize(rows)
    rec["rows"] = rows
    return rec


# --------------------------------------------------------------------------- step 5: selection
def select_on_validation(records: list[dict]) -> None:
    """Mark, per method family, the variant with the best validation reconstruction
    accuracy (ties: the faster build, then the first) as ``chosen``; test is never read."""
    for fam in dict.fromkeys(r["family"] for r in records):
        cands = [r for r in records if r["family"] == fam]
        best = max(cands, key=lambda r: (r["val"]["reconstruction_acc"], -r["seconds"]))
        for r in cands:
            r["chosen"] = r is best


# --------------------------------------------------------------------------- step 6: results
def _machine() -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def write_results(result: dict, cfg: ExperimentConfig) -> Path:
    """Write ``results.json`` and ``results.csv`` under ``out_dir/name/seed<seed>``; returns the directory."""
    run_dir = Path(cfg.out_dir) / cfg.name / f"seed{result['seed']}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(result, indent=1, default=float))
    write_csv(result, run_dir / "results.csv")
    return run_dir


# --------------------------------------------------------------------------- one run
def run_seed(cfg: ExperimentConfig, seed: int, progress: bool | None = None) -> dict:
    """Run one seed of ``cfg`` (the steps above); writes ``results.json`` and
    ``results.csv`` under ``out_dir/name/seed<seed>`` and returns the results dict."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    data = prepare_data(cfg, seed)
    trained = train_models(cfg, data, seed, progress)
    code = Code(cfg.k, cfg.r, cfg.code_weights)
    ctx = BuildContext(
        cfg=cfg,
        models=trained.models,
        base=trained.base,
        code=code,
        calib_x=data.calib_x,
        calib_y=data.calib_y,
        pool_x=data.pool_x,
        seed=seed,
        progress=progress,
    )
    outputs = _Outputs(
        val=torch.stack([predict_probs(m, data.val_x) for m in trained.models]),
        test=torch.stack([predict_probs(m, data.ds.x_test) for m in trained.models]),
    )
    show = sys.stderr.isatty() if progress is None else progress
    records = [
        evaluate_variant(v, code=code, data=data, outputs=outputs, seed=seed)
        for v in tqdm(build_variants(ctx), desc="methods", disable=not show, leave=False)
    ]
    select_on_validation(records)
    sp, ds = data.splits, data.ds
    out = {
        "config": cfg.to_dict(),
        "seed": seed,
        "dataset": ds.name,
        "arch": data.spec,
        "scenario": cfg.scenario,
        "k": cfg.k,
        "r": cfg.r,
        "splits": {"val": len(sp.val), "base": len(sp.base), "pool": len(sp.pool), "test": len(ds.x_test)},
        "machine": _machine(),
        "base_model": trained.base_info,
        "models": trained.models_info,
        "methods": records,
        "seconds": time.perf_counter() - t_start,
    }
    out["run_dir"] = str(write_results(out, cfg))
    return out


CSV_FIELDS = [
    "dataset",
    "scenario",
    "k",
    "r",
    "seed",
    "family",
    "label",
    "chosen",
    "seconds",
    "forward_passes",
    "backward_passes",
    "parity_cost",
    *[f"test_{m}" for m in ("reconstruction_acc", "reconstruction_acc_task", "decoded_task_acc")],
    *[f"test_{m}" for m in ("own_task_acc", "tv", "negative_mass")],
    "val_reconstruction_acc",
    "coded_tv",
    "fisher_totals",
]


def write_csv(result: dict, path: str | Path) -> None:
    """One CSV row per method variant of a run (test metrics, validation choice, cost)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in result["methods"]:
            row = {
                "dataset": result["dataset"],
                "scenario": result["scenario"],
                "k": result["k"],
                "r": result["r"],
                "seed": result["seed"],
                "family": r["family"],
                "label": r["label"],
                "chosen": r["chosen"],
                "seconds": f"{r['seconds']:.4f}",
                "forward_passes": r["forward_passes"],
                "backward_passes": r["backward_passes"],
                "parity_cost": f"{r['parity_cost']:.4g}",
                "val_reconstruction_acc": f"{r['val']['reconstruction_acc']:.4f}",
                "coded_tv": "" if r["coded_tv"] is None else ";".join(f"{t:.4f}" for t in r["coded_tv"]),
                "fisher_totals": ";".join(f"{t:.4g}" for t in r.get("fisher_totals", [])),
            }
            for m, v in r["test"].items():
                row[f"test_{m}"] = f"{v:.4f}"
            w.writerow(row)


def run_experiment(
    cfg: ExperimentConfig,
    progress: bool | None = None,
    on_result: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run every seed of ``cfg``; returns the per-seed results."""
    cfg.validate()
    out = []
    for s in cfg.seeds:
        res = run_seed(cfg, s, progress=progress)
        if on_result is not None:
            on_result(res)
        out.append(res)
    return out

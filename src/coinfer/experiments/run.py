"""Experiments: COIN against the baselines on real data, end to end.

One run (a config and a seed) does, left to right:

1. load the dataset; carve a validation split and a held-out *base* part out
   of the training set (the rest is the *pool*);
2. train the base model (the common initialisation) on the base part, then
   fine-tune k copies on the scenario's partition of the pool; every trained
   model is cached on disk under a hash of its whole configuration;
3. build the coded models with every method variant (``coin`` with each
   Fisher estimator and calibration size, ``average``, ``distill`` in its
   forms, ``coin+distill``) and the controls (``base``, ``substitute``,
   ``default``);
4. decode every erasure pattern on the validation and the test split and
   measure reconstruction accuracy, decoded task accuracy, TV, negative mass;
5. choose each method's hyper-parameters (calibration size, ε, epochs) by
   validation reconstruction accuracy — never on test — and write
   ``results.json`` and ``results.csv``.

Configs are :class:`ExperimentConfig` dataclasses, loadable from TOML.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from coinfer.architectures import build_model
from coinfer.code import Code
from coinfer.encoders import encode
from coinfer.errors import CoinferError
from coinfer.experiments.data import Dataset, load_dataset, random_crop_flip
from coinfer.experiments.evaluate import (
    default_estimates,
    evaluate_estimates,
    evaluate_patterns,
    substitute_estimates,
    summarize,
    target_mixture_tv,
)
from coinfer.experiments.scenarios import SCENARIOS, Partition, partition
from coinfer.experiments.train import accuracy, fit
from coinfer.predict import predict_probs

__all__ = [
    "TrainConfig",
    "ExperimentConfig",
    "METHOD_PRESETS",
    "DEFAULT_METHODS",
    "load_config",
    "run_experiment",
    "run_seed",
]

#: Method families an experiment can run. Each expands into variants over the
#: config's hyper-parameter grids (calibration sizes, ε, epochs).
METHOD_PRESETS: dict[str, str] = {
    "coin-exact": "COIN, exact Fisher",
    "coin-sampled": "COIN, sampled Fisher (y ~ p)",
    "coin-empirical": "COIN, empirical Fisher (true labels)",
    "coin-exact-norm": "COIN, exact Fisher, per-model Fisher normalised",
    "coin-sampled-norm": "COIN, sampled Fisher, normalised",
    "coin-empirical-norm": "COIN, empirical Fisher, normalised",
    "average": "w-weighted parameter average",
    "distill-common": "learned parity from the common init, on the pool's inputs",
    "distill-random": "learned parity from a random init (ParM), on the pool's inputs",
    "distill-calib": "learned parity from the common init, calibration inputs only (compute-matched)",
    "coin+distill-calib": "COIN (exact) then distillation on the calibration inputs",
    "coin+distill-train": "COIN (exact) then distillation on the pool's inputs",
    "base": "control: the common initialisation as the coded model (zero cost)",
    "substitute": "no parity: the erased output replaced by the survivors' mean",
    "default": "no parity: a constant (uniform) answer",
}

DEFAULT_METHODS: list[str] = [
    "coin-exact",
    "coin-sampled",
    "coin-empirical",
    "coin-exact-norm",
    "average",
    "distill-common",
    "distill-random",
    "distill-calib",
    "coin+distill-calib",
    "coin+distill-train",
    "base",
    "substitute",
    "default",
]

_DEFAULT_ARCH = {"digits": "mlp", "mnist": "lenet5", "fashion_mnist": "lenet5", "cifar10": "resnet20"}


@dataclass
class TrainConfig:
    """How one model is trained (see :func:`coinfer.experiments.train.fit`)."""

    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    optimizer: str = "adam"  #: adam | sgd (Nesterov momentum 0.9)
    augment: bool = False  #: random crop + flip (CIFAR)


@dataclass
class ExperimentConfig:
    """Everything one experiment needs; every field has a default that runs on digits."""

    name: str = "experiment"
    dataset: str = "digits"  #: digits | mnist | fashion_mnist | cifar10 | a path
    data_dir: str | None = None
    train_limit: int | None = None  #: keep the first N training samples
    test_limit: int | None = None  #: keep the first N test samples
    scenario: str = "class-split"  #: class-split | dirichlet | iid
    alpha: float = 0.5  #: Dirichlet concentration
    k: int = 2
    r: int = 1
    arch: str = "auto"  #: mlp | lenet5 | resnet20 | package.module:factory; auto by dataset
    arch_kwargs: dict = field(default_factory=dict)
    val_size: float = 0.1  #: validation split: a fraction (< 1) or a count of training samples
    base_fraction: float = 1 / 3  #: share of the remaining training data held out for the base model
    base: TrainConfig = field(default_factory=TrainConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3))
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    calibration_sizes: list[int] = field(default_factory=lambda: [250, 1000])
    coin_eps: list[float] = field(default_factory=lambda: [1e-12])
    fisher_backend: str = "auto"  #: diagonal_fisher backend of coin: auto | layers | vmap | loop
    code_weights: list[list[float]] | None = None  #: parity weights W (r x k); None: Code's default
    distill_epochs: list[int] = field(default_factory=lambda: [1, 5])
    coin_distill_epochs: list[int] = field(default_factory=lambda: [1])
    distill_lr: float = 1e-3
    distill_batch_size: int = 64
    seeds: list[int] = field(default_factory=lambda: [0])
    out_dir: str = "runs/experiments"
    cache_dir: str = "runs/cache"
    threads: int | None = None  #: torch threads (None: leave torch's default)

    def arch_spec(self, ds: Dataset) -> dict:
        """The architecture spec, with input/output sizes filled in from the data."""
        name = self.arch if self.arch != "auto" else _DEFAULT_ARCH.get(ds.name, "mlp")
        kw = dict(self.arch_kwargs)
        shape = ds.input_shape
        if name == "mlp":
            kw.setdefault("in_features", int(math.prod(shape)))
            kw.setdefault("num_classes", ds.num_classes)
        elif name == "lenet5":
            kw.setdefault("in_channels", shape[0])
            kw.setdefault("image_size", shape[-1])
            kw.setdefault("num_classes", ds.num_classes)
        elif name == "resnet20":
            kw.setdefault("in_channels", shape[0])
            kw.setdefault("num_classes", ds.num_classes)
        return {"name": name, "kwargs": kw}

    def validate(self) -> None:
        """Refuse impossible settings with a message naming the field."""
        if self.scenario not in SCENARIOS:
            raise CoinferError(f"scenario must be one of {list(SCENARIOS)}, got {self.scenario!r}")
        if self.k < 2:
            raise CoinferError(f"k must be >= 2, got {self.k}")
        if not 1 <= self.r <= self.k:
            raise CoinferError(f"r must be in 1..k = {self.k}, got {self.r}")
        unknown = [m for m in self.methods if m not in METHOD_PRESETS]
        if unknown:
            raise CoinferError(f"unknown method(s) {unknown}: expected some of {list(METHOD_PRESETS)}")
        if not self.methods:
            raise CoinferError("methods is empty")
        if not self.seeds:
            raise CoinferError("seeds is empty")
        if not 0 < self.base_fraction < 1:
            raise CoinferError(f"base_fraction must be in (0, 1), got {self.base_fraction}")
        if not self.calibration_sizes or min(self.calibration_sizes) < 1:
            raise CoinferError(f"calibration_sizes must be positive counts, got {self.calibration_sizes}")
        if not self.distill_epochs or not self.coin_distill_epochs:
            raise CoinferError("distill_epochs and coin_distill_epochs must not be empty")
        from coinfer.fisher import BACKENDS

        if self.fisher_backend not in BACKENDS:
            raise CoinferError(f"fisher_backend must be one of {BACKENDS}, got {self.fisher_backend!r}")
        if self.code_weights is not None:
            Code(self.k, self.r, self.code_weights)  # raises CodeError naming the problem

    def to_dict(self) -> dict:
        """JSON-able form."""
        return dataclasses.asdict(self)


def load_config(path: str | Path, **overrides: Any) -> ExperimentConfig:
    """Read an :class:`ExperimentConfig` from TOML (top-level keys, ``[base]`` and
    ``[finetune]`` tables); ``overrides`` that are not None replace fields."""
    import tomllib

    p = Path(path)
    if not p.is_file():
        raise CoinferError(f"config file {p} does not exist")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise CoinferError(f"config file {p} is not valid TOML: {exc}") from None
    return config_from_dict(raw, source=str(p), **overrides)


def config_from_dict(raw: dict, source: str = "config", **overrides: Any) -> ExperimentConfig:
    """Build a config from a dict (as read from TOML), refusing unknown keys."""
    raw = dict(raw)
    known = {f.name for f in dataclasses.fields(ExperimentConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CoinferError(f"{source}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    tkeys = {f.name for f in dataclasses.fields(TrainConfig)}
    for sect in ("base", "finetune"):
        if sect in raw:
            if not isinstance(raw[sect], dict):
                raise CoinferError(f"{source}: [{sect}] must be a table")
            bad = sorted(set(raw[sect]) - tkeys)
            if bad:
                raise CoinferError(f"{source}: [{sect}] has unknown key(s) {bad}; known: {sorted(tkeys)}")
            raw[sect] = TrainConfig(**raw[sect])
    for k, v in overrides.items():
        if v is not None:
            if k not in known:
                raise CoinferError(f"unknown config field {k!r}")
            raw[k] = v
    cfg = ExperimentConfig(**raw)
    cfg.validate()
    return cfg


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


# --------------------------------------------------------------------------- method variants
@dataclass
class _Variant:
    family: str
    label: str
    params: dict  # the hyper-parameters chosen on validation
    kind: str  # "parity" | "control"
    build: Callable[[], tuple[list[nn.Module], dict]] | None = None


def _variants(
    cfg: ExperimentConfig,
    models: list[nn.Module],
    base: nn.Module,
    code: Code,
    calib_x: torch.Tensor,
    calib_y: torch.Tensor,
    pool_x: torch.Tensor,
    seed: int,
    progress: bool | None,
) -> list[_Variant]:
    out: list[_Variant] = []
    n_max = max(cfg.calibration_sizes)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in base.modules())

    def calib(n: int):
        return (calib_x[:n], calib_y[:n])

    def run(method: str, n: int, **opts) -> Callable[[], tuple[list[nn.Module], dict]]:
        def f():
            res = encode(models, code, calib(n), method=method, **opts)
            return list(res), res.info

        return f

    for fam in cfg.methods:
        if fam.startswith("coin-"):
            est = fam.split("-")[1]
            norm = fam.endswith("-norm")
            for n in cfg.calibration_sizes:
                for eps in cfg.coin_eps:
                    label = f"{fam} n={n}" + (f" eps={eps:g}" if len(cfg.coin_eps) > 1 else "")
                    out.append(
                        _Variant(
                            fam,
                            label,
                            {"calibration": n, "eps": eps},
                            "parity",
                            run(
                                "coin",
                                n,
                                estimator=est,
                                normalize=norm,
                                eps=eps,
                                seed=seed,
                                backend=cfg.fisher_backend,
                                progress=progress,
                            ),
                        )
                    )
        elif fam == "average":
            out.append(
                _Variant(
                    fam,
                    f"average n={n_max}" if has_bn else "average",
                    {"calibration": n_max} if has_bn else {},
                    "parity",
                    run("average", n_max, buffers="recompute" if has_bn else "average"),
                )
            )
        elif fam in ("distill-common", "distill-random"):
            init: Any = base if fam == "distill-common" else "random"
            for e in cfg.distill_epochs:
                out.append(
                    _Variant(
                        fam,
                        f"{fam} E={e}",
                        {"epochs": e},
                        "parity",
                        run(
                            "distill",
                            n_max,
                            init=init,
                            epochs=e,
                            lr=cfg.distill_lr,
                            batch_size=cfg.distill_batch_size,
                            train_inputs=pool_x,
                            seed=seed,
                            progress=progress,
                        ),
                    )
                )
        elif fam == "distill-calib":
            for n in cfg.calibration_sizes:
                for e in cfg.distill_epochs:
                    out.append(
                        _Variant(
                            fam,
                            f"{fam} n={n} E={e}",
                            {"calibration": n, "epochs": e},
                            "parity",
                            run(
                                "distill",
                                n,
                                init=base,
                                epochs=e,
                                lr=cfg.distill_lr,
                                batch_size=cfg.distill_batch_size,
                                seed=seed,
                                progress=progress,
                            ),
                        )
                    )
        elif fam in ("coin+distill-calib", "coin+distill-train"):
            for e in cfg.coin_distill_epochs:
                out.append(
                    _Variant(
                        fam,
                        f"{fam} n={n_max} E={e}",
                        {"calibration": n_max, "epochs": e},
                        "parity",
                        run(
                            "distill",
                            n_max,
                            init="coin",
                            epochs=e,
                            lr=cfg.distill_lr,
                            batch_size=cfg.distill_batch_size,
                            train_inputs=pool_x if fam.endswith("train") else None,
                            seed=seed,
                            coin={
                                "estimator": "exact",
                                "seed": seed,
                                "backend": cfg.fisher_backend,
                                "progress": progress,
                            },
                            progress=progress,
                        ),
                    )
                )
        elif fam == "base":

            def f(b=base):
                return [copy.deepcopy(b) for _ in range(code.r)], {
                    "method": "base",
                    "seconds": 0.0,
                    "forward_passes": 0,
                    "backward_passes": 0,
                }

            out.append(_Variant(fam, "base", {}, "parity", f))
        else:  # substitute, default
            out.append(_Variant(fam, fam, {}, "control", None))
    return out


# --------------------------------------------------------------------------- one run
def _machine() -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def run_seed(cfg: ExperimentConfig, seed: int, progress: bool | None = None) -> dict:
    """Run one seed of ``cfg``; writes ``results.json`` and ``results.csv`` under
    ``out_dir/name/seed<seed>`` and returns the results dict."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.train_limit, cfg.test_limit)
    spec = cfg.arch_spec(ds)
    sp = _splits(len(ds.x_train), cfg, seed)
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
    part: Partition = partition(
        ds.y_train[sp.pool], cfg.scenario, cfg.k, ds.num_classes, seed=seed, alpha=cfg.alpha
    )
    models, model_meta = [], []
    for i, idx in enumerate(part.indices):
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

    test_masks = part.task_masks(ds.y_test)
    xv, yv = ds.x_train[sp.val], ds.y_train[sp.val]
    val_masks = part.task_masks(yv)
    info_models = []
    for i, m in enumerate(models):
        meta, n_train = model_meta[i]
        info_models.append(
            {
                "index": i,
                "task_classes": part.task_classes[i],
                "train_samples": n_train,
                "task_test_acc": accuracy(m, ds.x_test[test_masks[i]], ds.y_test[test_masks[i]]),
                "test_acc": accuracy(m, ds.x_test, ds.y_test),
                "task_val_acc": accuracy(m, xv[val_masks[i]], yv[val_masks[i]]),
                "train_seconds": meta["train_seconds"],
                "cached": meta["cached"],
            }
        )
    base_info = {
        "train_samples": len(sp.base),
        "test_acc": accuracy(base, ds.x_test, ds.y_test),
        "train_seconds": base_meta["train_seconds"],
        "cached": base_meta["cached"],
    }
    code = Code(cfg.k, cfg.r, cfg.code_weights)
    patterns = code.erasure_patterns()
    data_test = torch.stack([predict_probs(m, ds.x_test) for m in models])
    data_val = torch.stack([predict_probs(m, xv) for m in models])
    # calibration: a seeded sample of the pool (the coder sees the k models' training inputs)
    g = torch.Generator().manual_seed(20_000 + seed)
    cperm = sp.pool[torch.randperm(len(sp.pool), generator=g)[: max(cfg.calibration_sizes)]]
    calib_x, calib_y = ds.x_train[cperm], ds.y_train[cperm]
    pool_x = ds.x_train[sp.pool]
    variants = _variants(cfg, models, base, code, calib_x, calib_y, pool_x, seed, progress)
    show = sys.stderr.isatty() if progress is None else progress
    results = []
    for v in tqdm(variants, desc="methods", disable=not show, leave=False):
        rec: dict[str, Any] = {"family": v.family, "label": v.label, "params": v.params}
        if v.kind == "control":
            fn = substitute_estimates if v.family == "substitute" else default_estimates
            rows_val = evaluate_estimates(data_val, fn(data_val, patterns), yv, val_masks)
            rows = evaluate_estimates(data_test, fn(data_test, patterns), ds.y_test, test_masks)
            rec.update({"seconds": 0.0, "forward_passes": 0, "backward_passes": 0, "coded_tv": None})
        else:
            torch.manual_seed(seed)
            coded, info = v.build()
            out_val = torch.cat([data_val, torch.stack([predict_probs(c, xv) for c in coded])])
            out_test = torch.cat([data_test, torch.stack([predict_probs(c, ds.x_test) for c in coded])])
            rows_val = evaluate_patterns(code, out_val, yv, val_masks, patterns)
            rows = evaluate_patterns(code, out_test, ds.y_test, test_masks, patterns)
            rec.update(
                {
                    "seconds": float(info.get("seconds", 0.0)),
                    "forward_passes": int(info.get("forward_passes", 0)),
                    "backward_passes": int(info.get("backward_passes", 0)),
                    "coded_tv": target_mixture_tv(code, out_test),
                    "coded_test_acc": [
                        float((out_test[cfg.k + j].argmax(-1) == ds.y_test).float().mean())
                        for j in range(code.r)
                    ],
                }
            )
            if "fisher_totals" in info:
                rec["fisher_totals"] = info["fisher_totals"]
            if "fallback_entries" in info:
                rec["fallback_entries"] = info["fallback_entries"]
        rec["val"] = summarize(rows_val)
        rec["test"] = summarize(rows)
        rec["rows"] = rows
        results.append(rec)
    # hyper-parameters chosen per family on validation reconstruction accuracy
    for fam in dict.fromkeys(r["family"] for r in results):
        cands = [r for r in results if r["family"] == fam]
        best = max(cands, key=lambda r: (r["val"]["reconstruction_acc"], -r["seconds"]))
        for r in cands:
            r["chosen"] = r is best
    out = {
        "config": cfg.to_dict(),
        "seed": seed,
        "dataset": ds.name,
        "arch": spec,
        "scenario": cfg.scenario,
        "k": cfg.k,
        "r": cfg.r,
        "splits": {"val": len(sp.val), "base": len(sp.base), "pool": len(sp.pool), "test": len(ds.x_test)},
        "machine": _machine(),
        "base_model": base_info,
        "models": info_models,
        "methods": results,
        "seconds": time.perf_counter() - t_start,
    }
    run_dir = Path(cfg.out_dir) / cfg.name / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(out, indent=1, default=float))
    write_csv(out, run_dir / "results.csv")
    out["run_dir"] = str(run_dir)
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
        rows.append(row)
    return rows

"""Experiment configs: dataclasses with defaults that run on digits, loadable from TOML."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coinfer.architectures import normalize_spec
from coinfer.code import Code
from coinfer.errors import ArchitectureError, CoinferError
from coinfer.experiments.data import Dataset
from coinfer.experiments.presets import DEFAULT_METHODS, PRESETS, check_presets
from coinfer.experiments.scenarios import SCENARIOS

__all__ = ["TrainConfig", "ExperimentConfig", "load_config", "config_from_dict"]

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
    #: mlp | lenet5 | resnet20 | vit | package.module:factory, or {name = ..., kwargs = {...}}; auto by dataset
    arch: str | dict = "auto"
    arch_kwargs: dict = field(default_factory=dict)
    val_size: float = 0.1  #: validation split: a fraction (< 1) or a count of training samples
    base_fraction: float = 1 / 3  #: share of the remaining training data held out for the base model
    base: TrainConfig = field(default_factory=TrainConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3))
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))  #: names in PRESETS
    calibration_sizes: list[int] = field(default_factory=lambda: [250, 1000])
    coin_eps: list[float] = field(default_factory=lambda: [1e-12])
    fisher_backend: str = "auto"  #: diagonal_fisher backend of coin: auto | layers | vmap | loop
    code_weights: list[list[float]] | None = None  #: parity weights W (r x k); None: Code's default
    distill_epochs: list[int] = field(default_factory=lambda: [1, 5])
    coin_distill_epochs: list[int] = field(default_factory=lambda: [1])
    distill_lr: float = 1e-3
    distill_batch_size: int = 64
    heads_splits: list[str] = field(default_factory=lambda: ["auto"])  #: split points of a heads parity
    seeds: list[int] = field(default_factory=lambda: [0])
    out_dir: str = "runs/experiments"
    cache_dir: str = "runs/cache"
    threads: int | None = None  #: torch threads (None: leave torch's default)

    def _arch(self) -> tuple[str, dict]:
        """``arch`` as (name, kwargs): a string, or an inline table merged with ``arch_kwargs``."""
        if isinstance(self.arch, str):
            return self.arch, dict(self.arch_kwargs)
        if not isinstance(self.arch, Mapping):
            raise CoinferError(
                f"arch must be a name or a table {{name = ..., kwargs = {{...}}}}, got {self.arch!r}"
            )
        extra = sorted(set(self.arch) - {"name", "kwargs"})
        if extra:
            raise CoinferError(f"arch table has unknown key(s) {extra}: expected name and kwargs")
        try:
            spec = normalize_spec(self.arch)
        except ArchitectureError as exc:
            raise CoinferError(f"arch: {exc}") from None
        if spec["kwargs"] and self.arch_kwargs:
            raise CoinferError(
                "give architecture kwargs either in the arch table or in arch_kwargs, not both"
            )
        return spec["name"], {**spec["kwargs"], **self.arch_kwargs}

    def arch_spec(self, ds: Dataset) -> dict:
        """The architecture spec, with input/output sizes filled in from the data."""
        name, kw = self._arch()
        if name == "auto":
            name = _DEFAULT_ARCH.get(ds.name, "mlp")
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
        elif name == "vit":
            kw.setdefault("in_channels", shape[0])
            kw.setdefault("image_size", shape[-1])
            kw.setdefault("patch_size", 7 if shape[-1] % 7 == 0 else 4)
            kw.setdefault("num_classes", ds.num_classes)
        return {"name": name, "kwargs": kw}

    def validate(self) -> None:
        """Refuse impossible settings with a message naming the field; also checks
        every chosen method's options, so a bad value fails before any training."""
        if self.scenario not in SCENARIOS:
            raise CoinferError(f"scenario must be one of {list(SCENARIOS)}, got {self.scenario!r}")
        if self.k < 2:
            raise CoinferError(f"k must be >= 2, got {self.k}")
        if not 1 <= self.r <= self.k:
            raise CoinferError(f"r must be in 1..k = {self.k}, got {self.r}")
        if not self.methods:
            raise CoinferError("methods is empty")
        unknown = [m for m in self.methods if m not in PRESETS]
        if unknown:
            raise CoinferError(f"unknown method(s) {unknown}: expected some of {list(PRESETS)}")
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
        self._arch()
        check_presets(self)

    def to_dict(self) -> dict:
        """JSON-able form."""
        return dataclasses.asdict(self)


def load_config(path: str | Path, **overrides: Any) -> ExperimentConfig:
    """Read an :class:`ExperimentConfig` from TOML (top-level keys, ``[base]`` and
    ``[finetune]`` tables); ``overrides`` that are not None replace fields."""
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

"""Each encoder's options, with their allowed values declared beside them.

An options class is a dataclass plus a ``constraints`` table, one entry per
field: an :class:`Allowed` (a test and the words of what it expects), combined
with ``|``. :meth:`Options.validate` checks every field before any work and
names the method, the option, the value and what was expected::

    coin option 'estimator' must be one of ('exact', 'sampled', 'empirical'), got 'exakt'

This is scikit-learn's declared parameter constraints, in the small: the
allowed values are data next to the defaults, not a comment beside them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from coinfer.errors import OptionError
from coinfer.fisher import BACKENDS, ESTIMATORS

__all__ = [
    "Allowed",
    "Options",
    "FisherOptions",
    "CoinOptions",
    "AverageOptions",
    "DistillOptions",
    "HeadsOptions",
    "BUFFER_MODES",
    "DISTILL_INITS",
    "TRUNKS",
    "DEFAULT_REGMEAN_ALPHA",
    "one_of",
    "integer",
    "real",
    "show_progress",
]

BUFFER_MODES = ("recompute", "average")
DISTILL_INITS = ("random", "average", "coin")
#: RegMean's default scale of the Gram matrices' off-diagonals (Jin et al. use 0.9)
DEFAULT_REGMEAN_ALPHA = 0.9
#: how a heads parity's trunk is merged; "auto" compares AUTO_TRUNKS on held-out data
TRUNKS = ("average", "regmean", "auto", "coin")


# --------------------------------------------------------------------------- constraints
@dataclass(frozen=True)
class Allowed:
    """An allowed set of values: ``test(value)`` and the words for it ("an integer >= 1")."""

    test: Callable[[Any], bool]
    expected: str

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except (TypeError, ValueError):
            return False

    def __or__(self, other: Allowed) -> Allowed:
        return Allowed(lambda v: self(v) or other(v), f"{self.expected} or {other.expected}")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def one_of(values: Sequence[Any]) -> Allowed:
    """Exactly one of ``values``."""
    vals = tuple(values)
    return Allowed(lambda v: isinstance(v, str | int | float | type(None)) and v in vals, f"one of {vals}")


def integer(low: int | None = None) -> Allowed:
    """An integer, at least ``low`` if given."""
    words = "an integer" if low is None else f"an integer >= {low}"
    return Allowed(lambda v: _is_int(v) and (low is None or v >= low), words)


def real(
    low: float | None = None, high: float | None = None, *, open_low: bool = False, words: str | None = None
) -> Allowed:
    """A finite number in ``[low, high]`` (``(low, high]`` with ``open_low``)."""
    if words is None:
        if low is not None and high is not None:
            words = f"a number in {'(' if open_low else '['}{low}, {high}]"
        elif low is not None:
            words = f"a finite number {'>' if open_low else '>='} {low}"
        else:
            words = "a finite number"

    def test(v: Any) -> bool:
        if not _is_real(v):
            return False
        if low is not None and (v <= low if open_low else v < low):
            return False
        return high is None or v <= high

    return Allowed(test, words)


NONE = Allowed(lambda v: v is None, "None")
BOOL = Allowed(lambda v: isinstance(v, bool), "True or False")
PROGRESS = Allowed(lambda v: v is None or isinstance(v, bool), "None, True or False")


def show_progress(progress: bool | None) -> bool:
    """Whether to draw progress bars: ``progress``, or (None) when stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else progress


def _shown(value: Any) -> str:
    return f"a {type(value).__name__}" if isinstance(value, torch.Tensor | nn.Module) else repr(value)


class Options:
    """Base of every options dataclass: :meth:`validate` checks ``constraints``."""

    #: field name -> what it allows; every field must be listed
    constraints: ClassVar[dict[str, Allowed]] = {}
    #: the method named in error messages
    method: ClassVar[str] = "encoder"

    def validate(self, method: str | None = None) -> None:
        """Refuse values outside the declared ranges before any work, naming the option."""
        method = method or self.method
        table = type(self).constraints
        missing = [f.name for f in dataclasses.fields(self) if f.name not in table]  # type: ignore[arg-type]
        if missing:
            raise TypeError(
                f"{type(self).__name__}: fields {missing} have no declared constraint; "
                "add them to its constraints table"
            )
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            allowed = table[f.name]
            value = getattr(self, f.name)
            if not allowed(value):
                raise OptionError(
                    f"{method} option {f.name!r} must be {allowed.expected}, got {_shown(value)}"
                )

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # each class's table extends its bases' (a subclass declares only its new fields)
        merged: dict[str, Allowed] = {}
        for base in reversed(cls.__mro__[1:]):
            merged.update(getattr(base, "constraints", {}))
        merged.update(cls.__dict__.get("constraints", {}))
        cls.constraints = merged


def _check_table(cls: type) -> type:
    """Fail at import when a field has no declared constraint (or a constraint no field)."""
    names = {f.name for f in dataclasses.fields(cls)}
    if names != set(cls.constraints):
        raise TypeError(
            f"{cls.__name__}: fields {sorted(names - set(cls.constraints))} have no constraint, "
            f"constraints {sorted(set(cls.constraints) - names)} have no field"
        )
    return cls


# --------------------------------------------------------------------------- the options
@dataclass
class FisherOptions(Options):
    """The Fisher estimate behind a COIN merge (shared by ``coin`` and ``heads``)."""

    method: ClassVar[str] = "coin"

    estimator: str = "exact"  #: exact | sampled | empirical
    num_samples: int | None = None  #: calibration samples used (None: all)
    eps: float = 1e-12  #: where Σ w_i F_i < eps, fall back to the w-weighted average
    normalize: bool = False  #: rescale each model's Fisher to the same total
    batch_size: int | None = None  #: Fisher chunk size (None: the backend's default)
    backend: str = "auto"  #: Fisher backend: auto | layers | vmap | loop (see diagonal_fisher)
    seed: int = 0  #: seed of the sampled estimator (and of heads' held-out split)
    progress: bool | None = None  #: progress bars (None: when stderr is a terminal)

    constraints: ClassVar[dict[str, Allowed]] = {
        "estimator": one_of(ESTIMATORS),
        "num_samples": integer(1) | NONE,
        "eps": real(0),
        "normalize": BOOL,
        "batch_size": integer(1) | NONE,
        "backend": one_of(BACKENDS),
        "seed": integer(),
        "progress": PROGRESS,
    }


@_check_table
@dataclass
class CoinOptions(FisherOptions):
    """Options of the ``coin`` encoder."""

    method: ClassVar[str] = "coin"

    buffers: str = "recompute"  #: recompute | average (BatchNorm statistics)

    constraints: ClassVar[dict[str, Allowed]] = {"buffers": one_of(BUFFER_MODES)}


@_check_table
@dataclass
class AverageOptions(Options):
    """Options of the ``average`` encoder."""

    method: ClassVar[str] = "average"

    buffers: str = "average"  #: average | recompute (BatchNorm statistics)

    constraints: ClassVar[dict[str, Allowed]] = {"buffers": one_of(BUFFER_MODES)}


_INPUTS = Allowed(
    lambda t: (
        t is None or (isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim >= 2 and len(t) > 0)
    ),
    "None or a non-empty floating (N, *input_shape) tensor",
)


@_check_table
@dataclass
class DistillOptions(Options):
    """Options of the ``distill`` encoder (learned parity, ParM-style baseline)."""

    method: ClassVar[str] = "distill"

    init: Any = "average"  #: an nn.Module, or "random" | "average" | "coin"
    epochs: int = 5
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    train_inputs: torch.Tensor | None = None  #: unlabeled inputs to train on (default: calibration)
    seed: int = 0
    coin: dict = field(default_factory=dict)  #: COIN options of init="coin" (see CoinOptions)
    progress: bool | None = None

    constraints: ClassVar[dict[str, Allowed]] = {
        "init": Allowed(
            lambda v: isinstance(v, nn.Module) or (isinstance(v, str) and v in DISTILL_INITS),
            f"an nn.Module or one of {DISTILL_INITS}",
        ),
        "epochs": integer(0),
        "lr": real(0, open_low=True),
        "weight_decay": real(0),
        "batch_size": integer(1),
        "train_inputs": _INPUTS,
        "seed": integer(),
        "coin": Allowed(lambda v: isinstance(v, dict), "a dict of coin options"),
        "progress": PROGRESS,
    }

    def validate(self, method: str | None = None) -> None:
        """As :meth:`Options.validate`, and the ``coin`` options of ``init="coin"`` too."""
        method = method or self.method
        super().validate(method)
        known = {f.name for f in dataclasses.fields(CoinOptions)}
        unknown = sorted(set(self.coin) - known)
        if unknown:
            raise OptionError(
                f"{method} option 'coin' must be coin options only, unknown {unknown}; known {sorted(known)}, "
                f"got {self.coin!r}"
            )
        CoinOptions(**self.coin).validate(f"{method} (coin init)")


def _ridge_strengths(a: Any) -> bool:
    vals = list(a) if isinstance(a, Sequence) and not isinstance(a, str) else [a]
    return bool(vals) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v) and v >= 0 for v in vals
    )


@_check_table
@dataclass
class HeadsOptions(FisherOptions):
    """Options of the ``heads`` encoder (the Fisher options apply to ``trunk="coin"``;
    ``num_samples``, ``seed`` and ``progress`` to every trunk)."""

    method: ClassVar[str] = "heads"

    split: str = "auto"  #: module name where the heads start, "input", or "auto"
    #: how the trunk is merged: average (w-average) | regmean (closed form from each model's
    #: layer-input Gram matrices) | auto (both, chosen on held-out data) | coin (Fisher-weighted)
    trunk: str = "average"
    regmean_alpha: float = DEFAULT_REGMEAN_ALPHA  #: RegMean's scale of the Gram off-diagonals, in [0, 1]
    #: how many merged trunks the heads share: 1, an integer (models split into that many
    #: groups, one trunk each), or "auto" (every count whose cost fits max_parity_cost)
    trunk_groups: int | str = "auto"
    refit: bool = True  #: ridge-refit each head's first layer(s) onto the merged features
    #: how many of the head's Linear/Conv2d layers to refit, in call order: "auto" (every depth
    #: tried, chosen on held-out data), an integer, or None (all)
    refit_depth: int | str | None = "auto"
    #: low-rank form: "auto" (split="auto" also tries DEFAULT_RANKS), an int, or None
    rank: int | str | None = "auto"
    max_parity_cost: float = 1.25  #: split="auto": largest parity FLOPs / one model's FLOPs
    alphas: Sequence[float] | None = None  #: ridge strengths tried, inf = copy (None: DEFAULT_ALPHAS)
    holdout: float = 0.2  #: share of the calibration inputs held out to choose α and the split
    #: epochs of distillation after the closed form: every head toward its own model's
    #: answers on the calibration inputs, trunk and heads trained together (0: off)
    polish_epochs: int = 0
    polish_lr: float = 1e-4  #: Adam learning rate of the polish

    constraints: ClassVar[dict[str, Allowed]] = {
        "split": Allowed(lambda v: isinstance(v, str) and bool(v), "a module name, 'input' or 'auto'"),
        "trunk": one_of(TRUNKS),
        "regmean_alpha": real(0, 1),
        "trunk_groups": integer(1) | Allowed(lambda v: v == "auto", "'auto'"),
        "refit": BOOL,
        "refit_depth": Allowed(
            lambda v: v is None or v == "auto" or (_is_int(v) and v >= 1),
            "'auto', an integer >= 1 or None (all)",
        ),
        "rank": Allowed(
            lambda v: v is None or v == "auto" or (_is_int(v) and v >= 1), "'auto', None or an integer >= 1"
        ),
        "max_parity_cost": real(1, words="a number >= 1 (one model's FLOPs)"),
        "alphas": Allowed(
            lambda v: v is None or _ridge_strengths(v),
            "None or non-negative ridge strengths (inf: copy the head)",
        ),
        "holdout": Allowed(lambda v: _is_real(v) and 0 < v < 1, "a fraction in (0, 1)"),
        "polish_epochs": integer(0),
        "polish_lr": real(0, open_low=True, words="a positive number"),
    }

"""Encoders: build the r coded (parity) models from k data models.

:data:`METHODS` is the one table of methods: a name, its options class (with
declared allowed values, :mod:`coinfer.options`) and its build function
``(models, code, x, y, opts) -> (coded models, info)``. :func:`encode`
checks the options, then the models and calibration inputs, then dispatches,
and adds what every method reports (``parity_cost``, ``calibration_recon``).

* ``heads`` (the default): a merged trunk with each model's own head, refit in
  closed form (:mod:`coinfer.heads`).
* ``coin``: Fisher-weighted averaging, ``θ_c = Σ w_i F_i θ_i / Σ w_i F_i``
  element-wise per parity row (Jhunjhunwala et al., ISIT 2024).
* ``average``: w-weighted parameter averaging.
* ``distill``: a learned parity trained on the KL-barycenter objective
  (cross-entropy against ``Σ w_i p_i(x)``), the ParM-style baseline
  (:mod:`coinfer.distill`).

Buffers (BatchNorm running statistics and the like) are never Fisher-weighted:
they are w-averaged, and by default BatchNorm statistics are then recomputed by
running the coded model over the calibration inputs.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from coinfer.checks import as_calibration, check_calibration, check_models
from coinfer.code import Code
from coinfer.distill import build_distill
from coinfer.heads import build_heads
from coinfer.merge import (
    coin_parities,
    finish_buffers,
    fisher_weighted_average,
    recompute_batchnorm,
    weighted_average,
)
from coinfer.options import (
    BUFFER_MODES,
    DISTILL_INITS,
    AverageOptions,
    CoinOptions,
    DistillOptions,
    HeadsOptions,
    Options,
)
from coinfer.predict import predict_probs
from coinfer.split import count_flops

__all__ = [
    "encode",
    "EncodeResult",
    "METHODS",
    "register",
    "HeadsOptions",
    "check_models",
    "CoinOptions",
    "AverageOptions",
    "DistillOptions",
    "BUFFER_MODES",
    "DISTILL_INITS",
    "weighted_average",
    "fisher_weighted_average",
    "recompute_batchnorm",
]


class EncodeResult(list):
    """The list of ``r`` coded models, with an ``info`` dict (method, options,
    build seconds, passes, Fisher totals)."""

    def __init__(self, models: Iterable[nn.Module], info: dict[str, Any]):
        super().__init__(models)
        self.info = info


@dataclass(frozen=True)
class Method:
    """One row of the methods table."""

    name: str
    options: type[Options]  #: its options dataclass (allowed values declared)
    fn: Callable  #: ``fn(models, code, x, y, opts) -> (coded models, info)``
    doc: str  #: one line for listings


def register(name: str, options: type):
    """Add a method of your own to :data:`METHODS`: decorates
    ``fn(models, code, calib_x, calib_y, opts) -> (models, info)``, with
    ``options`` the dataclass of its parameters (an :class:`~coinfer.options.Options`
    subclass gets its declared values checked)."""

    def deco(fn):
        METHODS[name] = Method(name, options, fn, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


# --------------------------------------------------------------------------- methods
def build_coin(models, code: Code, x, y, opts: CoinOptions):
    """Fisher-weighted parameter averaging (COIN)."""
    return coin_parities(models, code.weights, x, y, opts, opts.buffers)


def build_average(models, code: Code, x, y, opts: AverageOptions):
    """w-weighted parameter averaging."""
    coded = []
    for row in code.weights:
        m = weighted_average(models, row)
        finish_buffers(m, models, row, x, opts.buffers)
        coded.append(m)
    fwd = code.r * len(x) if opts.buffers == "recompute" else 0
    return coded, {"forward_passes": fwd, "backward_passes": 0}


#: The methods table: name -> options class and build function.
METHODS: dict[str, Method] = {
    "heads": Method(
        "heads", HeadsOptions, build_heads, "merged trunk + each model's own head, refit in closed form"
    ),
    "coin": Method("coin", CoinOptions, build_coin, "Fisher-weighted parameter averaging (COIN)"),
    "average": Method("average", AverageOptions, build_average, "w-weighted parameter averaging"),
    "distill": Method("distill", DistillOptions, build_distill, "learned parity trained toward the mixture"),
}


# --------------------------------------------------------------------------- entry point
def encode(
    models: Sequence[nn.Module],
    code: Code,
    calibration,
    method: str = "heads",
    input_shape: Sequence[int] | None = None,
    **options,
) -> EncodeResult:
    """Build the ``code.r`` coded models from ``code.k`` data models.

    Args:
        models: the ``k`` data models (same architecture, finite weights).
        code: the :class:`~coinfer.Code`; parity row ``j`` of ``code.weights``
            gives coded model ``j``.
        calibration: a ``(N, *input_shape)`` tensor, an ``(inputs, labels)``
            pair (labels needed by the ``empirical`` Fisher), or a DataLoader.
        method: a registered method name (see :data:`METHODS`); the default,
            ``"heads"``, reconstructs best on every measured setting.
        input_shape: if given, the per-sample shape the calibration must have.
        **options: the method's declared options (see its options dataclass).

    Returns:
        :class:`EncodeResult`, a list of ``r`` coded models with ``.info``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {sorted(METHODS)}")
    spec = METHODS[method]
    known = {f.name for f in dataclasses.fields(spec.options)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"method {method!r} got unknown options {unknown}; it accepts {sorted(known)}")
    opts = spec.options(**options)
    # option values are checked before any work
    validate = getattr(opts, "validate", None)
    if callable(validate):
        # Options.validate names the method; a user's own validate() may take no argument
        if isinstance(opts, Options) and inspect.signature(validate).parameters:
            validate(method)
        else:
            validate()
    if not isinstance(code, Code):
        raise TypeError(f"code must be a coinfer.Code, got {type(code).__name__}")
    check_models(models, code.k)
    _warn_unrelated(models)
    x, y = as_calibration(calibration)
    check_calibration(models, x, input_shape)
    start = time.perf_counter()
    coded, info = spec.fn(list(models), code, x, y, opts)
    for m in coded:
        m.eval()
    seconds = time.perf_counter() - start
    info.update(_figures(models, code, coded, x, info))
    info = {
        "method": method,
        "options": {
            f.name: getattr(opts, f.name)
            for f in dataclasses.fields(opts)
            if _jsonable(getattr(opts, f.name))
        },
        "seconds": seconds,
        **info,
    }
    return EncodeResult(coded, info)


#: Relative parameter distance above which two models look independently initialised
#: (two random initialisations are about sqrt(2) apart; fine-tuned copies of one model far less).
UNRELATED_DISTANCE = 1.0


def _warn_unrelated(models: Sequence[nn.Module]) -> None:
    """Warn when the models do not look like copies of one initialisation: merging
    their weights (every method but a distilled parity) then makes little sense."""
    with torch.no_grad():
        ref = list(models[0].parameters())
        norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in ref))
        if norm == 0:
            return
        far = [
            i
            for i, m in enumerate(models[1:], 1)
            if math.sqrt(
                sum(
                    float((p.detach().double() - q.detach().double()).pow(2).sum())
                    for p, q in zip(m.parameters(), ref, strict=True)
                )
            )
            / norm
            > UNRELATED_DISTANCE
        ]
    if far:
        warnings.warn(
            f"models {far} are far from model 0 in weight space (relative distance > {UNRELATED_DISTANCE}): "
            "they do not look fine-tuned from one initialisation, which merging a trunk assumes; "
            "train the k models from a common initialisation",
            stacklevel=3,
        )


#: Calibration inputs scored for ``calibration_recon`` (a bound on the cost of the check).
FIGURE_SAMPLES = 512


def _figures(models, code: Code, coded, x: torch.Tensor, info: Mapping[str, Any]) -> dict[str, Any]:
    """What every method reports: ``parity_cost`` (the costliest coded model's FLOPs
    over one data model's, unless the method measured it) and ``calibration_recon``:
    how often a single erased model's top-1 is reconstructed on (up to
    :data:`FIGURE_SAMPLES` of) the calibration inputs. Those inputs built the
    parity, so this is an in-sample figure; ``heads`` also reports
    ``heldout_recon``, on calibration inputs it did not fit on."""
    xs = x[:FIGURE_SAMPLES]
    out: dict[str, Any] = {}
    if "parity_cost" not in info:
        base = count_flops(models[0], xs[:1])
        out["parity_cost"] = max(count_flops(m, xs[:1]) for m in coded) / base if base > 0 else None
    probs = {i: predict_probs(m, xs).double() for i, m in enumerate(list(models) + list(coded))}
    truth = [probs[j].argmax(-1) for j in range(code.k)]
    agree = []
    for j in range(code.k):
        rec = code.decode({i: p for i, p in probs.items() if i != j}, project=True)[j]
        agree.append(float((rec.argmax(-1) == truth[j]).double().mean()))
    out["calibration_recon"] = sum(agree) / len(agree)
    return out


def _jsonable(v) -> bool:
    return v is None or isinstance(v, bool | int | float | str | list | dict)

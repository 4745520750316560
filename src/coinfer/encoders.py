"""Encoders: build the r coded (parity) models from k data models.

Every method is registered with one signature,
``(models, code, calibration, options) -> (coded models, info)``, and a
dataclass of declared options; :func:`encode` validates the inputs once, then
dispatches. Methods:

* ``coin``: Fisher-weighted averaging, ``θ_c = Σ w_i F_i θ_i / Σ w_i F_i``
  element-wise per parity row (Jhunjhunwala et al., ISIT 2024).
* ``average``: w-weighted parameter averaging.
* ``distill``: a learned parity trained on the KL-barycenter objective
  (cross-entropy against ``Σ w_i p_i(x)``), the ParM-style baseline.

Buffers (BatchNorm running statistics and the like) are never Fisher-weighted:
they are w-averaged, and by default BatchNorm statistics are then recomputed by
running the coded model over the calibration inputs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from coinfer.code import Code
from coinfer.errors import CalibrationError, ModelMismatchError, OptionError
from coinfer.fisher import BACKENDS, ESTIMATORS, diagonal_fisher, fisher_total
from coinfer.merge import weighted_average
from coinfer.predict import predict_probs
from coinfer.split import count_flops

__all__ = [
    "encode",
    "EncodeResult",
    "METHODS",
    "register",
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


@dataclass
class _Method:
    name: str
    fn: Callable
    options: type
    doc: str


METHODS: dict[str, _Method] = {}


def register(name: str, options: type):
    """Register an encoder ``fn(models, code, calib_x, calib_y, opts) -> (models, info)``
    under ``name`` with the dataclass ``options`` of its declared parameters."""

    def deco(fn):
        METHODS[name] = _Method(name, fn, options, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


# --------------------------------------------------------------------------- validation
def check_models(models: Sequence[nn.Module], k: int | None = None) -> None:
    """Refuse models that cannot be encoded together, naming index and parameter."""
    if not isinstance(models, Sequence) or isinstance(models, nn.Module):
        raise ModelMismatchError(f"models must be a list of nn.Module, got {type(models).__name__}")
    if len(models) < 2:
        raise ModelMismatchError(f"encoding needs k >= 2 data models, got k = {len(models)}")
    if k is not None and len(models) != k:
        raise ModelMismatchError(f"the code has k = {k} but {len(models)} models were given")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise ModelMismatchError(f"model {i} is a {type(m).__name__}, not an nn.Module")
    ref = models[0].state_dict()
    ref_params = {n for n, _ in models[0].named_parameters()}
    for i, m in enumerate(models):
        sd = m.state_dict()
        if i > 0:
            missing = [n for n in ref if n not in sd]
            extra = [n for n in sd if n not in ref]
            if missing or extra:
                raise ModelMismatchError(
                    f"model {i} has a different architecture than model 0: "
                    f"missing {missing[:3]}, unexpected {extra[:3]}"
                )
            pnames = {n for n, _ in m.named_parameters()}
            if pnames != ref_params:
                diff = sorted(pnames ^ ref_params)[:3]
                raise ModelMismatchError(
                    f"model {i} differs from model 0 in which tensors are parameters: {diff}"
                )
        for n, t in sd.items():
            r = ref[n]
            if t.shape != r.shape:
                raise ModelMismatchError(
                    f"model {i} parameter {n!r} has shape {tuple(t.shape)}, model 0 has {tuple(r.shape)}"
                )
            if t.dtype != r.dtype:
                raise ModelMismatchError(
                    f"model {i} parameter {n!r} has dtype {t.dtype}, model 0 has {r.dtype}"
                )
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise ModelMismatchError(f"model {i} parameter {n!r} has {bad} NaN/inf entries")


def _as_calibration(calibration) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tensor, ``(x, y)`` pair, or an iterable of batches -> ``(x, y or None)``."""
    if isinstance(calibration, torch.Tensor):
        return calibration, None
    if (
        isinstance(calibration, tuple | list)
        and len(calibration) == 2
        and all(isinstance(t, torch.Tensor) for t in calibration)
    ):
        x, y = calibration
        if len(x) != len(y):
            raise CalibrationError(f"calibration inputs have {len(x)} samples but labels {len(y)}")
        return x, y.long()
    if isinstance(calibration, Iterable):
        xs, ys = [], []
        for b in calibration:
            if isinstance(b, torch.Tensor):
                xs.append(b)
            elif isinstance(b, list | tuple) and b and isinstance(b[0], torch.Tensor):
                xs.append(b[0])
                if len(b) > 1:
                    ys.append(torch.as_tensor(b[1]))
            else:
                raise CalibrationError(
                    f"calibration batches must be tensors or (inputs, labels) pairs, got {type(b).__name__}"
                )
        if not xs:
            raise CalibrationError("calibration data is empty")
        x = torch.cat(xs)
        y = torch.cat(ys).long() if len(ys) == len(xs) else None
        return x, y
    raise CalibrationError(
        f"calibration must be a tensor, an (inputs, labels) pair or a DataLoader, got {type(calibration).__name__}"
    )


def _check_calibration(models: Sequence[nn.Module], x: torch.Tensor, input_shape: Sequence[int] | None):
    if not x.is_floating_point():
        raise CalibrationError(f"calibration inputs must be floating point, got {x.dtype}")
    if x.ndim < 2 or len(x) == 0:
        raise CalibrationError(
            f"calibration inputs must be a (N, *input_shape) batch, got shape {tuple(x.shape)}"
        )
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise CalibrationError(
            f"calibration inputs have per-sample shape {tuple(x.shape[1:])}, expected {tuple(input_shape)}"
        )
    if not torch.isfinite(x).all():
        raise CalibrationError("calibration inputs contain NaN or inf")
    m = models[0]
    was = m.training
    m.eval()
    try:
        with torch.no_grad():
            out = m(x[:2])
    except Exception as exc:  # the model's own error says what did not fit
        raise CalibrationError(
            f"calibration inputs of per-sample shape {tuple(x.shape[1:])} do not fit model 0: {exc}"
        ) from None
    finally:
        m.train(was)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise CalibrationError(
            f"models must return (batch, C) logits; model 0 returned {getattr(out, 'shape', type(out))}"
        )


# --------------------------------------------------------------------------- helpers
def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 128) -> int:
    """Reset and re-estimate BatchNorm running statistics over ``x`` (cumulative
    average). Returns the number of BatchNorm layers updated."""
    bns = _bn_modules(model)
    if not bns:
        return 0
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    was = model.training
    model.train()
    try:
        for s in range(0, len(x), batch_size):
            xb = x[s : s + batch_size]
            if len(xb) < 2:
                break
            model(xb)
    finally:
        for bn, mom in zip(bns, momenta, strict=True):
            bn.momentum = mom
        model.train(was)
    return len(bns)


def _finish_buffers(coded: nn.Module, models, w, x, mode: str) -> None:
    if mode not in ("recompute", "average"):
        raise ValueError(f"buffers must be 'recompute' or 'average', got {mode!r}")
    avg = weighted_average(models, w).state_dict()
    names = {n for n, _ in coded.named_buffers()}
    sd = coded.state_dict()
    for n in names:
        sd[n] = avg[n]
    coded.load_state_dict(sd)
    if mode == "recompute":
        recompute_batchnorm(coded, x)
    coded.eval()


def _show(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


# --------------------------------------------------------------------------- methods
def fisher_weighted_average(
    models: Sequence[nn.Module],
    fishers: Sequence[dict[str, torch.Tensor]],
    w: Sequence[float],
    eps: float = 1e-12,
) -> tuple[nn.Module, int]:
    """COIN's closed form for one parity row: ``Σ w_i F_i θ_i / Σ w_i F_i``.

    Element-wise per parameter; where ``Σ w_i F_i <= eps`` the entry falls back
    to the w-weighted average. Buffers are copied from model 0 (the caller sets
    them). Returns the coded model and the number of fall-back entries."""
    coded = copy.deepcopy(models[0])
    params = [dict(m.named_parameters()) for m in models]
    n_fallback = 0
    with torch.no_grad():
        for name, p in coded.named_parameters():
            if name not in fishers[0]:
                continue
            num = torch.zeros_like(p, dtype=torch.float64)
            den = torch.zeros_like(num)
            avg = torch.zeros_like(num)
            for wi, f, ps in zip(w, fishers, params, strict=True):
                fi = f[name].double()
                num += float(wi) * fi * ps[name].double()
                den += float(wi) * fi
                avg += float(wi) * ps[name].double()
            ok = den > eps
            n_fallback += int((~ok).sum())
            p.copy_(torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), avg).to(p.dtype))
    return coded, n_fallback


# --------------------------------------------------------------------------- option constraints
BUFFER_MODES = ("recompute", "average")
DISTILL_INITS = ("random", "average", "coin")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _expect(method: str, name: str, value: Any, ok: bool, expected: str) -> None:
    """Refuse option ``name`` of ``method`` unless ``ok``, naming value and expectation."""
    if not ok:
        shown = f"a {type(value).__name__}" if isinstance(value, torch.Tensor | nn.Module) else repr(value)
        raise OptionError(f"{method} option {name!r} must be {expected}, got {shown}")


def _check_progress(method: str, value: Any) -> None:
    _expect(method, "progress", value, value is None or isinstance(value, bool), "None, True or False")


@dataclass
class CoinOptions:
    """Options of the ``coin`` encoder."""

    estimator: str = "exact"  #: exact | sampled | empirical
    num_samples: int | None = None  #: calibration samples used for Fisher (None: all)
    eps: float = 1e-12  #: where Σ w_i F_i < eps, fall back to the w-weighted average
    normalize: bool = False  #: rescale each model's Fisher to the same total
    buffers: str = "recompute"  #: recompute | average
    batch_size: int | None = None  #: Fisher chunk size (None: the backend's default)
    backend: str = "auto"  #: Fisher backend: auto | layers | vmap | loop (see diagonal_fisher)
    seed: int = 0  #: seed of the sampled estimator
    progress: bool | None = None

    def validate(self, method: str = "coin") -> None:
        """Refuse values outside the declared ranges before any work."""
        _expect(method, "estimator", self.estimator, self.estimator in ESTIMATORS, f"one of {ESTIMATORS}")
        n = self.num_samples
        _expect(method, "num_samples", n, n is None or (_is_int(n) and n >= 1), "an integer >= 1 or None")
        _expect(method, "eps", self.eps, _is_real(self.eps) and self.eps >= 0, "a finite number >= 0")
        _expect(method, "normalize", self.normalize, isinstance(self.normalize, bool), "True or False")
        _expect(method, "buffers", self.buffers, self.buffers in BUFFER_MODES, f"one of {BUFFER_MODES}")
        b = self.batch_size
        _expect(method, "batch_size", b, b is None or (_is_int(b) and b >= 1), "an integer >= 1 or None")
        _expect(method, "backend", self.backend, self.backend in BACKENDS, f"one of {BACKENDS}")
        _expect(method, "seed", self.seed, _is_int(self.seed), "an integer")
        _check_progress(method, self.progress)


def coin_merge(models, rows, x, y, opts) -> tuple[list[nn.Module], dict[str, Any]]:
    """COIN's merge for each parity row of ``rows``: the Fisher of every model on
    the first ``opts.num_samples`` calibration inputs, then the Fisher-weighted
    average per row. Buffers are left as model 0's; ``opts`` carries the COIN
    options (estimator, num_samples, eps, normalize, batch_size, backend, seed)."""
    if opts.estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {opts.estimator!r}")
    if opts.estimator == "empirical" and y is None:
        raise CalibrationError("estimator 'empirical' needs labelled calibration data: pass (inputs, labels)")
    n = len(x) if opts.num_samples is None else min(opts.num_samples, len(x))
    fishers = []
    for i, m in enumerate(
        tqdm(models, desc="coin: fisher per model", disable=not _show(opts.progress), leave=False)
    ):
        fishers.append(
            diagonal_fisher(
                m,
                x[:n],
                opts.estimator,
                labels=None if y is None else y[:n],
                batch_size=opts.batch_size,
                seed=opts.seed + i,
                progress=False,
                backend=opts.backend,
            )
        )
    totals = [fisher_total(f) for f in fishers]
    if opts.normalize:
        target = sum(totals) / len(totals)
        fishers = [
            {p: f * (target / max(t, 1e-30)) for p, f in fi.items()}
            for fi, t in zip(fishers, totals, strict=True)
        ]
    merged, fallback = [], []
    for row in rows:
        coded, n_fallback = fisher_weighted_average(models, fishers, row, opts.eps)
        merged.append(coded)
        fallback.append(n_fallback)
    c = _num_classes(models[0], x)
    per_sample_bwd = c if opts.estimator == "exact" else 1
    info = {
        "fisher_totals": totals,
        "fallback_entries": fallback,
        "calibration_samples": n,
        "forward_passes": len(models) * n,
        "backward_passes": len(models) * n * per_sample_bwd,
    }
    return merged, info


@register("coin", CoinOptions)
def _coin(models, code: Code, x, y, opts: CoinOptions):
    """Fisher-weighted parameter averaging (COIN)."""
    coded_models, info = coin_merge(models, code.weights, x, y, opts)
    n = info["calibration_samples"]
    for coded, row in zip(coded_models, code.weights, strict=True):
        _finish_buffers(coded, models, row, x[:n], opts.buffers)
    if opts.buffers == "recompute":
        info["forward_passes"] += code.r * n
    return coded_models, info


@dataclass
class AverageOptions:
    """Options of the ``average`` encoder."""

    buffers: str = "average"  #: average | recompute (BatchNorm statistics)

    def validate(self, method: str = "average") -> None:
        """Refuse values outside the declared ranges before any work."""
        _expect(method, "buffers", self.buffers, self.buffers in BUFFER_MODES, f"one of {BUFFER_MODES}")


@register("average", AverageOptions)
def _average(models, code: Code, x, y, opts: AverageOptions):
    """w-weighted parameter averaging."""
    coded = []
    for row in code.weights:
        m = weighted_average(models, row)
        _finish_buffers(m, models, row, x, opts.buffers)
        coded.append(m)
    fwd = code.r * len(x) if opts.buffers == "recompute" else 0
    return coded, {"forward_passes": fwd, "backward_passes": 0}


@dataclass
class DistillOptions:
    """Options of the ``distill`` encoder (learned parity, ParM-style baseline)."""

    init: Any = "average"  #: an nn.Module, or "random" | "average" | "coin"
    epochs: int = 5
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    train_inputs: torch.Tensor | None = None  #: unlabeled inputs to train on (default: calibration)
    seed: int = 0
    coin: dict = field(default_factory=dict)  #: options for init="coin"
    progress: bool | None = None

    def validate(self, method: str = "distill") -> None:
        """Refuse values outside the declared ranges before any work (the ``coin``
        options of ``init="coin"`` included)."""
        init = self.init
        _expect(
            method,
            "init",
            init,
            isinstance(init, nn.Module) or (isinstance(init, str) and init in DISTILL_INITS),
            f"an nn.Module or one of {DISTILL_INITS}",
        )
        _expect(method, "epochs", self.epochs, _is_int(self.epochs) and self.epochs >= 0, "an integer >= 0")
        _expect(method, "lr", self.lr, _is_real(self.lr) and self.lr > 0, "a finite number > 0")
        wd = self.weight_decay
        _expect(method, "weight_decay", wd, _is_real(wd) and wd >= 0, "a finite number >= 0")
        b = self.batch_size
        _expect(method, "batch_size", b, _is_int(b) and b >= 1, "an integer >= 1")
        t = self.train_inputs
        _expect(
            method,
            "train_inputs",
            t,
            t is None
            or (isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim >= 2 and len(t) > 0),
            "None or a non-empty floating (N, *input_shape) tensor",
        )
        _expect(method, "seed", self.seed, _is_int(self.seed), "an integer")
        _expect(method, "coin", self.coin, isinstance(self.coin, dict), "a dict of coin options")
        known = {f.name for f in dataclasses.fields(CoinOptions)}
        unknown = sorted(set(self.coin) - known)
        _expect(
            method,
            "coin",
            self.coin,
            not unknown,
            f"coin options only, unknown {unknown}; known {sorted(known)}",
        )
        CoinOptions(**self.coin).validate(method=f"{method} (coin init)")
        _check_progress(method, self.progress)


def _reset_parameters(model: nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()


@register("distill", DistillOptions)
def _distill(models, code: Code, x, y, opts: DistillOptions):
    """Learned parity: minimise cross-entropy to the target mixture Σ w_i p_i(x)."""
    data = x if opts.train_inputs is None else opts.train_inputs
    if opts.epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {opts.epochs}")
    for m in models:
        m.eval()
    with torch.no_grad():
        probs = torch.stack([predict_probs(m, data) for m in models])  # (k, N, C)
    coded, fwd, bwd, info_extra = [], 0, 0, {}
    for ri, row in enumerate(code.weights):
        target = torch.einsum("k,knc->nc", torch.tensor(row, dtype=probs.dtype, device=probs.device), probs)
        if isinstance(opts.init, nn.Module):
            student = copy.deepcopy(opts.init)
        elif opts.init == "random":
            student = copy.deepcopy(models[0])
            _reset_parameters(student, opts.seed + ri)
        elif opts.init == "average":
            student = weighted_average(models, row)
        elif opts.init == "coin":
            single = Code(code.k, 1, [row], max_condition=code.max_condition)
            res = encode(models, single, (x, y) if y is not None else x, method="coin", **opts.coin)
            student = res[0]
            info_extra = res.info
        else:
            raise ValueError(f"init must be an nn.Module or 'random', 'average', 'coin', got {opts.init!r}")
        check_models([models[0], student])
        g = torch.Generator().manual_seed(opts.seed + ri)
        optim = torch.optim.Adam(student.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        student.train()
        steps = opts.epochs * math.ceil(len(data) / opts.batch_size)
        bar = tqdm(total=steps, desc=f"distill parity {ri}", disable=not _show(opts.progress), leave=False)
        for _ in range(opts.epochs):
            perm = torch.randperm(len(data), generator=g)
            for s in range(0, len(data), opts.batch_size):
                idx = perm[s : s + opts.batch_size]
                if len(idx) < 2 and _bn_modules(student):
                    continue
                logp = torch.log_softmax(student(data[idx]), dim=-1)
                loss = -(target[idx] * logp).sum(-1).mean()
                optim.zero_grad()
                loss.backward()
                optim.step()
                bar.update(1)
        bar.close()
        student.eval()
        coded.append(student)
        fwd += opts.epochs * len(data)
        bwd += opts.epochs * len(data)
    info = {
        "forward_passes": len(models) * len(data) + fwd + info_extra.get("forward_passes", 0),
        "backward_passes": bwd + info_extra.get("backward_passes", 0),
        "train_samples": len(data),
    }
    if "fisher_totals" in info_extra:
        info["fisher_totals"] = info_extra["fisher_totals"]
    return coded, info


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        was = model.training
        model.eval()
        c = model(x[:1]).shape[-1]
        model.train(was)
    return int(c)


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
    if hasattr(opts, "validate"):
        opts.validate()  # option values are checked before any work
    if not isinstance(code, Code):
        raise TypeError(f"code must be a coinfer.Code, got {type(code).__name__}")
    check_models(models, code.k)
    _warn_unrelated(models)
    x, y = _as_calibration(calibration)
    _check_calibration(models, x, input_shape)
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


# registers "heads" (merged trunk + per-model heads); imported last: it uses the helpers above
from coinfer import heads as _heads_module  # noqa: E402, F401

"""Trunk merges, weights in, weights out: the weighted average, COIN's
Fisher-weighted average, and RegMean; and the buffers of a merged model.

* :func:`weighted_average`: ``Σ w_i θ_i``, parameters and buffers.
* :func:`fisher_weighted_average` / :func:`coin_merge`: COIN's closed form
  ``θ_c = Σ w_i F_i θ_i / Σ w_i F_i`` element-wise, with each model's diagonal
  Fisher on the calibration inputs (Jhunjhunwala et al., ISIT 2024).
* :func:`regmean_merge`: every linear layer merged in closed form from its
  input Gram matrices. For a layer ``y = W x`` that model i computes on its own
  inputs ``X_i``, RegMean (Jin, Ren, Preotiuc-Pietro, Cheng, ICLR 2023,
  "Dataless Knowledge Fusion by Merging Weights of Language Models") takes the
  W that best matches every model's outputs on its own inputs,

      W* = argmin Σ_i w_i ||X_i Wᵀ − X_i W_iᵀ||²  =  (Σ_i w_i G̃_i)⁻¹ Σ_i w_i G̃_i W_iᵀ,

  with ``G_i = X_iᵀX_i`` and its off-diagonal entries scaled by ``a`` (``G̃ = a G
  + (1 − a) diag G``): ``a = 0`` is a per-input-feature weighted average, ``a = 1``
  the plain regression. Every ``nn.Linear`` and ungrouped ``nn.Conv2d`` (on
  unfolded patches) is merged this way, a bias as one more input column of
  ones; every other parameter and buffer is the w-weighted average. The Gram
  matrices are accumulated over the calibration inputs batch by batch, each
  model on its own activations.
* :func:`finish_buffers`: a merged model's buffers w-averaged, BatchNorm
  statistics optionally recomputed on calibration inputs (never Fisher-weighted).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from coinfer.errors import CalibrationError
from coinfer.fisher import ESTIMATORS, diagonal_fisher, fisher_total
from coinfer.options import BUFFER_MODES, DEFAULT_REGMEAN_ALPHA, FisherOptions, show_progress
from coinfer.refit import MAX_DESIGN, design, refittable, weight_matrix

__all__ = [
    "weighted_average",
    "fisher_weighted_average",
    "coin_merge",
    "coin_parities",
    "model_fishers",
    "regmean_merge",
    "regmean_grams",
    "finish_buffers",
    "recompute_batchnorm",
    "batchnorm_modules",
    "DEFAULT_REGMEAN_ALPHA",
]


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m
        for n, m in model.named_modules()
        if n
        and isinstance(m, nn.Linear | nn.Conv2d)
        and refittable(m)
        and m.weight[0].numel() + 1 <= MAX_DESIGN
    }


def _grams(
    model: nn.Module, x: torch.Tensor, names: Sequence[str], batch: int = 256
) -> dict[str, torch.Tensor]:
    """XᵀX of each named layer's design rows over ``model``'s own forward on ``x``."""
    mods = dict(model.named_modules())
    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(mod, args, out):
            a = design(mod, args[0].detach())
            g = a.T @ a
            grams[name] = grams[name] + g if name in grams else g

        return fn

    hooks = [mods[n].register_forward_hook(hook(n)) for n in names]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(x), batch):
                model(x[s : s + batch])
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return grams


def weighted_average(models: Sequence[nn.Module], w: Sequence[float]) -> nn.Module:
    """A copy of ``models[0]`` whose floating tensors (parameters and buffers)
    are ``Σ w_i θ_i``; integer buffers are copied from model 0."""
    out = copy.deepcopy(models[0])
    sds = [m.state_dict() for m in models]
    new = {}
    for n, t in sds[0].items():
        if t.is_floating_point():
            new[n] = sum(float(wi) * sd[n].to(torch.float64) for wi, sd in zip(w, sds, strict=True)).to(
                t.dtype
            )
        else:
            new[n] = t.clone()
    out.load_state_dict(new)
    return out


def regmean_grams(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The Gram matrices RegMean needs of ``model``: each merged layer's, on its own inputs."""
    names = list(_layers(model))
    return _grams(model, x, names) if names else {}


def regmean_merge(
    models: Sequence[nn.Module],
    rows: Sequence[Sequence[float]],
    x: torch.Tensor,
    alpha: float = DEFAULT_REGMEAN_ALPHA,
    grams: dict[int, dict[str, torch.Tensor]] | None = None,
) -> list[nn.Module]:
    """One merged model per row of ``rows``: RegMean for every Linear/Conv2d layer,
    the row's weighted average for everything else. A row holds one non-negative
    weight per model (a parity row; zero leaves the model out). ``x``: calibration
    inputs. Each model's Gram matrices are computed once, for all rows."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"RegMean alpha must be in [0, 1], got {alpha!r}")
    names = list(_layers(models[0]))
    needed = sorted({i for row in rows for i, v in enumerate(row) if float(v) > 0})
    if grams is None:
        grams = {i: _grams(models[i], x, names) for i in needed} if names else {}
    return [_merge_row(models, [float(v) for v in row], grams, names, alpha) for row in rows]


def _merge_row(models, w: list[float], grams, names: Sequence[str], alpha: float) -> nn.Module:
    total = sum(w)
    members = [i for i, v in enumerate(w) if v > 0]
    merged = weighted_average(models, [v / total for v in w])
    mods = dict(merged.named_modules())
    for name in names:
        if any(name not in grams[i] for i in members):
            continue  # a layer forward() never calls keeps the average
        num, den = None, None
        for i in members:
            gi = grams[i][name]
            gi = alpha * gi + (1 - alpha) * torch.diag(torch.diagonal(gi))
            wi = weight_matrix(models[i].get_submodule(name))  # (out, D[+1])
            term = w[i] * gi
            num = term @ wi.T if num is None else num + term @ wi.T
            den = term if den is None else den + term
        eye = torch.eye(den.shape[0], dtype=den.dtype, device=den.device)
        ridge = 1e-8 * float(den.diagonal().mean()) * eye  # a dead input feature has a zero row
        sol = torch.linalg.solve(den + ridge, num).T
        layer = mods[name]
        d_w = layer.weight[0].numel()
        with torch.no_grad():
            layer.weight.copy_(sol[:, :d_w].reshape(layer.weight.shape).to(layer.weight.dtype))
            if layer.bias is not None:
                layer.bias.copy_(sol[:, d_w].to(layer.bias.dtype))
    return merged


# --------------------------------------------------------------------------- COIN
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


def model_fishers(
    models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor | None, opts: FisherOptions
) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """The diagonal Fisher of every model on the first ``opts.num_samples``
    calibration inputs (rescaled to equal totals with ``opts.normalize``), and
    their info: totals before rescaling, samples, forward and backward passes."""
    if opts.estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {opts.estimator!r}")
    if opts.estimator == "empirical" and y is None:
        raise CalibrationError("estimator 'empirical' needs labelled calibration data: pass (inputs, labels)")
    n = len(x) if opts.num_samples is None else min(opts.num_samples, len(x))
    fishers = []
    bar = tqdm(models, desc="coin: fisher per model", disable=not show_progress(opts.progress), leave=False)
    for i, m in enumerate(bar):
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
    per_sample_bwd = num_classes(models[0], x) if opts.estimator == "exact" else 1
    info = {
        "fisher_totals": totals,
        "calibration_samples": n,
        "forward_passes": len(models) * n,
        "backward_passes": len(models) * n * per_sample_bwd,
    }
    return fishers, info


def coin_merge(
    models: Sequence[nn.Module],
    rows: Sequence[Sequence[float]],
    x: torch.Tensor,
    y: torch.Tensor | None,
    opts: FisherOptions,
) -> tuple[list[nn.Module], dict[str, Any]]:
    """COIN's merge for each parity row of ``rows``: the Fisher of every model
    (:func:`model_fishers`), then the Fisher-weighted average per row. Buffers
    are left as model 0's (see :func:`finish_buffers`)."""
    fishers, info = model_fishers(models, x, y, opts)
    merged, fallback = [], []
    for row in rows:
        coded, n_fallback = fisher_weighted_average(models, fishers, row, opts.eps)
        merged.append(coded)
        fallback.append(n_fallback)
    info["fallback_entries"] = fallback
    return merged, info


def coin_parities(
    models: Sequence[nn.Module],
    rows: Sequence[Sequence[float]],
    x: torch.Tensor,
    y: torch.Tensor | None,
    opts: FisherOptions,
    buffers: str = "recompute",
) -> tuple[list[nn.Module], dict[str, Any]]:
    """:func:`coin_merge` for every row, each merged model's buffers then set by
    :func:`finish_buffers` (``buffers``); the passes of a BatchNorm recompute are counted."""
    coded, info = coin_merge(models, rows, x, y, opts)
    n = info["calibration_samples"]
    for m, row in zip(coded, rows, strict=True):
        finish_buffers(m, models, row, x[:n], buffers)
    if buffers == "recompute":
        info["forward_passes"] += len(rows) * n
    return coded, info


def num_classes(model: nn.Module, x: torch.Tensor) -> int:
    """The width of ``model``'s logits on ``x[:1]`` (its mode left as it was)."""
    with torch.no_grad():
        was = model.training
        model.eval()
        c = model(x[:1]).shape[-1]
        model.train(was)
    return int(c)


# --------------------------------------------------------------------------- buffers
def batchnorm_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that track running statistics."""
    return [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 128) -> int:
    """Reset and re-estimate BatchNorm running statistics over ``x`` (cumulative
    average). Returns the number of BatchNorm layers updated."""
    bns = batchnorm_modules(model)
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


def finish_buffers(
    coded: nn.Module, models: Sequence[nn.Module], w: Sequence[float], x: torch.Tensor, mode: str
) -> None:
    """Set a merged model's buffers to the w-average of the models' and, with
    ``mode="recompute"``, re-estimate its BatchNorm statistics on ``x``; leaves it in eval mode."""
    if mode not in BUFFER_MODES:
        raise ValueError(f"buffers must be one of {BUFFER_MODES}, got {mode!r}")
    avg = weighted_average(models, w).state_dict()
    names = {n for n, _ in coded.named_buffers()}
    sd = coded.state_dict()
    for n in names:
        sd[n] = avg[n]
    coded.load_state_dict(sd)
    if mode == "recompute":
        recompute_batchnorm(coded, x)
    coded.eval()

"""Trunk merges: the weighted average, and RegMean, merging linear layers in closed form from their input Gram matrices.

For a layer ``y = W x`` that model i computes on its own inputs ``X_i``,
RegMean (Jin, Ren, Preotiuc-Pietro, Cheng, ICLR 2023, "Dataless Knowledge
Fusion by Merging Weights of Language Models") takes the W that best matches
every model's outputs on its own inputs,

    W* = argmin Σ_i w_i ||X_i Wᵀ − X_i W_iᵀ||²  =  (Σ_i w_i G̃_i)⁻¹ Σ_i w_i G̃_i W_iᵀ,

with ``G_i = X_iᵀX_i`` and its off-diagonal entries scaled by ``a`` (``G̃ = a G
+ (1 − a) diag G``): ``a = 0`` is a per-input-feature weighted average, ``a = 1``
the plain regression. Every ``nn.Linear`` and ungrouped ``nn.Conv2d``
(on unfolded patches) is merged this way, a bias as one more input column of
ones; every other parameter and buffer is the w-weighted average. The Gram
matrices are accumulated over the calibration inputs batch by batch, each
model on its own activations.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from coinfer.refit import MAX_DESIGN, design, refittable, weight_matrix

__all__ = ["weighted_average", "regmean_merge", "DEFAULT_REGMEAN_ALPHA"]

#: Scale of the Gram matrices' off-diagonal entries (RegMean's ``alpha``).
DEFAULT_REGMEAN_ALPHA = 0.9


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


def regmean_merge(
    models: Sequence[nn.Module],
    rows: Sequence[Sequence[float]],
    x: torch.Tensor,
    alpha: float = DEFAULT_REGMEAN_ALPHA,
) -> list[nn.Module]:
    """One merged model per row of ``rows``: RegMean for every Linear/Conv2d layer,
    the row's weighted average for everything else. A row holds one non-negative
    weight per model (a parity row; zero leaves the model out). ``x``: calibration
    inputs. Each model's Gram matrices are computed once, for all rows."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"RegMean alpha must be in [0, 1], got {alpha!r}")
    names = list(_layers(models[0]))
    needed = sorted({i for row in rows for i, v in enumerate(row) if float(v) > 0})
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

"""The ``distill`` encoder: a learned parity, the ParM-style baseline.

Each parity row trains one copy of the architecture (initialised randomly,
as the w-average, as COIN, or from a given module) to minimise the
cross-entropy to the target mixture ``Σ w_i p_i(x)`` on unlabelled inputs.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from coinfer.checks import check_models
from coinfer.code import Code
from coinfer.merge import batchnorm_modules, coin_parities, weighted_average
from coinfer.options import CoinOptions, DistillOptions, show_progress
from coinfer.predict import predict_probs

__all__ = ["build_distill", "train_toward"]


def _reset_parameters(model: nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()


def train_toward(
    student: nn.Module,
    data: torch.Tensor,
    target: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float = 0.0,
    seed: int = 0,
    desc: str = "distill",
    progress: bool | None = None,
) -> nn.Module:
    """Train ``student`` in place with Adam to minimise the cross-entropy to the
    soft targets ``target`` (``(N, C)`` probabilities of ``data``), shuffled by
    ``seed``; returned in eval mode."""
    g = torch.Generator().manual_seed(seed)
    optim = torch.optim.Adam(student.parameters(), lr=lr, weight_decay=weight_decay)
    student.train()
    steps = epochs * math.ceil(len(data) / batch_size)
    bar = tqdm(total=steps, desc=desc, disable=not show_progress(progress), leave=False)
    skip_singletons = bool(batchnorm_modules(student))  # BatchNorm cannot train on one sample
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=g)
        for s in range(0, len(data), batch_size):
            idx = perm[s : s + batch_size]
            if len(idx) < 2 and skip_singletons:
                continue
            loss = -(target[idx] * torch.log_softmax(student(data[idx]), dim=-1)).sum(-1).mean()
            optim.zero_grad()
            loss.backward()
            optim.step()
            bar.update(1)
    bar.close()
    return student.eval()


def build_distill(models, code: Code, x, y, opts: DistillOptions):
    """Learned parity: minimise cross-entropy to the target mixture Σ w_i p_i(x)."""
    data = x if opts.train_inputs is None else opts.train_inputs
    if opts.epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {opts.epochs}")
    for m in models:
        m.eval()
    with torch.no_grad():
        probs = torch.stack([predict_probs(m, data) for m in models])  # (k, N, C)
    coded, fwd, bwd, info_extra = [], 0, 0, {}
    if opts.init == "coin":  # COIN's Fisher once for every row, its passes counted once per pass
        coin = CoinOptions(**opts.coin)
        coin_models, info_extra = coin_parities(models, code.weights, x, y, coin, coin.buffers)
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
            student = coin_models[ri]
        else:
            raise ValueError(f"init must be an nn.Module or 'random', 'average', 'coin', got {opts.init!r}")
        check_models([models[0], student])
        train_toward(
            student,
            data,
            target,
            epochs=opts.epochs,
            lr=opts.lr,
            weight_decay=opts.weight_decay,
            batch_size=opts.batch_size,
            seed=opts.seed + ri,
            desc=f"distill parity {ri}",
            progress=opts.progress,
        )
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

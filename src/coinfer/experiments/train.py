"""Training base models from a common initialisation.

A base model is trained on one part of the data; the k data models are copies
of it fine-tuned on their own partitions. Plain Adam + cross-entropy, seeded.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from coinfer.predict import predict_probs

__all__ = ["fit", "finetune_copies", "accuracy"]


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    seed: int = 0,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    progress: bool | None = None,
    desc: str = "train",
    optimizer: str = "adam",
    momentum: float = 0.9,
) -> nn.Module:
    """Train ``model`` in place on ``(x, y)`` with cross-entropy; returns it.

    ``optimizer`` is ``"adam"`` (default) or ``"sgd"`` (Nesterov momentum
    ``momentum``, the usual choice for ResNets). ``lr`` follows a cosine
    schedule to zero over the run; ``augment(batch, generator)`` transforms
    each training batch (e.g. :func:`coinfer.experiments.data.random_crop_flip`)."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    if len(x) == 0:
        raise ValueError("cannot train on an empty dataset")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay
        )
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=steps, desc=desc, disable=not show, leave=False)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), batch_size):
            idx = perm[s : s + batch_size]
            if len(idx) < 2:
                continue
            xb = x[idx]
            if augment is not None:
                xb = augment(xb, g)
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    return model


def finetune_copies(
    base: nn.Module,
    parts: list[tuple[torch.Tensor, torch.Tensor]],
    seed: int = 0,
    **fit_kwargs,
) -> list[nn.Module]:
    """One copy of ``base`` fine-tuned on each ``(x, y)`` part (seeds ``seed + i``)."""
    models = []
    for i, (x, y) in enumerate(parts):
        m = copy.deepcopy(base)
        fit(m, x, y, seed=seed + i, desc=f"fine-tune model {i}", **fit_kwargs)
        models.append(m)
    return models


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    if len(x) == 0:
        return float("nan")
    return float((predict_probs(model, x).argmax(-1) == y).float().mean())

"""Batched softmax outputs of a model: what the encoders and the evaluation read."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["predict_probs"]


@torch.no_grad()
def predict_probs(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Softmax outputs of ``model`` on ``x`` in eval mode, ``(N, C)``; the model's
    train/eval mode is restored afterwards."""
    was = model.training
    model.eval()
    out = torch.cat([torch.softmax(model(x[s : s + batch_size]), -1) for s in range(0, len(x), batch_size)])
    model.train(was)
    return out

"""Datasets as tensors, and how the k models' data differ (scenarios).

The package never assumes where data lives: file paths come from the user.
The bundled default is scikit-learn's digits (8x8 images, 10 classes), which
needs no file at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from coinfer.errors import DataError

__all__ = ["Dataset", "load_digits", "class_split"]


@dataclass
class Dataset:
    """Normalised float tensors of a train/test split, images as ``(N, C, H, W)``
    (or ``(N, D)`` for flat data), labels as ``int64``."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: list[str]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_digits(test_fraction: float = 0.3, seed: int = 0) -> Dataset:
    """scikit-learn's bundled digits (1797 8x8 images), flattened to 64 features
    in ``[0, 1]``, split with a stratified shuffle."""
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = torch.from_numpy(d.data.astype(np.float32) / 16.0)
    y = torch.from_numpy(d.target.astype(np.int64))
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(d.target == c)
        rng.shuffle(idx)
        test_idx.extend(idx[: int(round(len(idx) * test_fraction))])
    mask = np.zeros(len(y), dtype=bool)
    mask[test_idx] = True
    tr, te = torch.from_numpy(~mask), torch.from_numpy(mask)
    return Dataset("digits", x[tr], y[tr], x[te], y[te], [str(c) for c in range(10)])


def class_split(num_classes: int, k: int) -> list[list[int]]:
    """Disjoint, complete class subsets for k models: contiguous, as equal as possible."""
    if not 1 <= k <= num_classes:
        raise DataError(f"class-split needs 1 <= k <= num_classes = {num_classes}, got k = {k}")
    return [a.tolist() for a in np.array_split(np.arange(num_classes), k)]

"""Scenarios: how the k models' training data differ.

All k models start from one common initialisation (a base model trained on a
held-out part of the training set) and are fine-tuned on their own partition
of the rest. A scenario turns the labels of that rest into k index sets:

* ``class-split``: disjoint class subsets (each model keeps the full output head);
* ``dirichlet``: label skew, per class proportions drawn from Dir(α · 1_k);
* ``iid``: equal random shards.

Each partition also names every model's *task classes*, which pick the test
images its task accuracy is measured on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from coinfer.errors import DataError
from coinfer.experiments.data import class_split

__all__ = ["SCENARIOS", "Partition", "partition"]

SCENARIOS = ("class-split", "dirichlet", "iid")


@dataclass
class Partition:
    """k index sets into the partitioned labels, and each model's task classes."""

    indices: list[torch.Tensor]
    task_classes: list[list[int]]

    @property
    def k(self) -> int:
        return len(self.indices)

    def task_masks(self, labels: torch.Tensor) -> list[torch.Tensor]:
        """Per model, a boolean mask of the ``labels`` in its task classes."""
        return [torch.isin(labels, torch.tensor(c, dtype=labels.dtype)) for c in self.task_classes]


def partition(
    labels: torch.Tensor,
    scenario: str,
    k: int,
    num_classes: int,
    seed: int = 0,
    alpha: float = 0.5,
    min_size: int = 10,
) -> Partition:
    """Split sample indices of ``labels`` among ``k`` models.

    Args:
        labels: ``(N,)`` class indices.
        scenario: ``class-split``, ``dirichlet`` or ``iid``.
        k: number of models.
        num_classes: number of classes.
        seed: seeds every random choice.
        alpha: Dirichlet concentration (smaller: more skew).
        min_size: ``dirichlet`` redraws until every shard holds at least this many samples.

    Task classes: ``class-split``, the model's own classes; ``iid``, every class;
    ``dirichlet``, the classes of which the model holds more than a ``1/k`` share
    (if none, the class it holds most of).
    """
    if scenario not in SCENARIOS:
        raise DataError(f"unknown scenario {scenario!r}: expected one of {list(SCENARIOS)}")
    if k < 1:
        raise DataError(f"k must be >= 1, got {k}")
    y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if len(y) < k:
        raise DataError(f"cannot split {len(y)} samples among k = {k} models")
    rng = np.random.default_rng(seed)
    if scenario == "class-split":
        splits = class_split(num_classes, k)
        idx = [np.flatnonzero(np.isin(y, c)) for c in splits]
        empty = [i for i, a in enumerate(idx) if len(a) == 0]
        if empty:
            raise DataError(f"class-split: model(s) {empty} got no samples (classes {splits[empty[0]]})")
        return Partition([torch.from_numpy(a) for a in idx], splits)
    if scenario == "iid":
        perm = rng.permutation(len(y))
        idx = [np.sort(a) for a in np.array_split(perm, k)]
        return Partition([torch.from_numpy(a) for a in idx], [list(range(num_classes))] * k)
    if alpha <= 0:
        raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
    if len(y) < k * min_size:
        raise DataError(f"dirichlet: {len(y)} samples cannot give k = {k} shards of at least {min_size}")
    for _ in range(1000):
        shards: list[list[np.ndarray]] = [[] for _ in range(k)]
        counts = np.zeros((k, num_classes), dtype=np.int64)
        for c in range(num_classes):
            ic = np.flatnonzero(y == c)
            rng.shuffle(ic)
            p = rng.dirichlet(np.full(k, alpha))
            cuts = (np.cumsum(p)[:-1] * len(ic)).astype(int)
            for i, part in enumerate(np.split(ic, cuts)):
                shards[i].append(part)
                counts[i, c] = len(part)
        sizes = counts.sum(1)
        if sizes.min() >= min_size:
            break
    else:
        raise DataError(f"dirichlet(alpha={alpha}) could not give every shard {min_size} samples")
    idx = [np.sort(np.concatenate(s)) for s in shards]
    share = counts / np.maximum(counts.sum(0, keepdims=True), 1)
    tasks = []
    for i in range(k):
        cls = [c for c in range(num_classes) if share[i, c] > 1.0 / k]
        tasks.append(cls or [int(counts[i].argmax())])
    return Partition([torch.from_numpy(a) for a in idx], tasks)

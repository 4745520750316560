"""Partitions: class-split, dirichlet, iid."""

from __future__ import annotations

import pytest
import torch

from coinfer.errors import DataError
from coinfer.experiments.scenarios import partition


def _labels(n=3000, c=10, seed=0):
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))


def _disjoint_and_complete(p, n):
    allidx = torch.cat(p.indices)
    assert len(allidx) == n
    assert len(torch.unique(allidx)) == n


@pytest.mark.parametrize("k", [2, 3, 4, 10])
def test_class_split_is_disjoint_and_complete(k):
    y = _labels()
    p = partition(y, "class-split", k, 10)
    _disjoint_and_complete(p, len(y))
    classes = [set(y[i].tolist()) for i in p.indices]
    assert set().union(*classes) == set(range(10))
    for a in range(k):
        assert classes[a] == set(p.task_classes[a])
        for b in range(a + 1, k):
            assert not classes[a] & classes[b]


def test_class_split_k_beyond_classes_is_refused():
    with pytest.raises(DataError, match="k = 11"):
        partition(_labels(), "class-split", 11, 10)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 5.0])
def test_dirichlet_is_reproducible_and_every_shard_non_empty(alpha):
    y = _labels()
    a = partition(y, "dirichlet", 3, 10, seed=7, alpha=alpha)
    b = partition(y, "dirichlet", 3, 10, seed=7, alpha=alpha)
    c = partition(y, "dirichlet", 3, 10, seed=8, alpha=alpha)
    assert all(torch.equal(i, j) for i, j in zip(a.indices, b.indices, strict=True))
    assert a.task_classes == b.task_classes
    assert not all(torch.equal(i, j) for i, j in zip(a.indices, c.indices, strict=True))
    assert min(len(i) for i in a.indices) >= 10
    _disjoint_and_complete(a, len(y))
    assert all(t for t in a.task_classes)


def test_dirichlet_small_alpha_skews_labels():
    y = _labels(6000)
    p = partition(y, "dirichlet", 2, 10, seed=0, alpha=0.1)
    hist = torch.stack([torch.bincount(y[i], minlength=10).float() for i in p.indices])
    share = hist / hist.sum(0)
    assert share.max(0).values.mean() > 0.8  # most classes live mostly on one model


def test_iid_is_balanced():
    y = _labels(3001)
    p = partition(y, "iid", 4, 10, seed=1)
    sizes = [len(i) for i in p.indices]
    assert max(sizes) - min(sizes) <= 1
    _disjoint_and_complete(p, len(y))
    for idx in p.indices:
        frac = torch.bincount(y[idx], minlength=10).float() / len(idx)
        assert (frac - 0.1).abs().max() < 0.04
    assert p.task_classes == [list(range(10))] * 4


def test_bad_scenario_and_alpha_are_refused():
    with pytest.raises(DataError, match="unknown scenario"):
        partition(_labels(), "pathological", 2, 10)
    with pytest.raises(DataError, match="alpha"):
        partition(_labels(), "dirichlet", 2, 10, alpha=0)


def test_task_masks_pick_the_task_classes():
    y = torch.tensor([0, 5, 9, 4, 7])
    p = partition(_labels(), "class-split", 2, 10)
    m = p.task_masks(y)
    assert m[0].tolist() == [True, False, False, True, False]
    assert m[1].tolist() == [False, True, True, False, True]

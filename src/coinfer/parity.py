"""The heads parity as a model: one merged trunk, per-model heads, mixture weights.

::

    x -> trunk -> h -> head_1(h) .. head_m(h)
    parity logits = log Σ_i w_i softmax(head_i(h))          (log-sum-exp)

:class:`HeadsParity` is a plain ``nn.Module`` returning logits, so decoding,
bundles and serving treat it like any coded model. :meth:`HeadsParity.structure`
is what a bundle's manifest records, and :func:`build_parity` rebuilds an empty
skeleton from it (the bundle then loads the tensors). How a parity is *built*
(merging, the split search, the refit) is :mod:`coinfer.heads`; this module
knows nothing of it.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coinfer.errors import SplitError
from coinfer.refit import MAX_DESIGN
from coinfer.split import INPUT, split_model

__all__ = ["HeadsParity", "LowRankAdapter", "lowrank_layer", "build_parity", "partition"]


def partition(members: Sequence[int], groups: int) -> list[list[int]]:
    """``members`` split in order into ``groups`` contiguous groups of sizes
    differing by at most one (positions 0..m-1, not model indices)."""
    m = len(members)
    if not 1 <= groups <= m:
        raise SplitError(f"cannot split {m} heads into {groups} trunk groups")
    base, extra = divmod(m, groups)
    out, start = [], 0
    for g in range(groups):
        size = base + (1 if g < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


class HeadsParity(nn.Module):
    """A parity model: one trunk (or a few), ``m`` heads, mixture weights; returns
    logits ``log Σ_i w_i softmax(head_i(trunk_g(i)(x)))``.

    Args:
        trunk: maps inputs to the features the heads read; with ``groups``,
            a sequence of trunks, one per group.
        heads: one module per kept data model, features -> logits.
        weights: the mixture weight of each head (positive, summing to 1).
        members: the data-model index of each head (for the manifest).
        split: the split point's name (for the manifest).
        shared, adapters: the low-rank form. ``shared`` is the split layer
            merged (an ``nn.Linear``), ``adapters[i]`` a :class:`LowRankAdapter`
            of model i, and ``heads[i]`` the rest of model i after that layer:
            ``head_i(shared(h) + adapter_i(h))``. Each model keeps only a
            rank-ρ correction of the split layer instead of the whole layer.
        groups: several trunks (full heads only): ``groups[g]`` lists the
            positions in ``heads`` of the heads that read ``trunk[g]``, every
            head in exactly one group. Fewer models per merged trunk, at one
            more trunk's compute per group.
    """

    def __init__(
        self,
        trunk: nn.Module,
        heads: Sequence[nn.Module],
        weights: Sequence[float],
        members: Sequence[int],
        split: str,
        shared: nn.Module | None = None,
        adapters: Sequence[nn.Module] | None = None,
        groups: Sequence[Sequence[int]] | None = None,
    ):
        super().__init__()
        if len(heads) != len(weights) or len(heads) != len(members) or not heads:
            raise SplitError(
                f"heads ({len(heads)}), weights ({len(weights)}) and members ({len(members)}) must "
                "have the same non-zero length"
            )
        w = torch.as_tensor([float(v) for v in weights], dtype=torch.float64)
        if not torch.isfinite(w).all() or (w <= 0).any():
            raise SplitError(f"mixture weights must be positive and finite, got {w.tolist()}")
        many = isinstance(trunk, list | tuple | nn.ModuleList)
        if many and groups is None:
            raise SplitError("several trunks need groups: which heads read which trunk")
        if groups is not None:
            _check_groups(
                groups, list(trunk) if many else [trunk], len(heads), adapters if len(groups) > 1 else None
            )
            if len(groups) == 1:  # one group is the plain form
                trunk, groups = (trunk[0] if many else trunk), None
        if groups is not None:
            self.trunk = nn.ModuleList(trunk)
            self.groups: list[list[int]] | None = [[int(i) for i in g] for g in groups]
            self._group_of = {i: g for g, members in enumerate(self.groups) for i in members}
        else:
            self.trunk = trunk
            self.groups = None
        self.heads = nn.ModuleList(heads)
        device = next(
            itertools.chain(
                (p.device for p in self.trunk.parameters()),
                (p.device for h in self.heads for p in h.parameters()),
            ),
            torch.device("cpu"),
        )
        self.register_buffer("log_weights", torch.log(w / w.sum()).float().to(device))
        self.members = [int(i) for i in members]
        self.split = split
        if (shared is None) != (adapters is None) or (adapters is not None and len(adapters) != len(heads)):
            raise SplitError("the low-rank form needs a shared layer and one adapter per head")
        self.shared = shared
        self.adapters = nn.ModuleList(adapters) if adapters is not None else None
        self.rank = int(adapters[0].rank) if adapters else None
        self.meta: dict[str, Any] = {}  #: build facts the manifest records (trunk, parity_cost, ...)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.features(x))

    @property
    def num_trunks(self) -> int:
        return 1 if self.groups is None else len(self.groups)

    def features(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """The trunk's features of ``x`` (with several trunks, a list, one per trunk)."""
        if self.groups is None:
            return self.trunk(x)
        return [t(x) for t in self.trunk]

    def head_logits(self, h: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each head's logits from the features ``h`` (of :meth:`features`)."""
        if self.groups is not None:
            return [head(h[self._group_of[i]]) for i, head in enumerate(self.heads)]
        if self.adapters is None:
            return [head(h) for head in self.heads]
        z = self.shared(h)
        return [head(z + ad(h)) for head, ad in zip(self.heads, self.adapters, strict=True)]

    def mix(self, h: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """The parity's logits from the features ``h`` (of :meth:`features`)."""
        logp = torch.stack([F.log_softmax(o, dim=-1) for o in self.head_logits(h)])
        return torch.logsumexp(logp + self.log_weights.to(logp.dtype)[:, None, None], dim=0)

    def structure(self) -> dict[str, Any]:
        """What a bundle's manifest records to rebuild this parity."""
        return {
            "kind": "heads",
            "split": self.split,
            "members": list(self.members),
            "weights": torch.exp(self.log_weights.double()).tolist(),
            "rank": self.rank,
            **({"groups": [list(g) for g in self.groups]} if self.groups is not None else {}),
            **self.meta,
        }

    def check_weights(self, weights: Sequence[float], tol: float = 1e-5) -> None:
        """Refuse a state whose mixture weights are not ``weights`` (e.g. a
        bundle's tensors disagreeing with its manifest)."""
        have = torch.exp(self.log_weights.double().cpu())
        want = torch.as_tensor([float(v) for v in weights], dtype=torch.float64)
        if have.shape != want.shape or not torch.allclose(have, want / want.sum(), atol=tol, rtol=0):
            raise SplitError(
                f"parity mixture weights {have.tolist()} differ from the expected {want.tolist()}"
            )


def _check_groups(groups, trunks, n_heads: int, adapters) -> None:
    if adapters is not None:
        raise SplitError("a parity with several trunks holds whole heads, not the low-rank form")
    if len(trunks) != len(groups):
        raise SplitError(f"{len(groups)} groups need as many trunks, got {len(trunks)}")
    flat = sorted(i for g in groups for i in g)
    if flat != list(range(n_heads)) or any(len(g) == 0 for g in groups):
        raise SplitError(
            f"groups {[list(g) for g in groups]} must split the {n_heads} heads' positions "
            f"0..{n_heads - 1}, each in exactly one non-empty group"
        )


class LowRankAdapter(nn.Module):
    """``up(down(h))``: a rank-``rank`` linear map (the bias, if any, on ``up``)."""

    def __init__(self, in_features: int, rank: int, out_features: int, bias: bool = True):
        super().__init__()
        self.rank = rank
        with torch.random.fork_rng(devices=[]):  # a skeleton: leave the caller's RNG alone
            self.down = nn.Linear(in_features, rank, bias=False)
            self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(h))


def lowrank_layer(model: nn.Module, split: str, features: torch.Tensor | None = None) -> nn.Linear | None:
    """The ``nn.Linear`` named ``split`` if the head from ``split`` is exactly
    ``rest(layer(features))`` on 2-D ``(batch, in_features)`` features (the
    form a low-rank parity needs), else None. ``features``: real trunk outputs
    to check on (default: random ones of the layer's width)."""
    if split == INPUT:
        return None
    try:
        layer = model.get_submodule(split)
    except AttributeError:
        return None
    if not isinstance(layer, nn.Linear):
        return None
    if features is not None and (features.ndim != 2 or features.shape[1] != layer.in_features):
        return None
    if layer.in_features + 1 > MAX_DESIGN:
        return None
    try:
        trunk, head = split_model(model, split)
        _, rest = split_model(model, split, after=True)
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            h = (
                features[:2]
                if features is not None
                else torch.randn(2, layer.in_features, generator=g).to(layer.weight.device)
            )
            ok = torch.allclose(head(h), rest(layer(h)), atol=1e-5)
    except (SplitError, RuntimeError):
        return None
    return layer if ok else None


def build_parity(model: nn.Module, structure: Mapping[str, Any]) -> HeadsParity:
    """An empty :class:`HeadsParity` skeleton of ``structure`` (from
    :meth:`HeadsParity.structure`) over ``model``'s architecture, ready for
    ``load_state_dict``."""
    if structure.get("kind") != "heads":
        raise SplitError(f"unknown parity kind {structure.get('kind')!r}: expected 'heads'")
    members = structure.get("members")
    weights = structure.get("weights")
    split = structure.get("split")
    if not isinstance(split, str):
        raise SplitError(f"parity split must be a string, got {split!r}")
    if (
        not isinstance(members, list)
        or not isinstance(weights, list)
        or len(members) != len(weights)
        or not members
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in members)
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in weights)
    ):
        raise SplitError(f"parity members {members!r} and weights {weights!r} must be equal-length lists")
    rank = structure.get("rank")
    groups = structure.get("groups")
    if groups is not None and (
        not isinstance(groups, list)
        or not 1 <= len(groups) <= len(members)
        or not all(
            isinstance(g, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in g)
            for g in groups
        )
        or groups != partition(members, len(groups))
    ):
        # the encoder only builds heads.partition's contiguous groups; any other grouping
        # (a permutation included) would load the trunks' tensors under the wrong heads
        g = len(groups) if isinstance(groups, list) and 1 <= len(groups) <= len(members) else 2
        raise SplitError(
            f"parity groups must split the {len(members)} heads' positions into 1..{len(members)} "
            f"contiguous groups as the encoder does (e.g. {partition(members, min(g, len(members)))}), "
            f"got {str(groups)[:200]}"
        )
    if groups is not None and rank is not None:
        raise SplitError("a parity with several trunks holds whole heads: rank must be null")
    if rank is None:
        trunk, head = split_model(model.eval(), split)
        heads = [copy.deepcopy(head) for _ in members]
        if groups is None:
            par = HeadsParity(trunk, heads, weights, members, split)
        else:
            trunks = [copy.deepcopy(trunk) for _ in groups]
            par = HeadsParity(trunks, heads, weights, members, split, groups=groups)
    else:
        layer = lowrank_layer(model.eval(), split)
        if layer is None:
            raise SplitError(
                f"a low-rank parity needs {split!r} to be an nn.Linear that alone reads the features"
            )
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank < min(layer.weight.shape):
            raise SplitError(
                f"parity rank must be an integer in 1..{min(layer.weight.shape) - 1}, got {rank!r}"
            )
        trunk, _ = split_model(model, split)
        _, rest = split_model(model, split, after=True)
        adapters = [
            LowRankAdapter(layer.in_features, rank, layer.out_features, layer.bias is not None).to(
                layer.weight
            )
            for _ in members
        ]
        heads = [copy.deepcopy(rest) for _ in members]
        par = HeadsParity(trunk, heads, weights, members, split, copy.deepcopy(layer), adapters)
    par.meta = {k: v for k, v in structure.items() if k in ("trunk", "parity_cost", "refit_layers", "alpha")}
    return par

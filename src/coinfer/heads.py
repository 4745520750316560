"""The ``heads`` parity: a merged trunk with each data model's own head.

::

    x -> merged trunk (COIN or w-average; BatchNorm recomputed) -> h
    parity logits = log Σ_i w_i softmax(head_i(h))          (log-sum-exp)

A single merged network cannot output the two-peaked mixture ``Σ w_i p_i`` of
specialists; keeping the last layers per model can. The split point is a dial:
at the output nothing is kept per model (COIN), at the input the parity is the
exact mixture (k times one model's compute). ``parity_cost`` is the parity's
FLOPs over one data model's.

Each head sees merged features it was not trained on, so by default its
layers are **refit in closed form** (:mod:`coinfer.refit`): every
``nn.Linear`` / ``nn.Conv2d`` in call order, by ridge regression toward model
i's own pre-activation on the calibration inputs, shrunk toward the original
weights; a head may start with a norm, and a layer that writes into a residual
stream is refit so the stream matches model i's. ``refit_depth`` (default
``"auto"``) and the ridge strength α are chosen on a held-out slice of the
calibration inputs by how often the parity reconstructs an erased model's
top-1; ``α → ∞`` is the copied head, so the grid contains the copy. The trunk is
the w-average, RegMean (:mod:`coinfer.merge`), both compared (``trunk="auto"``)
or COIN; ``polish_epochs`` adds a short distillation after the closed form.

**Low-rank form.** Where the split layer is an ``nn.Linear`` that alone reads
the features (LeNet-5's ``fc1``), whole per-model copies of it are often the
costliest part of the parity (k × 14% of LeNet-5's FLOPs). The low-rank form
keeps that layer merged and shared, ``S``, and gives each model a rank-ρ
correction: ``head_i(S h + U_i V_iᵀ h + c_i)``. The correction is the ridge
solution ``B_i`` above, written as ``S + B_i``, truncated to rank ρ in the norm
of the merged features (reduced-rank regression: project ``B_i`` on the top-ρ
eigenvectors of ``B_iᵀ XᵀX B_i``). ``split="auto"`` tries ranks
:data:`DEFAULT_RANKS` beside the whole heads, within ``max_parity_cost``.

The parity is a plain ``nn.Module`` returning logits, so decoding, bundles and
serving treat it like any coded model; :meth:`HeadsParity.structure` is what a
bundle records to rebuild it (:func:`build_parity`).
"""

from __future__ import annotations

import copy
import itertools
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from coinfer.errors import CalibrationError, SplitError
from coinfer.merge import (
    batchnorm_modules,
    finish_buffers,
    fisher_weighted_average,
    model_fishers,
    regmean_grams,
    regmean_merge,
    weighted_average,
)
from coinfer.options import HeadsOptions, show_progress
from coinfer.parity import HeadsParity, LowRankAdapter, build_parity, lowrank_layer, partition
from coinfer.predict import predict_probs
from coinfer.refit import (
    HeadRefit,
    RefitStats,
    design,
    plan_refit,
    targets,
    weight_matrix,
)
from coinfer.split import INPUT, count_flops, split_candidates, split_model

__all__ = [
    "build_heads",
    "encode_heads",
    "polish",
    "HeadsParity",
    "HeadsOptions",
    "LowRankAdapter",
    "build_parity",
    "lowrank_layer",
    "DEFAULT_ALPHAS",
    "DEFAULT_RANKS",
]

#: Ridge strengths α tried (relative to the mean diagonal of XᵀX); ``inf`` is
#: the copied head, so the refit is kept only where it wins on held-out data.
DEFAULT_ALPHAS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, math.inf)
#: Ranks of the per-model correction tried by ``rank="auto"`` (low-rank form).
DEFAULT_RANKS: tuple[int, ...] = (4, 8, 16, 32, 64)
#: the trunks trunk="auto" compares on held-out reconstruction (COIN's Fisher passes cost more)
AUTO_TRUNKS = ("average", "regmean")


# --------------------------------------------------------------------------- search
def _score(pc: torch.Tensor, probs: torch.Tensor, row: Sequence[float]) -> tuple[float, float]:
    """(reconstruction agreement, −mean L1 error) of single erasures decoded
    from this parity's output ``pc`` (V, C) and the data outputs ``probs`` (k, V, C)."""
    w = torch.tensor([float(v) for v in row], dtype=probs.dtype, device=probs.device)
    mix = torch.einsum("k,kvc->vc", w, probs)
    agree, err, n = 0.0, 0.0, 0
    for j in range(len(row)):
        if row[j] <= 0:
            continue
        rec = (pc - (mix - w[j] * probs[j])) / w[j]
        agree += float((rec.argmax(-1) == probs[j].argmax(-1)).float().mean())
        err += float((rec - probs[j]).abs().sum(-1).mean())
        n += 1
    return agree / n, -err / n


class Trunks:
    """The merged trunks a search asks for, built on demand and cached:
    ``get(name, models_idx, weights)`` is the ``name`` merge ("average",
    "regmean" or "coin") of those models with those (renormalised) weights,
    BatchNorm statistics recomputed on the calibration inputs. COIN's Fisher of
    each model is computed once, whichever groups it is merged in."""

    def __init__(
        self, models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor | None, opts: HeadsOptions
    ):
        self.models, self.x, self.y, self.opts = list(models), x, y, opts
        self.cache: dict[tuple, nn.Module] = {}
        self.fallbacks: dict[tuple, int] = {}  #: COIN's fall-back entries of each merge
        self.fishers: list[dict[str, torch.Tensor]] | None = None
        self.grams: dict[int, dict[str, torch.Tensor]] = {}  #: RegMean's Gram matrices per model
        self.info: dict[str, Any] = {"forward_passes": 0, "backward_passes": 0}

    @staticmethod
    def key(name: str, idx: Sequence[int], weights: Sequence[float]) -> tuple:
        total = float(sum(weights))
        return (name, tuple(int(i) for i in idx), tuple(float(v) / total for v in weights))

    def get(self, name: str, idx: Sequence[int], weights: Sequence[float]) -> nn.Module:
        key = self.key(name, idx, weights)
        w = key[2]
        if key not in self.cache:
            subset = [self.models[i] for i in idx]
            n = len(self.x)
            if len(subset) == 1:
                # a "merge" of one model is that model, its own BatchNorm statistics kept
                self.cache[key] = copy.deepcopy(subset[0]).eval()
                self.fallbacks[key] = 0
                return self.cache[key]
            if name == "coin":
                fishers = self._fishers()
                merged, fallback = fisher_weighted_average(
                    subset, [fishers[i] for i in idx], w, self.opts.eps
                )
                self.fallbacks[key] = fallback
            elif name == "regmean":
                grams = {j: self._grams(i) for j, i in enumerate(idx)}
                (merged,) = regmean_merge(subset, [w], self.x, self.opts.regmean_alpha, grams=grams)
            else:
                merged = weighted_average(subset, w)
            finish_buffers(merged, subset, w, self.x, "recompute")
            if batchnorm_modules(merged):
                self.info["forward_passes"] += n  # the merged trunk's BatchNorm statistics
            self.cache[key] = merged
        return self.cache[key]

    def fallback(self, name: str, idx: Sequence[int], weights: Sequence[float]) -> int:
        return self.fallbacks.get(self.key(name, idx, weights), 0)

    def _grams(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self.grams:
            self.grams[i] = regmean_grams(self.models[i], self.x)
            self.info["forward_passes"] += len(self.x)  # model i's own layer inputs, once
        return self.grams[i]

    def _fishers(self) -> list[dict[str, torch.Tensor]]:
        if self.fishers is None:
            self.fishers, info = model_fishers(self.models, self.x, self.y, self.opts)
            for key in ("forward_passes", "backward_passes"):
                self.info[key] += info.pop(key)
            self.info.update(info)
        return self.fishers


@dataclass
class _Held:
    """The held-out slice a search scores on: fit inputs, validation inputs and
    the data models' softmax on the latter."""

    x_fit: torch.Tensor
    x_val: torch.Tensor
    probs_val: torch.Tensor  # (k, V, C)


def _hold_out(models, x: torch.Tensor, opts: HeadsOptions) -> _Held:
    n_val = max(1, int(round(opts.holdout * len(x))))
    if len(x) - n_val < 1:
        raise CalibrationError(
            f"holdout={opts.holdout} of {len(x)} calibration inputs leaves none to fit the heads on; "
            "give more calibration inputs or a smaller holdout"
        )
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(opts.seed))
    x_fit, x_val = x[perm[n_val:]], x[perm[:n_val]]
    with torch.no_grad():
        probs_val = torch.stack([torch.softmax(m(x_val), -1) for m in models]).double()
    return _Held(x_fit, x_val, probs_val)


def _fitted(
    models,
    members,
    trunks: Trunks,
    tname: str,
    row,
    split: str,
    groups: int,
    rank_kind: str,
    x: torch.Tensor,
    refit: bool,
):
    """The fitted pieces of one (trunk, split, groups, form) for one parity row."""
    parts = partition(members, groups)
    merged = [
        trunks.get(tname, [members[p] for p in part], [row[members[p]] for p in part]) for part in parts
    ]
    if rank_kind == "lowrank":
        return _LowRankFitted(models, members, merged[0], split, x)
    return _Fitted(models, members, merged, parts, split, x, refit)


def _search_row(
    models,
    ri: int,
    row,
    members,
    trunks: Trunks,
    names,
    by_shape,
    held: _Held,
    alphas,
    opts: HeadsOptions,
    tried: list[dict[str, Any]],
) -> tuple[tuple, int]:
    """Every (trunk, split, groups, form, α, depth) for parity row ``ri`` scored on the
    held-out slice; returns the best (by reconstruction, then error, cost, depth)
    and the samples passed through a model."""
    weights = [row[i] for i in members]
    best, samples = None, 0
    for tname, ((split, groups), variants) in itertools.product(names, by_shape.items()):
        refit = opts.refit and split != INPUT  # at the input the features are the model's own
        h_val = None
        for kind in ("full", "lowrank"):
            ranks = [(r, c) for r, c in variants if (r is None) == (kind == "full")]
            if not ranks:
                continue
            fitted = _fitted(models, members, trunks, tname, row, split, groups, kind, held.x_fit, refit)
            samples += len(held.x_fit) * (groups + 2 * len(members)) + len(held.x_val) * groups
            for alpha in alphas if refit else [math.inf]:
                for par, rank, depth, cost in fitted.variants(
                    alpha, ranks, opts.refit_depth, weights, members
                ):
                    with torch.no_grad():
                        if h_val is None:  # the trunks are the same for every α, depth and rank
                            h_val = par.features(held.x_val)
                        pc = torch.softmax(par.mix(h_val), -1).double()
                    agree, neg_err = _score(pc, held.probs_val, row)
                    finite = math.isfinite(alpha)
                    d = depth if finite else 0
                    tried.append(
                        {
                            "row": ri,
                            "trunk": tname,
                            "split": split,
                            "trunk_groups": groups,
                            "rank": rank,
                            "alpha": alpha if finite else None,
                            "refit_depth": d,
                            "parity_cost": cost,
                            "heldout_recon": agree,
                        }
                    )
                    key = (agree, neg_err, -cost, -d)
                    if best is None or key > best[0]:
                        best = (key, tname, split, groups, rank, alpha, refit, depth)
    assert best is not None
    return best, samples


def encode_heads(
    models: Sequence[nn.Module],
    rows: Sequence[Sequence[float]],
    x: torch.Tensor,
    trunks: Trunks,
    opts: HeadsOptions,
) -> tuple[list[HeadsParity], dict[str, Any]]:
    """Build one :class:`HeadsParity` per row of ``rows`` from the merges of
    ``trunks``: the trunk, split, trunk groups, rank, refit depth and α are
    chosen on a held-out slice of ``x``, then the heads are refit on all of
    ``x``. Returns the parities and their info."""
    k = len(models)
    models = [_eval_copy(m) for m in models]  # never touch the caller's models (modes, BN statistics)
    names = AUTO_TRUNKS if opts.trunk == "auto" else (opts.trunk,)
    held = _hold_out(models, x, opts)
    alphas = list(DEFAULT_ALPHAS) if opts.alphas is None else _as_list(opts.alphas)
    model_flops = count_flops(models[0], x[:1])
    if model_flops <= 0:
        raise SplitError(
            "the data model has no matrix products or convolutions to count: parity_cost is undefined"
        )
    n_heads = max(sum(1 for w in row if w > 0) for row in rows)
    shapes = _choose_shapes(models[0], opts.split, n_heads, x, model_flops, opts)
    by_shape: dict[tuple[str, int], list[tuple[int | None, float]]] = {}
    for split, rank, groups, cost in shapes:
        by_shape.setdefault((split, groups), []).append((rank, cost))
    samples, tried, parities, heldout, polish_seconds, fallback = 0, [], [], [], 0.0, []
    for ri, row in enumerate(rows):
        members = [i for i in range(k) if row[i] > 0]
        weights = [row[i] for i in members]
        best, n = _search_row(models, ri, row, members, trunks, names, by_shape, held, alphas, opts, tried)
        samples += n
        key, tname, split, groups, rank, alpha, refit, depth = best
        heldout.append(key[0])
        if tname == "coin":
            fallback.append(
                sum(
                    trunks.fallback(tname, [members[p] for p in part], [row[members[p]] for p in part])
                    for part in partition(members, groups)
                )
            )
        final = _fitted(
            models,
            members,
            trunks,
            tname,
            row,
            split,
            groups,
            "full" if rank is None else "lowrank",
            x,
            refit,
        )
        samples += len(x) * (groups + 2 * len(members))
        par, _, _, _ = next(final.variants(alpha, [(rank, 0.0)], depth, weights, members))
        par.eval()
        if opts.polish_epochs:
            t0 = time.perf_counter()
            samples += polish(par, [models[i] for i in members], x, opts, seed=opts.seed + ri)
            polish_seconds += time.perf_counter() - t0
        par.meta = {
            "trunk": tname,
            "parity_cost": count_flops(par, x[:1]) / model_flops,
            "refit_layers": final.refit_names(depth) if refit and math.isfinite(alpha) else [],
            "alpha": None if not math.isfinite(alpha) else alpha,
        }
        parities.append(par)
    info = {
        "trunk": [p.meta["trunk"] for p in parities],
        "split": [p.split for p in parities],
        "trunk_groups": [p.num_trunks for p in parities],
        "rank": [p.rank for p in parities],
        "alpha": [p.meta["alpha"] for p in parities],
        "refit_layers": [p.meta["refit_layers"] for p in parities],
        "parity_cost": max(p.meta["parity_cost"] for p in parities),
        "parity_costs": [p.meta["parity_cost"] for p in parities],
        "split_candidates": list(dict.fromkeys(s for s, _, _, _ in shapes)),
        "shapes_tried": [
            {"split": s, "rank": r, "trunk_groups": g, "parity_cost": c} for s, r, g, c in shapes
        ],
        "tried": tried,
        "heldout_recon": sum(heldout) / len(heldout),  # of the closed form, before any polish
        "polish_seconds": polish_seconds,
        "heads_forward_samples": samples,
        "heldout_samples": len(held.x_val),
        **({"fallback_entries": fallback} if fallback else {}),
    }
    return parities, info


def polish(
    par: HeadsParity, teachers: Sequence[nn.Module], x: torch.Tensor, opts: HeadsOptions, seed: int = 0
) -> int:
    """Distil ``par`` in place for ``opts.polish_epochs`` epochs on ``x``: head i
    toward teacher i's answers (cross-entropy to its softmax), trunk and heads
    trained together, in eval mode (BatchNorm statistics and dropout untouched).
    Returns the samples passed forward and backward."""
    with torch.no_grad():
        target = [predict_probs(t, x) for t in teachers]
    params = [p for p in par.parameters() if p.requires_grad]
    optim = torch.optim.Adam(params, lr=opts.polish_lr)
    g = torch.Generator().manual_seed(seed)
    batch = 64
    steps = opts.polish_epochs * math.ceil(len(x) / batch)
    bar = tqdm(total=steps, desc="polish heads parity", disable=not show_progress(opts.progress), leave=False)
    par.eval()
    with torch.enable_grad():  # also under a caller's no_grad()
        for _ in range(opts.polish_epochs):
            perm = torch.randperm(len(x), generator=g)
            for s in range(0, len(x), batch):
                idx = perm[s : s + batch]
                outs = par.head_logits(par.features(x[idx]))
                loss = sum(
                    -(t[idx] * F.log_softmax(o, -1)).sum(-1).mean() for t, o in zip(target, outs, strict=True)
                )
                optim.zero_grad()
                loss.backward()
                optim.step()
                bar.update(1)
    optim.zero_grad(set_to_none=True)
    bar.close()
    par.eval()
    return 2 * opts.polish_epochs * len(x)


def _eval_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()


def _as_list(v) -> list[float]:
    return [float(a) for a in v] if isinstance(v, Sequence) else [float(v)]


class _Fitted:
    """One split's pieces for one parity row: the merged trunk of each group,
    each member's original head and its :class:`~coinfer.refit.HeadRefit`
    (targets from the member's own features, computed once), fit on the
    features of its group's trunk."""

    def __init__(
        self,
        models,
        members,
        merged: Sequence[nn.Module],
        parts: Sequence[Sequence[int]],
        split,
        x,
        refit: bool,
    ):
        self.split = split
        self.parts = [list(p) for p in parts]
        self.trunks = [split_model(m, split)[0].eval() for m in merged]
        group_of = {pos: g for g, part in enumerate(self.parts) for pos in part}
        with torch.no_grad():
            h_merged = [t(x) for t in self.trunks]
        self.orig: list[nn.Module] = []
        self.refits: list[HeadRefit] = []
        self.plan: list = []
        for n, i in enumerate(members):
            t_i, h_i = split_model(models[i], split)
            self.orig.append(h_i.eval())
            if not refit:
                continue
            if n == 0:
                self.plan = plan_refit(h_i)
            with torch.no_grad():
                h_own = t_i.eval()(x)
            self.refits.append(HeadRefit(h_i, h_own, h_merged[group_of[n]], self.plan))
        self.refit = refit

    def depths(self, depth: int | str | None) -> list[int]:
        """The refit depths to try: ``"auto"`` every depth, None all layers, else ``[depth]``."""
        full = max(1, len(self.plan))
        if depth == "auto":
            return list(range(1, full + 1))
        return [full if depth is None else min(int(depth), full)]

    def refit_names(self, depth: int | str | None) -> list[str]:
        return [p.name for p in self.plan[: self.depths(depth)[-1]]]

    def _parity(self, heads, weights, members) -> HeadsParity:
        if len(self.trunks) == 1:
            return HeadsParity(self.trunks[0], heads, weights, members, self.split).eval()
        return HeadsParity(self.trunks, heads, weights, members, self.split, groups=self.parts).eval()

    def variants(self, alpha, ranks, depth, weights, members):
        """(parity, rank None, depth, cost) for each depth tried at ``alpha``."""
        ((_, cost),) = ranks
        if not self.refit or not math.isfinite(alpha):
            heads = [copy.deepcopy(h) for h in self.orig]
            yield self._parity(heads, weights, members), None, 0, cost
            return
        depths = self.depths(depth)
        fits = [r.fit(alpha, depths) for r in self.refits]
        for d in depths:
            yield self._parity([f[d] for f in fits], weights, members), None, d, cost


class _LowRankFitted:
    """The low-rank form at one split (an ``nn.Linear``): the merged trunk and
    split layer, each member's rest-of-head, and per member the ridge problem
    of the correction ``B`` with ``X (S + B)ᵀ ≈ T_i`` (shrunk toward the
    member's own ``W_i − S``), truncated to rank ρ in the norm of the merged
    features (reduced-rank regression: the top right singular vectors of ``X B``)."""

    def __init__(self, models, members, merged, split, x):
        self.split = split
        self.trunk = split_model(merged, split)[0].eval()
        self.shared = copy.deepcopy(merged.get_submodule(split)).eval()
        with torch.no_grad():
            h_merged = self.trunk(x)
        x_design = design(self.shared, h_merged)
        self.gram = x_design.T @ x_design
        s_mat = weight_matrix(self.shared)
        self.rests, self.problems = [], []
        for i in members:
            t_i, h_i = split_model(models[i], split)
            self.rests.append(split_model(models[i], split, after=True)[1].eval())
            layer_i = models[i].get_submodule(split)
            with torch.no_grad():
                t_own = layer_i(t_i.eval()(x))
            cross = x_design.T @ targets(self.shared, t_own) - self.gram @ s_mat.T
            self.problems.append(
                RefitStats(
                    self.gram, cross, weight_matrix(layer_i) - s_mat, float(self.gram.diagonal().mean())
                )
            )
        self.bias = self.shared.bias is not None
        self._cache: dict[float, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _solutions(self, alpha: float) -> list[tuple[torch.Tensor, torch.Tensor, RefitStats]]:
        """Per member: the full correction B ((D[+1]) x out), the eigenvectors of
        Bᵀ(XᵀX + λI)B (descending: the exact reduced-rank ridge directions) and
        the member's statistics."""
        if alpha not in self._cache:
            out = []
            for st in self.problems:
                eye = torch.eye(st.gram.shape[0], dtype=st.gram.dtype, device=st.gram.device)
                if math.isfinite(alpha):
                    lam = alpha * max(st.scale, 1e-12)
                    b = torch.linalg.solve(st.gram + lam * eye, st.cross + lam * st.w0.T)
                    m = b.T @ (st.gram + lam * eye) @ b
                else:
                    b = st.w0.T.clone()
                    m = b.T @ st.gram @ b
                _, vecs = torch.linalg.eigh((m + m.T) / 2)
                out.append((b, vecs.flip(1), st))
            self._cache[alpha] = out
        return self._cache[alpha]

    def refit_names(self, depth) -> list[str]:
        return [self.split]

    def variants(self, alpha, ranks, depth, weights, members):
        """(parity, rank, depth 1, cost) for each (rank, cost) of ``ranks`` at ``alpha``."""
        for rank, cost in ranks:
            yield self.parity(alpha, rank, weights, members, self.split), rank, 1, cost

    def parity(self, alpha, rank, weights, members, split) -> HeadsParity:
        d_in, d_out = self.shared.in_features, self.shared.out_features
        adapters = []
        for b, vecs, st in self._solutions(alpha):
            q = vecs[:, :rank]  # (out, ρ)
            w_corr = b[:d_in] @ q  # (D, ρ): the truncated weight correction is w_corr qᵀ
            ad = LowRankAdapter(d_in, rank, d_out, self.bias).to(self.shared.weight)
            with torch.no_grad():
                ad.down.weight.copy_(w_corr.T.float())
                ad.up.weight.copy_(q.float())
                if self.bias:
                    # a bias costs nothing: the least-squares bias given the truncated weights
                    n = st.gram[d_in, d_in]
                    c = (st.cross[d_in] - st.gram[d_in, :d_in] @ w_corr @ q.T) / n
                    ad.up.bias.copy_(c.float())
            adapters.append(ad)
        heads = [copy.deepcopy(r) for r in self.rests]
        return HeadsParity(self.trunk, heads, weights, members, split, self.shared, adapters).eval()


def _group_counts(k: int, opts: HeadsOptions) -> list[int]:
    """The trunk counts to try for ``k`` heads: "auto" 1..k-1 (k trunks is the
    exact mixture, which the input split already gives), else the one asked (at most k)."""
    if opts.trunk_groups == "auto":
        return list(range(1, max(2, k)))
    return [min(int(opts.trunk_groups), k)]


def _choose_shapes(
    model: nn.Module, split: str, k: int, x: torch.Tensor, model_flops: int, opts: HeadsOptions
) -> list[tuple[str, int | None, int, float]]:
    """[(split, rank or None, trunk groups, parity_cost)] to try: full heads at the
    given split (or at every candidate whose cost fits) on each trunk count of
    ``trunk_groups`` that fits, plus low-rank forms (one trunk) where the split
    layer is an ``nn.Linear`` reading the features alone."""

    def pieces(s: str) -> tuple[nn.Module, nn.Module, torch.Tensor, float, float]:
        """Trunk, head, the trunk's features of two inputs, and the trunk's and one head's share of the FLOPs."""
        trunk, head = split_model(model, s)
        with torch.no_grad():
            h = trunk.eval()(x[:2])
        return (
            trunk,
            head,
            h,
            count_flops(trunk, x[:1]) / model_flops,
            count_flops(head.eval(), h[:1]) / model_flops,
        )

    def lowrank_costs(s: str, ranks: Sequence[int], trunk, h, whole: float) -> list[tuple[int, float]]:
        layer = lowrank_layer(model, s, h) if ranks and s != INPUT else None
        if layer is None:
            return []
        _, rest = split_model(model, s, after=True)
        with torch.no_grad():
            z = layer(h[:1])
        base = count_flops(trunk, x[:1]) + count_flops(layer, h[:1]) + k * count_flops(rest, z)
        out = []
        for r in ranks:
            if r < min(layer.weight.shape):
                ad = LowRankAdapter(layer.in_features, r, layer.out_features, layer.bias is not None).to(h)
                c = (base + k * count_flops(ad, h[:1])) / model_flops
                if c < whole:  # a correction that costs more than the whole layers is pointless
                    out.append((r, c))
        return out

    fits = lambda c: c <= opts.max_parity_cost + 1e-9  # noqa: E731
    counts = _group_counts(k, opts)
    rank_grid = list(DEFAULT_RANKS) if opts.rank == "auto" else ([] if opts.rank is None else [opts.rank])
    if not opts.refit or 1 not in counts:
        rank_grid = []  # the low-rank form is a refit (a regression on the calibration features), one trunk
    if split != "auto":
        trunk, _, h, t_cost, h_cost = pieces(split)
        if isinstance(opts.rank, int):
            shapes = [(split, r, 1, c) for r, c in lowrank_costs(split, [opts.rank], trunk, h, math.inf)]
            if not shapes:
                raise SplitError(
                    f"rank={opts.rank} needs {split!r} to be an nn.Linear that alone reads the features, "
                    "with rank below its smaller dimension"
                )
            return shapes
        if split == INPUT:
            return [(split, None, 1, t_cost + k * h_cost)]
        shapes = [(split, None, g, g * t_cost + k * h_cost) for g in counts]
        if opts.trunk_groups == "auto":  # one trunk always; more where they fit the budget
            shapes = [sh for sh in shapes if sh[2] == 1 or fits(sh[3])]
        return shapes
    out: list[tuple[str, int | None, int, float]] = []
    for s in split_candidates(model):
        if s == INPUT and k > opts.max_parity_cost:
            continue
        trunk, head, h, t_cost, h_cost = pieces(s)
        whole = t_cost + k * h_cost
        out += [(s, r, 1, c) for r, c in lowrank_costs(s, rank_grid, trunk, h, whole) if fits(c)]
        if opts.refit and s != INPUT and not _can_refit(head):
            continue  # e.g. a head starting with a grouped convolution
        for g in [1] if s == INPUT else counts:
            cost = g * t_cost + k * h_cost
            if fits(cost):
                out.append((s, None, g, cost))
    if not out:
        # nothing fits the budget (a tiny model whose classifier is a large share of it):
        # the cheapest refittable whole-heads split, said in a warning and in info
        whole = []
        g = min(counts)
        for s in split_candidates(model):
            if s == INPUT:
                continue
            _, head, _, t_cost, h_cost = pieces(s)
            if not opts.refit or _can_refit(head):
                whole.append((g * t_cost + k * h_cost, s))
        if not whole:
            raise SplitError(
                f"no split point of {type(model).__name__} can hold refit heads; use refit=False or another method"
            )
        cost, s = min(whole)
        warnings.warn(
            f"no split point of {type(model).__name__} fits max_parity_cost={opts.max_parity_cost} with "
            f"k={k} heads; using the cheapest, {s!r}, at parity cost {cost:.2f} (raise max_parity_cost "
            "to choose among more, or use method='coin' for cost 1.0)",
            stacklevel=2,
        )
        out.append((s, None, g, cost))
    return out


def _can_refit(head: nn.Module) -> bool:
    try:
        plan_refit(head)
    except SplitError:
        return False
    return True


def _check_split(model: nn.Module, split: str) -> None:
    """Fail fast (before any Fisher pass) on a split that cannot work."""
    if split == "auto":
        split_candidates(model)  # traces; raises a named SplitError if it cannot
    else:
        split_model(model, split)


# --------------------------------------------------------------------------- the encoder
def build_heads(models, code, x, y, opts: HeadsOptions):
    """Merged trunk + each data model's own head, the head layers refit in closed form."""
    _check_split(models[0], opts.split)  # encode() has validated the options
    n = len(x) if opts.num_samples is None else min(opts.num_samples, len(x))
    if n < 2:
        raise CalibrationError(f"the heads encoder needs at least 2 calibration inputs, got {n}")
    x = x[:n]
    y = None if y is None else y[:n]
    if opts.trunk == "coin" and opts.estimator == "empirical" and y is None:
        raise CalibrationError("estimator 'empirical' needs labelled calibration data: pass (inputs, labels)")
    trunks = Trunks(models, x, y, opts)
    parities, hinfo = encode_heads(models, code.weights, x, trunks, opts)
    info = {"calibration_samples": n, **trunks.info}
    info["forward_passes"] += hinfo.pop("heads_forward_samples")
    info.update(hinfo)
    return parities, info

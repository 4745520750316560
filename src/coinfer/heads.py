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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from coinfer.encoders import (
    CoinOptions,
    _bn_modules,
    _expect,
    _finish_buffers,
    _is_int,
    _is_real,
    _show,
    coin_merge,
    register,
)
from coinfer.errors import CalibrationError, SplitError
from coinfer.merge import DEFAULT_REGMEAN_ALPHA, regmean_merge, weighted_average
from coinfer.predict import predict_probs
from coinfer.refit import (
    MAX_DESIGN,
    HeadRefit,
    RefitStats,
    design,
    plan_refit,
    targets,
    weight_matrix,
)
from coinfer.split import INPUT, count_flops, split_candidates, split_model

__all__ = [
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
TRUNKS = ("average", "regmean", "auto", "coin")
#: the trunks trunk="auto" compares on held-out reconstruction (COIN's Fisher passes cost more)
AUTO_TRUNKS = ("average", "regmean")


class HeadsParity(nn.Module):
    """A parity model: one trunk, ``m`` heads, mixture weights; returns logits
    ``log Σ_i w_i softmax(head_i(trunk(x)))``.

    Args:
        trunk: maps inputs to the features the heads read.
        heads: one module per kept data model, features -> logits.
        weights: the mixture weight of each head (positive, summing to 1).
        members: the data-model index of each head (for the manifest).
        split: the split point's name (for the manifest).
        shared, adapters: the low-rank form. ``shared`` is the split layer
            merged (an ``nn.Linear``), ``adapters[i]`` a :class:`LowRankAdapter`
            of model i, and ``heads[i]`` the rest of model i after that layer:
            ``head_i(shared(h) + adapter_i(h))``. Each model keeps only a
            rank-ρ correction of the split layer instead of the whole layer.
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
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)
        device = next((p.device for p in trunk.parameters()), torch.device("cpu"))
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
        return self.mix(self.trunk(x))

    def head_logits(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Each head's logits from the trunk's features ``h``."""
        if self.adapters is None:
            return [head(h) for head in self.heads]
        z = self.shared(h)
        return [head(z + ad(h)) for head, ad in zip(self.heads, self.adapters, strict=True)]

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        """The parity's logits from the trunk's features ``h``."""
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
    if rank is None:
        trunk, head = split_model(model.eval(), split)
        par = HeadsParity(trunk, [copy.deepcopy(head) for _ in members], weights, members, split)
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


# --------------------------------------------------------------------------- options
@dataclass
class HeadsOptions:
    """Options of the ``heads`` encoder."""

    split: str = "auto"  #: module name where the heads start, "input", or "auto"
    #: how the trunk is merged: average (w-average) | regmean (closed form from each model's
    #: layer-input Gram matrices) | auto (both, chosen on held-out data) | coin (Fisher-weighted)
    trunk: str = "average"
    regmean_alpha: float = DEFAULT_REGMEAN_ALPHA  #: RegMean's scale of the Gram off-diagonals, in [0, 1]
    refit: bool = True  #: ridge-refit each head's first layer(s) onto the merged features
    #: how many of the head's Linear/Conv2d layers to refit, in call order: "auto" (every depth
    #: tried, chosen on held-out data), an integer, or None (all)
    refit_depth: int | str | None = "auto"
    rank: int | str | None = (
        "auto"  #: low-rank form: "auto" (split="auto" also tries DEFAULT_RANKS), an int, or None
    )
    max_parity_cost: float = 1.25  #: split="auto": largest parity FLOPs / one model's FLOPs
    alphas: Sequence[float] | None = None  #: ridge strengths tried, inf = copy (None: DEFAULT_ALPHAS)
    holdout: float = 0.2  #: share of the calibration inputs held out to choose α and the split
    estimator: str = "exact"  #: trunk="coin": Fisher estimator (exact | sampled | empirical)
    num_samples: int | None = None  #: calibration samples used (None: all)
    eps: float = 1e-12  #: trunk="coin": fall back to the w-average where Σ w_i F_i < eps
    normalize: bool = False  #: trunk="coin": rescale each model's Fisher to the same total
    batch_size: int | None = None  #: Fisher chunk size (None: the backend's default)
    backend: str = "auto"  #: Fisher backend: auto | layers | vmap | loop
    #: epochs of distillation after the closed form: every head toward its own model's
    #: answers on the calibration inputs, trunk and heads trained together (0: off)
    polish_epochs: int = 0
    polish_lr: float = 1e-4  #: Adam learning rate of the polish
    seed: int = 0
    progress: bool | None = None

    def validate(self, method: str = "heads") -> None:
        """Refuse values outside the declared ranges before any work, naming the option."""
        _expect(
            method,
            "split",
            self.split,
            isinstance(self.split, str) and bool(self.split),
            "a module name, 'input' or 'auto'",
        )
        _expect(method, "trunk", self.trunk, self.trunk in TRUNKS, f"one of {TRUNKS}")
        a = self.regmean_alpha
        _expect(method, "regmean_alpha", a, _is_real(a) and 0 <= a <= 1, "a number in [0, 1]")
        _expect(method, "refit", self.refit, isinstance(self.refit, bool), "True or False")
        d = self.refit_depth
        _expect(
            method,
            "refit_depth",
            d,
            d is None or d == "auto" or (_is_int(d) and d >= 1),
            "'auto', an integer >= 1 or None (all)",
        )
        r = self.rank
        _expect(
            method,
            "rank",
            r,
            r is None or r == "auto" or (_is_int(r) and r >= 1),
            "'auto', None or an integer >= 1",
        )
        c = self.max_parity_cost
        _expect(method, "max_parity_cost", c, _is_real(c) and c >= 1, "a number >= 1 (one model's FLOPs)")
        a = self.alphas
        vals = list(a) if isinstance(a, Sequence) and not isinstance(a, str) else [a]
        _expect(
            method,
            "alphas",
            a,
            a is None
            or (
                bool(vals)
                and all(
                    isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v) and v >= 0
                    for v in vals
                )
            ),
            "None or non-negative ridge strengths (inf: copy the head)",
        )
        h = self.holdout
        _expect(method, "holdout", h, _is_real(h) and 0 < h < 1, "a fraction in (0, 1)")
        e = self.polish_epochs
        _expect(method, "polish_epochs", e, _is_int(e) and e >= 0, "an integer >= 0")
        lr = self.polish_lr
        _expect(method, "polish_lr", lr, _is_real(lr) and lr > 0, "a positive number")
        # the COIN options of the trunk; buffers are always recomputed for the merged trunk
        CoinOptions(
            estimator=self.estimator,
            num_samples=self.num_samples,
            eps=self.eps,
            normalize=self.normalize,
            batch_size=self.batch_size,
            backend=self.backend,
            seed=self.seed,
            progress=self.progress,
        ).validate(method)


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


def encode_heads(
    models: Sequence[nn.Module],
    rows: Sequence[Sequence[float]],
    x: torch.Tensor,
    merged: Sequence[nn.Module] | Mapping[str, Sequence[nn.Module]],
    opts: HeadsOptions,
) -> tuple[list[HeadsParity], dict[str, Any]]:
    """Build one :class:`HeadsParity` per row of ``rows`` on the merged models
    ``merged`` (one per row, BatchNorm already recomputed; or ``{trunk name:
    one per row}`` to choose among trunks); the trunk, split, rank, refit depth
    and α are chosen on a held-out slice of ``x``, then the heads are refit on
    all of ``x``. Returns the parities and their info."""
    trunks = dict(merged) if isinstance(merged, Mapping) else {opts.trunk: list(merged)}
    k = len(models)
    n_val = max(1, int(round(opts.holdout * len(x))))
    if len(x) - n_val < 1:
        raise CalibrationError(
            f"holdout={opts.holdout} of {len(x)} calibration inputs leaves none to fit the heads on; "
            "give more calibration inputs or a smaller holdout"
        )
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(opts.seed))
    x_fit, x_val = x[perm[n_val:]], x[perm[:n_val]]
    models = [_eval_copy(m) for m in models]  # never touch the caller's models (modes, BN statistics)
    alphas = list(DEFAULT_ALPHAS) if opts.alphas is None else _as_list(opts.alphas)
    model_flops = count_flops(models[0], x[:1])
    if model_flops <= 0:
        raise SplitError(
            "the data model has no matrix products or convolutions to count: parity_cost is undefined"
        )
    with torch.no_grad():
        probs_val = torch.stack([torch.softmax(m(x_val), -1) for m in models]).double()
    n_heads = max(sum(1 for w in row if w > 0) for row in rows)
    shapes = _choose_shapes(models[0], opts.split, n_heads, x, model_flops, opts)
    samples = 0  # samples through a trunk or a head, for the info
    tried: list[dict[str, Any]] = []
    parities: list[HeadsParity] = []
    heldout: list[float] = []  # the chosen parity's held-out reconstruction, per row
    polish_seconds = 0.0
    by_split: dict[str, list[tuple[int | None, float]]] = {}
    for split, rank, cost in shapes:
        by_split.setdefault(split, []).append((rank, cost))
    for ri, row in enumerate(rows):
        members = [i for i in range(k) if row[i] > 0]
        weights = [row[i] for i in members]
        best = None
        for (tname, per_row), (split, variants) in itertools.product(trunks.items(), by_split.items()):
            mgd = per_row[ri]
            refit = opts.refit and split != INPUT  # at the input the features are the model's own
            h_val = None
            for kind in ("full", "lowrank"):
                ranks = [(r, c) for r, c in variants if (r is None) == (kind == "full")]
                if not ranks:
                    continue
                if kind == "full":
                    fitted = _Fitted(models, members, mgd, split, x_fit, refit)
                else:
                    fitted = _LowRankFitted(models, members, mgd, split, x_fit)
                samples += len(x_fit) * (1 + 2 * len(members)) + len(x_val)
                for alpha in alphas if refit else [math.inf]:
                    for par, rank, depth, cost in fitted.variants(
                        alpha, ranks, opts.refit_depth, weights, members
                    ):
                        with torch.no_grad():
                            if h_val is None:  # the trunk is the same for every α, depth and rank
                                h_val = par.trunk(x_val)
                            pc = torch.softmax(par.mix(h_val), -1).double()
                        agree, neg_err = _score(pc, probs_val, row)
                        finite = math.isfinite(alpha)
                        tried.append(
                            {
                                "row": ri,
                                "trunk": tname,
                                "split": split,
                                "rank": rank,
                                "alpha": alpha if finite else None,
                                "refit_depth": depth if finite else 0,
                                "parity_cost": cost,
                                "heldout_recon": agree,
                            }
                        )
                        key = (agree, neg_err, -cost, -(depth if finite else 0))
                        if best is None or key > best[0]:
                            best = (key, tname, split, rank, alpha, refit, depth)
        assert best is not None
        key, tname, split, rank, alpha, refit, depth = best
        mgd = trunks[tname][ri]
        heldout.append(key[0])
        if rank is None:
            final = _Fitted(models, members, mgd, split, x, refit)
        else:
            final = _LowRankFitted(models, members, mgd, split, x)
        samples += len(x) * (1 + 2 * len(members))
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
        "rank": [p.rank for p in parities],
        "alpha": [p.meta["alpha"] for p in parities],
        "refit_layers": [p.meta["refit_layers"] for p in parities],
        "parity_cost": max(p.meta["parity_cost"] for p in parities),
        "parity_costs": [p.meta["parity_cost"] for p in parities],
        "split_candidates": list(dict.fromkeys(s for s, _, _ in shapes)),
        "shapes_tried": [{"split": s, "rank": r, "parity_cost": c} for s, r, c in shapes],
        "tried": tried,
        "heldout_recon": sum(heldout) / len(heldout),  # of the closed form, before any polish
        "polish_seconds": polish_seconds,
        "heads_forward_samples": samples,
        "heldout_samples": n_val,
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
    bar = tqdm(total=steps, desc="polish heads parity", disable=not _show(opts.progress), leave=False)
    par.eval()
    with torch.enable_grad():  # also under a caller's no_grad()
        for _ in range(opts.polish_epochs):
            perm = torch.randperm(len(x), generator=g)
            for s in range(0, len(x), batch):
                idx = perm[s : s + batch]
                outs = par.head_logits(par.trunk(x[idx]))
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
    """One split's pieces for one parity row: the merged trunk, each member's
    original head and its :class:`~coinfer.refit.HeadRefit` (targets from the
    member's own features, computed once)."""

    def __init__(self, models, members, merged, split, x, refit: bool):
        self.split = split
        self.trunk = split_model(merged, split)[0].eval()
        with torch.no_grad():
            h_merged = self.trunk(x)
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
            self.refits.append(HeadRefit(h_i, h_own, h_merged, self.plan))
        self.refit = refit

    def depths(self, depth: int | str | None) -> list[int]:
        """The refit depths to try: ``"auto"`` every depth, None all layers, else ``[depth]``."""
        full = max(1, len(self.plan))
        if depth == "auto":
            return list(range(1, full + 1))
        return [full if depth is None else min(int(depth), full)]

    def refit_names(self, depth: int | str | None) -> list[str]:
        return [p.name for p in self.plan[: self.depths(depth)[-1]]]

    def variants(self, alpha, ranks, depth, weights, members):
        """(parity, rank None, depth, cost) for each depth tried at ``alpha``."""
        ((_, cost),) = ranks
        if not self.refit or not math.isfinite(alpha):
            heads = [copy.deepcopy(h) for h in self.orig]
            yield HeadsParity(self.trunk, heads, weights, members, self.split).eval(), None, 0, cost
            return
        depths = self.depths(depth)
        fits = [r.fit(alpha, depths) for r in self.refits]
        for d in depths:
            heads = [f[d] for f in fits]
            yield HeadsParity(self.trunk, heads, weights, members, self.split).eval(), None, d, cost


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


def _choose_shapes(
    model: nn.Module, split: str, k: int, x: torch.Tensor, model_flops: int, opts: HeadsOptions
) -> list[tuple[str, int | None, float]]:
    """[(split, rank or None, parity_cost)] to try: full heads at the given split
    (or at every candidate whose cost fits), plus low-rank forms where the
    split layer is an ``nn.Linear`` reading the features alone."""

    def pieces(s: str) -> tuple[nn.Module, nn.Module, torch.Tensor, float]:
        """Trunk, head, the trunk's features of two inputs, and the whole-heads cost."""
        trunk, head = split_model(model, s)
        with torch.no_grad():
            h = trunk.eval()(x[:2])
        cost = (count_flops(trunk, x[:1]) + k * count_flops(head.eval(), h[:1])) / model_flops
        return trunk, head, h, cost

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
    rank_grid = list(DEFAULT_RANKS) if opts.rank == "auto" else ([] if opts.rank is None else [opts.rank])
    if not opts.refit:
        rank_grid = []  # the low-rank form is a refit (a regression on the calibration features)
    if split != "auto":
        trunk, _, h, whole = pieces(split)
        if isinstance(opts.rank, int):
            shapes = [(split, r, c) for r, c in lowrank_costs(split, [opts.rank], trunk, h, math.inf)]
            if not shapes:
                raise SplitError(
                    f"rank={opts.rank} needs {split!r} to be an nn.Linear that alone reads the features, "
                    "with rank below its smaller dimension"
                )
            return shapes
        return [(split, None, whole)]
    out: list[tuple[str, int | None, float]] = []
    for s in split_candidates(model):
        if s == INPUT and k > opts.max_parity_cost:
            continue
        trunk, head, h, whole = pieces(s)
        out += [(s, r, c) for r, c in lowrank_costs(s, rank_grid, trunk, h, whole) if fits(c)]
        if not fits(whole):
            continue
        if opts.refit and s != INPUT and not _can_refit(head):
            continue  # e.g. a head starting with a grouped convolution
        out.append((s, None, whole))
    if not out:
        # nothing fits the budget (a tiny model whose classifier is a large share of it):
        # the cheapest refittable whole-heads split, said in a warning and in info
        whole = []
        for s in split_candidates(model):
            if s == INPUT:
                continue
            _, head, _, cost = pieces(s)
            if not opts.refit or _can_refit(head):
                whole.append((cost, s))
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
        out.append((s, None, cost))
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
@register("heads", HeadsOptions)
def _heads(models, code, x, y, opts: HeadsOptions):
    """Merged trunk + each data model's own head, first head layer refit in closed form."""
    _check_split(models[0], opts.split)  # encode() has validated the options
    n = len(x) if opts.num_samples is None else min(opts.num_samples, len(x))
    if n < 2:
        raise CalibrationError(f"the heads encoder needs at least 2 calibration inputs, got {n}")
    x = x[:n]
    y = None if y is None else y[:n]
    info = {"calibration_samples": n, "forward_passes": 0, "backward_passes": 0}
    names = AUTO_TRUNKS if opts.trunk == "auto" else (opts.trunk,)
    trunks: dict[str, list[nn.Module]] = {}
    for name in names:
        if name == "coin":
            trunks[name], info = coin_merge(models, code.weights, x, y, opts)
        elif name == "regmean":
            trunks[name] = regmean_merge(models, code.weights, x, opts.regmean_alpha)
            info["forward_passes"] += len(models) * n  # each model's own layer inputs
        else:
            trunks[name] = [weighted_average(models, row) for row in code.weights]
        for m, row in zip(trunks[name], code.weights, strict=True):
            _finish_buffers(m, models, row, x, "recompute")
        if _bn_modules(models[0]):
            info["forward_passes"] += code.r * n  # the merged trunks' BatchNorm statistics
    parities, hinfo = encode_heads(models, code.weights, x, trunks, opts)
    info["forward_passes"] += hinfo.pop("heads_forward_samples")
    info.update(hinfo)
    return parities, info

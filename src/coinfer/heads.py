"""The ``heads`` parity: a merged trunk with each data model's own head.

::

    x -> merged trunk (COIN or w-average; BatchNorm recomputed) -> h
    parity logits = log Σ_i w_i softmax(head_i(h))          (log-sum-exp)

A single merged network cannot output the two-peaked mixture ``Σ w_i p_i`` of
specialists; keeping the last layers per model can. The split point is a dial:
at the output nothing is kept per model (COIN), at the input the parity is the
exact mixture (k times one model's compute). ``parity_cost`` is the parity's
FLOPs over one data model's.

Each head's first layer (``nn.Linear`` or ``nn.Conv2d``) sees merged features
it was not trained on, so by default it is **refit in closed form**: ridge
regression from the merged trunk's features to model i's own pre-activation on
the calibration inputs, shrunk toward the original weights,

    W_i' = argmin ||X_c W'ᵀ − T_i||² + λ ||W' − W_i||²,   λ = α · tr(X_cᵀX_c) / D,

(convolutions on unfolded patches), with α chosen on a held-out slice of the
calibration inputs by how often the parity reconstructs an erased model's
top-1. ``α → ∞`` is the copied head, so the grid contains the copy.

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
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coinfer.encoders import (
    CoinOptions,
    _bn_modules,
    _expect,
    _finish_buffers,
    _is_int,
    _is_real,
    coin_merge,
    register,
    weighted_average,
)
from coinfer.errors import CalibrationError, SplitError
from coinfer.split import INPUT, count_flops, split_candidates, split_model

__all__ = [
    "HeadsParity",
    "HeadsOptions",
    "LowRankAdapter",
    "build_parity",
    "lowrank_layer",
    "refit_layer",
    "DEFAULT_ALPHAS",
    "DEFAULT_RANKS",
]

#: Ridge strengths α tried (relative to the mean diagonal of XᵀX); ``inf`` is
#: the copied head, so the refit is kept only where it wins on held-out data.
DEFAULT_ALPHAS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, math.inf)
#: Ranks of the per-model correction tried by ``rank="auto"`` (low-rank form).
DEFAULT_RANKS: tuple[int, ...] = (4, 8, 16, 32, 64)
TRUNKS = ("coin", "average")


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

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        """The parity's logits from the trunk's features ``h``."""
        if self.adapters is None:
            outs = [head(h) for head in self.heads]
        else:
            z = self.shared(h)
            outs = [head(z + ad(h)) for head, ad in zip(self.heads, self.adapters, strict=True)]
        logp = torch.stack([F.log_softmax(o, dim=-1) for o in outs])
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


#: Widest design (input features + bias) a refit solves for: its Gram matrix is (D+1)² float64.
MAX_DESIGN = 8192


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
    trunk: str = "average"  #: average | coin: how the trunk is merged (w-average, or COIN's Fisher-weighted)
    refit: bool = True  #: ridge-refit each head's first layer(s) onto the merged features
    refit_depth: int | None = 1  #: how many of the head's Linear/Conv2d layers to refit, in order (None: all)
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
        _expect(method, "refit", self.refit, isinstance(self.refit, bool), "True or False")
        d = self.refit_depth
        _expect(
            method, "refit_depth", d, d is None or (_is_int(d) and d >= 1), "an integer >= 1 or None (all)"
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


# --------------------------------------------------------------------------- refit
def _call_order(head: nn.Module, h: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """The head's modules holding parameters, in the order it first calls them on ``h``."""
    order: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def note(name):
        def hook(mod, args):
            if id(mod) not in seen:
                seen.add(id(mod))
                order.append((name, mod))

        return hook

    hooks = [
        m.register_forward_pre_hook(note(n))
        for n, m in head.named_modules()
        if n and any(True for _ in m.parameters(recurse=False))
    ]
    try:
        with torch.no_grad():
            head(h[:1])
    finally:
        for hk in hooks:
            hk.remove()
    if not order:
        raise SplitError("the head has no layer with parameters to refit")
    return order


def _refit_names(head: nn.Module, h: torch.Tensor, depth: int | None) -> list[str]:
    """The layers to refit: the first one (which must be refittable), then the
    next refittable ones in call order up to ``depth`` in all (None: all)."""
    order = _call_order(head, h)
    _check_refittable(*order[0])
    names = [n for n, m in order if isinstance(m, nn.Linear | nn.Conv2d) and _refittable(m)]
    return names if depth is None else names[:depth]


def _layer_io(layer: nn.Module, head: nn.Module, h: torch.Tensor, batch: int = 256):
    """Inputs and outputs of ``layer`` when ``head`` runs on ``h`` (eval mode)."""
    ins, outs = [], []

    def hook(mod, args, out):  # clone: an in-place activation next would overwrite them
        ins.append(args[0].detach().clone())
        outs.append(out.detach().clone())

    hk = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for s in range(0, len(h), batch):
                head(h[s : s + batch])
    finally:
        hk.remove()
    return torch.cat(ins), torch.cat(outs)


def _design(layer: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """Rows of the regression: features (Linear) or unfolded patches (Conv2d),
    plus a ones column where the layer has a bias."""
    if isinstance(layer, nn.Linear):
        x = a.reshape(-1, a.shape[-1])
    else:
        cols = F.unfold(a, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (N, D, L)
        x = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    x = x.double()
    if layer.bias is None:
        return x
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)


def _targets(layer: nn.Module, out: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return out.reshape(-1, out.shape[-1]).double()
    return out.flatten(2).transpose(1, 2).reshape(-1, out.shape[1]).double()


def _weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The weight as a matrix over the design columns: (out, D), or (out, D + 1) with the bias last."""
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
    if layer.bias is None:
        return w
    return torch.cat([w, layer.bias.detach().double()[:, None]], 1)


def _refittable(layer: nn.Module) -> bool:
    try:
        _check_refittable("", layer)
    except SplitError:
        return False
    return True


def _check_refittable(name: str, layer: nn.Module) -> None:
    if isinstance(layer, nn.Linear):
        return
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise SplitError(f"cannot refit head layer {name!r}: grouped convolution (groups={layer.groups})")
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise SplitError(
                f"cannot refit head layer {name!r}: padding {layer.padding!r}/{layer.padding_mode!r}"
            )
        return
    raise SplitError(
        f"cannot refit head layer {name!r}: it is a {type(layer).__name__}; refit supports nn.Linear "
        "and nn.Conv2d as a head's first layer (choose another split or refit=False)"
    )


@dataclass
class _RefitStats:
    """Sufficient statistics of one head's ridge problem."""

    gram: torch.Tensor  # (D+1, D+1) XᵀX over merged features
    cross: torch.Tensor  # (D+1, out) XᵀT
    w0: torch.Tensor  # (out, D+1) original weights
    scale: float  # mean diagonal of the gram


def _stats(layer: nn.Module, a_in: torch.Tensor, t_out: torch.Tensor) -> _RefitStats:
    width = layer.weight[0].numel() + (layer.bias is not None)
    if width > MAX_DESIGN:
        raise SplitError(
            f"cannot refit a layer reading {width} values per output (limit {MAX_DESIGN}): its ridge "
            "problem would not fit in memory; choose a later split or refit=False"
        )
    x = _design(layer, a_in)
    gram = x.T @ x
    return _RefitStats(
        gram, x.T @ _targets(layer, t_out), _weight_matrix(layer), float(gram.diagonal().mean())
    )


def _own_outputs(head: nn.Module, h_own: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each named layer's output when the model's own head runs on its own features."""
    mods = dict(head.named_modules())
    return {n: _layer_io(mods[n], head, h_own)[1] for n in names}


def _fit_head(
    head: nn.Module,
    h_merged: torch.Tensor,
    targets: Mapping[str, torch.Tensor],
    names: Sequence[str],
    alpha: float,
    first: _RefitStats | None = None,
) -> nn.Module:
    """A copy of ``head`` whose layers ``names`` are refit in call order: each
    layer's input is what the (already refit) copy feeds it on the merged
    features, its target the original layer's output on the model's own."""
    head = copy.deepcopy(head)
    if not math.isfinite(alpha):
        return head
    mods = dict(head.named_modules())
    for li, name in enumerate(names):
        layer = mods[name]
        if li == 0 and first is not None:
            st = first
        else:
            a_in, _ = _layer_io(layer, head, h_merged)
            st = _stats(layer, a_in, targets[name])
        refit_layer(layer, st, alpha)
    return head


def refit_layer(layer: nn.Module, stats: _RefitStats, alpha: float) -> None:
    """Set ``layer``'s weight (and bias) to the ridge solution at strength ``alpha``."""
    lam = alpha * max(stats.scale, 1e-12)
    d = stats.gram.shape[0]
    a = stats.gram + lam * torch.eye(d, dtype=stats.gram.dtype, device=stats.gram.device)
    rhs = stats.cross + lam * stats.w0.T
    w = torch.linalg.solve(a, rhs).T  # (out, D) or (out, D + 1)
    d_w = layer.weight[0].numel()
    with torch.no_grad():
        layer.weight.copy_(w[:, :d_w].reshape(layer.weight.shape).to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(w[:, d_w].to(layer.bias.dtype))


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
    merged: Sequence[nn.Module],
    opts: HeadsOptions,
) -> tuple[list[HeadsParity], dict[str, Any]]:
    """Build one :class:`HeadsParity` per row of ``rows`` on the merged models
    ``merged`` (one per row, BatchNorm already recomputed); the split, rank and
    α are chosen on a held-out slice of ``x``, then the heads are refit on all
    of ``x``. Returns the parities and their info."""
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
    for ri, (row, mgd) in enumerate(zip(rows, merged, strict=True)):
        members = [i for i in range(k) if row[i] > 0]
        weights = [row[i] for i in members]
        best = None
        by_split: dict[str, list[tuple[int | None, float]]] = {}
        for split, rank, cost in shapes:
            by_split.setdefault(split, []).append((rank, cost))
        for split, variants in by_split.items():
            refit = opts.refit and split != INPUT  # at the input the features are the model's own
            h_val = None
            for kind in ("full", "lowrank"):
                ranks = [(r, c) for r, c in variants if (r is None) == (kind == "full")]
                if not ranks:
                    continue
                if kind == "full":
                    fitted = _Fitted(models, members, mgd, split, x_fit, refit, opts.refit_depth)
                else:
                    fitted = _LowRankFitted(models, members, mgd, split, x_fit)
                samples += len(x_fit) * (1 + 2 * len(members)) + len(x_val)
                for alpha in alphas if refit else [math.inf]:
                    for rank, cost in ranks:
                        par = fitted.parity(alpha, rank, weights, members, split)
                        with torch.no_grad():
                            if h_val is None:  # the trunk is the same for every α and rank
                                h_val = par.trunk(x_val)
                            pc = torch.softmax(par.mix(h_val), -1).double()
                        agree, neg_err = _score(pc, probs_val, row)
                        tried.append(
                            {
                                "row": ri,
                                "split": split,
                                "rank": rank,
                                "alpha": None if not math.isfinite(alpha) else alpha,
                                "parity_cost": cost,
                                "heldout_recon": agree,
                            }
                        )
                        key = (agree, neg_err, -cost)
                        if best is None or key > best[0]:
                            best = (key, split, rank, alpha, refit)
        assert best is not None
        _, split, rank, alpha, refit = best
        if rank is None:
            final = _Fitted(models, members, mgd, split, x, refit, opts.refit_depth)
            refit_layers = final.names if refit and math.isfinite(alpha) else []
        else:
            final = _LowRankFitted(models, members, mgd, split, x)
            refit_layers = [split]
        samples += len(x) * (1 + 2 * len(members))
        par = final.parity(alpha, rank, weights, members, split).eval()
        par.meta = {
            "trunk": opts.trunk,
            "parity_cost": count_flops(par, x[:1]) / model_flops,
            "refit_layers": refit_layers,
            "alpha": None if not math.isfinite(alpha) else alpha,
        }
        parities.append(par)
    info = {
        "split": [p.split for p in parities],
        "rank": [p.rank for p in parities],
        "alpha": [p.meta["alpha"] for p in parities],
        "refit_layers": [p.meta["refit_layers"] for p in parities],
        "parity_cost": max(p.meta["parity_cost"] for p in parities),
        "parity_costs": [p.meta["parity_cost"] for p in parities],
        "split_candidates": list(dict.fromkeys(s for s, _, _ in shapes)),
        "shapes_tried": [{"split": s, "rank": r, "parity_cost": c} for s, r, c in shapes],
        "tried": tried,
        "heads_forward_samples": samples,
        "heldout_samples": n_val,
    }
    return parities, info


def _eval_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()


def _as_list(v) -> list[float]:
    return [float(a) for a in v] if isinstance(v, Sequence) else [float(v)]


class _Fitted:
    """One split's pieces for one parity row: the merged trunk, each member's
    original head, the refit targets, and the first layer's ridge statistics
    (shared by every α)."""

    def __init__(self, models, members, merged, split, x, refit: bool, depth: int | None):
        self.trunk = split_model(merged, split)[0].eval()
        with torch.no_grad():
            self.h_merged = self.trunk(x)
        self.orig, self.targets, self.first = [], [], []
        self.names: list[str] = []
        for n, i in enumerate(members):
            t_i, h_i = split_model(models[i], split)
            h_i.eval()
            self.orig.append(h_i)
            if not refit:
                continue
            with torch.no_grad():
                h_own = t_i.eval()(x)
            if n == 0:
                self.names = _refit_names(h_i, self.h_merged, depth)
            self.targets.append(_own_outputs(h_i, h_own, self.names))
            layer = dict(h_i.named_modules())[self.names[0]]
            a_in, _ = _layer_io(layer, h_i, self.h_merged)
            self.first.append(_stats(layer, a_in, self.targets[-1][self.names[0]]))
        self.refit = refit

    def heads(self, alpha: float) -> list[nn.Module]:
        if not self.refit or not math.isfinite(alpha):
            return [copy.deepcopy(h) for h in self.orig]
        return [
            _fit_head(h, self.h_merged, t, self.names, alpha, first=f)
            for h, t, f in zip(self.orig, self.targets, self.first, strict=True)
        ]

    def parity(self, alpha, rank, weights, members, split) -> HeadsParity:
        return HeadsParity(self.trunk, self.heads(alpha), weights, members, split).eval()


class _LowRankFitted:
    """The low-rank form at one split (an ``nn.Linear``): the merged trunk and
    split layer, each member's rest-of-head, and per member the ridge problem
    of the correction ``B`` with ``X (S + B)ᵀ ≈ T_i`` (shrunk toward the
    member's own ``W_i − S``), truncated to rank ρ in the norm of the merged
    features (reduced-rank regression: the top right singular vectors of ``X B``)."""

    def __init__(self, models, members, merged, split, x):
        self.trunk = split_model(merged, split)[0].eval()
        self.shared = copy.deepcopy(merged.get_submodule(split)).eval()
        with torch.no_grad():
            h_merged = self.trunk(x)
        x_design = _design(self.shared, h_merged)
        self.gram = x_design.T @ x_design
        s_mat = _weight_matrix(self.shared)
        self.rests, self.problems = [], []
        for i in members:
            t_i, h_i = split_model(models[i], split)
            self.rests.append(split_model(models[i], split, after=True)[1].eval())
            layer_i = models[i].get_submodule(split)
            with torch.no_grad():
                t_own = layer_i(t_i.eval()(x))
            cross = x_design.T @ _targets(self.shared, t_own) - self.gram @ s_mat.T
            self.problems.append(
                _RefitStats(
                    self.gram, cross, _weight_matrix(layer_i) - s_mat, float(self.gram.diagonal().mean())
                )
            )
        self.bias = self.shared.bias is not None
        self._cache: dict[float, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _solutions(self, alpha: float) -> list[tuple[torch.Tensor, torch.Tensor, _RefitStats]]:
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
        if opts.refit and s != INPUT and not _refittable(_call_order(head.eval(), h)[0][1]):
            continue  # a head starting with BatchNorm etc. cannot be refit
        out.append((s, None, whole))
    if not out:
        raise SplitError(
            f"no split point of {type(model).__name__} fits max_parity_cost={opts.max_parity_cost} "
            f"with k={k} heads; raise max_parity_cost"
        )
    return out


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
    if opts.trunk == "coin":
        merged, info = coin_merge(models, code.weights, x, y, opts)
    else:
        merged = [weighted_average(models, row) for row in code.weights]
        info = {"calibration_samples": n, "forward_passes": 0, "backward_passes": 0}
    for m, row in zip(merged, code.weights, strict=True):
        _finish_buffers(m, models, row, x, "recompute")
    if _bn_modules(models[0]):
        info["forward_passes"] += code.r * n  # the merged trunks' BatchNorm statistics
    parities, hinfo = encode_heads(models, code.weights, x, merged, opts)
    info["forward_passes"] += hinfo.pop("heads_forward_samples")
    info.update(hinfo)
    return parities, info

"""Per-sample squared gradients layer by layer, without materialising every gradient.

The ``layers`` backend of :func:`coinfer.diagonal_fisher`. One ordinary batched
forward pass records each layer's input and output; one batched backward pass
per class (``exact``) or one in all (``sampled``/``empirical``) gives the
gradient ``δ`` at every layer's output for every sample at once. The
per-sample parameter gradient is then a small contraction of ``δ`` with the
layer's input (as in BackPACK and Opacus):

* ``nn.Linear``: ``g_b = δ_b aᵀ_b``, so ``Σ_b w_b g_b² = (w·δ²)ᵀ a²`` — no
  per-sample gradient is ever stored;
* ``nn.Conv2d``: ``g_b = δ_b · unfold(a_b)ᵀ``, summed over output positions;
* BatchNorm in eval mode: ``g_γ = Σ δ·x̂``, ``g_β = Σ δ`` over positions.

It applies when every parameter that needs a Fisher is the ``weight`` or
``bias`` of one of these layers (exact types, not subclasses, no forward
hooks), each such layer runs once per forward pass with dim 0 the sample dim,
and samples do not interact in eval mode. :func:`plan` checks the first from
the model's structure; :func:`accumulate` checks the second while recording,
and on the first chunk compares with autograd: the per-sample gradients must
sum to the batch gradient (a parameter used outside its layer: tied weights,
functional calls) and the first sample's must be its own gradient (samples
that interact, a batch regrouped inside the model). Any failure raises
:class:`Unsupported` and the caller falls back to ``torch.func``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


#: Output gradients of at most this many classes are held at once (``exact``
#: with many classes would otherwise hold ``C`` copies of every activation).
CLASS_GROUP = 10


class Unsupported(Exception):
    """The model cannot use the layer-wise backend (the caller falls back)."""


def _layer_ok(mod: nn.Module) -> bool:
    t = type(mod)
    if t is nn.Linear:
        return True
    if t is nn.Conv2d:
        return (
            mod.groups == 1
            and mod.padding_mode == "zeros"
            and isinstance(mod.padding, tuple)
            and all(isinstance(p, int) for p in mod.padding)
        )
    if t in _BN:
        return mod.track_running_stats and mod.running_mean is not None and mod.affine
    return False


def plan(model: nn.Module, names: list[str]) -> dict[str, tuple[nn.Module, str]]:
    """Map each parameter name to ``(layer, attribute)``; raise :class:`Unsupported`."""
    owner: dict[str, tuple[nn.Module, str]] = {}
    seen: set[int] = set()
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen and p.requires_grad:
                raise Unsupported(f"parameter {mname}.{pname} is shared")
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            if full not in names:
                continue
            if not _layer_ok(mod):
                raise Unsupported(f"{full} belongs to a {type(mod).__name__}")
            if pname not in ("weight", "bias"):
                raise Unsupported(f"{full} is not a layer's own weight or bias (reparametrised?)")
            if mod._forward_pre_hooks or mod._forward_hooks:
                raise Unsupported(f"{mname} has forward hooks that may change what it computes")
            owner[full] = (mod, pname)
    missing = [n for n in names if n not in owner]
    if missing:
        raise Unsupported(f"parameters {missing} have no supported owner layer")
    return owner


def _conv_weight(mod: nn.Conv2d, a: torch.Tensor, d: torch.Tensor, reduce) -> torch.Tensor:
    """``reduce`` of the per-sample weight gradients of a conv layer, ``(O, I, kh, kw)``.

    Two equivalent ways, whichever is faster for the layer's shape (measured on
    CPU): ``unfold`` (im2col, one batched matmul; best with few input
    channels) or one batched matmul per kernel offset on strided views of the
    padded input (best with many channels: im2col's copy dominates there)."""
    s_, b_, o_ = d.shape[:3]
    ho, wo = d.shape[3:]
    kh, kw = mod.kernel_size
    if mod.in_channels < 8:
        cols = F.unfold(a, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
        g = torch.einsum("sbol,bil->sboi", d.flatten(3), cols)
        return reduce(g).reshape(mod.weight.shape)
    ph, pw = mod.padding
    ap = F.pad(a, (pw, pw, ph, ph)) if ph or pw else a
    sh, sw = mod.stride
    dh, dw = mod.dilation
    df = d.transpose(0, 1).reshape(b_, s_ * o_, ho * wo)
    out = torch.empty(o_, a.shape[1], kh, kw, dtype=a.dtype)
    for i in range(kh):
        for j in range(kw):
            sl = ap[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
            g = torch.bmm(df, sl.reshape(b_, a.shape[1], ho * wo).transpose(1, 2))
            out[:, :, i, j] = reduce(g.reshape(b_, s_, o_, -1).transpose(0, 1))
    return out


def _reduced(mod: nn.Module, a: torch.Tensor, d: torch.Tensor, reduce) -> dict[str, torch.Tensor]:
    """``reduce`` applied to the per-sample gradients ``(S, B, *param shape)`` of
    each of ``mod``'s parameters, given its input ``a`` and output gradients ``d``
    ``(S, B, *output shape)``; ``reduce`` sums over the first two dims."""
    if type(mod) is nn.Conv2d:
        out = {"weight": _conv_weight(mod, a, d, reduce)}
        if mod.bias is not None:
            out["bias"] = reduce(d.flatten(3).sum(-1))
        return out
    if type(mod) is nn.Linear:  # inputs with extra dims: (B, ..., I)
        a3 = a.reshape(a.shape[0], -1, a.shape[-1])
        d4 = d.reshape(d.shape[0], d.shape[1], -1, d.shape[-1])
        out = {"weight": reduce(torch.einsum("sbto,bti->sboi", d4, a3))}
        if mod.bias is not None:
            out["bias"] = reduce(d4.sum(2))
        return out
    # BatchNorm, eval mode: y = γ x̂ + β with running statistics
    shape = (1, -1) + (1,) * (a.ndim - 2)
    xhat = (a - mod.running_mean.reshape(shape)) / torch.sqrt(mod.running_var.reshape(shape) + mod.eps)
    dims = tuple(range(3, d.ndim))

    def over_positions(t):  # sum(()) would sum every dim
        return t.sum(dims) if dims else t

    return {"weight": reduce(over_positions(d * xhat)), "bias": reduce(over_positions(d))}


def accumulate(
    model: nn.Module,
    owner: dict[str, tuple[nn.Module, str]],
    fisher: dict[str, torch.Tensor],
    x: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    check: bool,
) -> None:
    """Add ``Σ_{s,b} weights[s,b] · (∂ log p(targets[s,b] | x_b) / ∂θ)²`` to ``fisher``.

    ``targets``/``weights`` are ``(S, B)``: class indices and their weights
    (``exact``: every class with weight ``p``; otherwise one label with
    weight 1). With ``check``, first verify the layer-wise gradients against
    autograd's batch gradient; raise :class:`Unsupported` on a mismatch.
    """
    layers = {id(m): m for m, _ in owner.values()}
    calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in layers}

    def hook(mod, inp, out):
        if not inp or not isinstance(inp[0], torch.Tensor):
            raise Unsupported(f"a {type(mod).__name__} was called without a positional tensor input")
        if inp[0].shape[:1] != x.shape[:1] or out.shape[:1] != x.shape[:1]:
            raise Unsupported(
                f"a {type(mod).__name__} saw a batch of {inp[0].shape[:1]} (input) / "
                f"{out.shape[:1]} (output) for {len(x)} samples: dim 0 is not the sample dim"
            )
        calls[id(mod)].append((inp[0].detach(), out))
        return out.clone()  # an in-place op downstream must not rewrite the recorded output

    handles = [m.register_forward_hook(hook) for m in layers.values()]
    try:
        with torch.enable_grad():
            logp = torch.log_softmax(model(x), dim=-1)
    finally:
        for h in handles:
            h.remove()
    if any(len(c) != 1 for c in calls.values()):
        raise Unsupported("a layer ran more or less than once in the forward pass")
    order = list(layers)
    outs = [calls[i][0][1] for i in order]
    n_targets = targets.shape[0]
    for g0 in range(0, n_targets, CLASS_GROUP):
        group = range(g0, min(n_targets, g0 + CLASS_GROUP))
        deltas = [[] for _ in order]
        for s in group:
            obj = logp.gather(1, targets[s].reshape(-1, 1)).sum()
            gs = torch.autograd.grad(obj, outs, retain_graph=s + 1 < n_targets, allow_unused=True)
            for i, g in enumerate(gs):
                deltas[i].append(torch.zeros_like(outs[i]) if g is None else g)
        per_layer = {lid: (calls[lid][0][0], torch.stack(deltas[i])) for i, lid in enumerate(order)}
        if check and g0 == 0:
            _check(model, owner, per_layer, x, targets[0])
        _contract(layers, owner, per_layer, weights[g0 : g0 + len(group)], fisher)


def _contract(layers, owner, per_layer, weights, fisher) -> None:
    """Add the weighted squared per-sample gradients of one group of targets."""
    for lid, (a, d) in per_layer.items():
        mod = layers[lid]
        names = [n for n, (m, _) in owner.items() if m is mod]
        attrs = {owner[n][1]: n for n in names}
        if type(mod) is nn.Linear and a.ndim == 2:
            # Σ_{s,b} w (δ_o a_i)² = Σ_b (Σ_s w δ_o²) a_i²: never form g_b
            d2 = (weights.unsqueeze(-1) * d.pow(2)).sum(0)  # (B, O)
            if "weight" in attrs:
                fisher[attrs["weight"]] += d2.T @ a.pow(2)
            if "bias" in attrs:
                fisher[attrs["bias"]] += d2.sum(0)
            continue

        def weighted_square(g, w=weights):
            return (w.reshape(w.shape + (1,) * (g.ndim - 2)) * g.pow(2)).sum((0, 1))

        red = _reduced(mod, a, d, weighted_square)
        for attr, name in attrs.items():
            fisher[name] += red[attr]


def _check(model, owner, per_layer, x, target) -> None:
    """Compare with autograd for ``target``: the per-sample gradients must sum to
    the batch gradient (catches parameters used outside their layer), and the
    first sample's must equal its own gradient (catches samples that interact
    or a batch regrouped inside the model)."""
    names = list(owner)
    params = dict(model.named_parameters())
    tensors = [params[n] for n in names]
    with torch.enable_grad():
        logp = torch.log_softmax(model(x), -1).gather(1, target.reshape(-1, 1))
        batch = torch.autograd.grad(logp.sum(), tensors, allow_unused=True, retain_graph=True)
        first = torch.autograd.grad(logp[0, 0], tensors, allow_unused=True)
    for name, wb, w0 in zip(names, batch, first, strict=True):
        mod, attr = owner[name]
        a, d = per_layer[id(mod)]
        got_b = _reduced(mod, a, d[:1], lambda g: g.sum((0, 1)))[attr]
        got_0 = _reduced(mod, a[:1], d[:1, :1], lambda g: g.sum((0, 1)))[attr]
        for got, want, what in ((got_b, wb, "summed over the batch"), (got_0, w0, "of one sample")):
            want = torch.zeros_like(got) if want is None else want
            tol = 1e-4 * float(want.abs().max().clamp(min=1e-12)) + 1e-6
            if float((got - want).abs().max()) > tol:
                raise Unsupported(f"layer-wise gradient of {name} {what} disagrees with autograd")

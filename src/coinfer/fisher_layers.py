"""Per-sample squared gradients layer by layer, without materialising every gradient.

The ``layers`` backend of :func:`coinfer.diagonal_fisher`. One ordinary batched
forward pass records each layer's input and output (its logits also give the
class probabilities, and the labels the ``sampled`` estimator draws); one
batched backward pass per class (``exact``) or one in all (``sampled``,
``empirical``: the loss ``Σ_b -log p(y_b | x_b)``) gives the gradient ``δ`` at
every layer's output for every sample at once. The per-sample parameter
gradient is then a small contraction of ``δ`` with the layer's input (as in
BackPACK and Opacus):

* ``nn.Linear``: ``g_b = δ_b aᵀ_b``, so ``Σ_b w_b g_b² = (w·δ²)ᵀ a²`` — no
  per-sample gradient is ever stored;
* ``nn.Conv2d``: ``g_b = δ_b ⋆ a_b`` (correlation, summed over output
  positions): a grouped convolution's weight gradient with the batch as
  the groups, or one batched matmul per kernel offset;
* BatchNorm in eval mode: ``g_γ = Σ δ·x̂``, ``g_β = Σ δ`` over positions.

It applies when every parameter that needs a Fisher is the ``weight`` or
``bias`` of one of these layers (exact types, not subclasses, no forward
hooks), each such layer runs once per forward pass with dim 0 the sample dim,
and samples do not interact in eval mode. :func:`plan` checks the first from
the model's structure; :func:`accumulate` checks the second while recording,
and on the first chunk compares with autograd: the first and the last sample,
each run through the model on its own (as ``vmap`` and the loop see them),
must get the gradient the contraction gives them inside the batch (this
catches a parameter used outside its layer — tied weights, functional calls —
samples that interact, a batch regrouped inside the model). Any failure
raises :class:`Unsupported` and the caller falls back to ``torch.func``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


#: Output gradients of at most this many classes are held at once (``exact``
#: with many classes would otherwise hold ``C`` copies of every activation).
CLASS_GROUP = 10


class Unsupported(Exception):
    """The model cannot use the layer-wise backend (the caller falls back)."""


@contextlib.contextmanager
def _exact_float32(on: bool):
    """Without TF32 while ``on``. The self-check compares autograd's gradient of
    one sample with the contraction inside the batch; with PyTorch's default of
    TF32 for cuDNN convolutions (10-bit mantissa) the two paths drift apart
    through a deep net (ResNet-20 on an H200 was refused even at 1e-2), so the
    checked chunk runs in full float32 and the check keeps its 1e-4 tolerance."""
    if not on:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


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


def _conv_per_sample(mod: nn.Conv2d, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients ``(S, B, O, I, kh, kw)`` of a conv layer in one
    call: the weight gradient of a grouped convolution with the batch folded
    into ``B`` groups (the ``torch.func``/Opacus construction)."""
    s_, b_, o_ = d.shape[:3]
    go = d.transpose(0, 1).reshape(1, b_ * s_ * o_, *d.shape[3:])
    inp = a.reshape(1, b_ * a.shape[1], *a.shape[2:])
    # only the weight's shape matters for the weight gradient
    w = a.new_zeros(()).expand(b_ * s_ * o_, *mod.weight.shape[1:])
    _, gw, _ = torch.ops.aten.convolution_backward(
        go, inp, w, None, mod.stride, mod.padding, mod.dilation, False, (0, 0), b_, (False, True, False)
    )
    return gw.reshape(b_, s_, *mod.weight.shape).transpose(0, 1)


def _conv_weight(mod: nn.Conv2d, a: torch.Tensor, d: torch.Tensor, reduce) -> tuple[torch.Tensor, ...]:
    """``reduce`` of the per-sample weight gradients of a conv layer.

    Two equivalent ways, whichever was faster for the layer's shape (measured
    per layer of lenet5/resnet20 on one CPU thread): the grouped-convolution
    weight gradient (:func:`_conv_per_sample`; best with few input channels,
    and with few output gradients — one target, up to 64 channels — at more
    than 8x8 output positions), or one batched matmul per kernel offset on
    strided views of the padded input (best with many channels and many
    targets, or small feature maps). ``unfold`` (im2col) was never the
    fastest by a clear margin."""
    s_, b_, o_ = d.shape[:3]
    ho, wo = d.shape[3:]
    kh, kw = mod.kernel_size
    if mod.in_channels < 8 or (s_ * o_ <= 64 and ho * wo > 64):
        return reduce(_conv_per_sample(mod, a, d))
    ph, pw = mod.padding
    ap = F.pad(a, (pw, pw, ph, ph)) if ph or pw else a
    sh, sw = mod.stride
    dh, dw = mod.dilation
    df = d.transpose(0, 1).reshape(b_, s_ * o_, ho * wo)
    outs = None
    for i in range(kh):
        for j in range(kw):
            sl = ap[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
            g = torch.bmm(df, sl.reshape(b_, a.shape[1], ho * wo).transpose(1, 2))
            red = reduce(g.reshape(b_, s_, o_, -1).transpose(0, 1))
            if outs is None:
                outs = tuple(r.new_empty(r.shape + (kh, kw)) for r in red)
            for o, r in zip(outs, red, strict=True):
                o[..., i, j] = r
    return outs


def _reduced(mod: nn.Module, a: torch.Tensor, d: torch.Tensor, reduce) -> dict[str, tuple[torch.Tensor, ...]]:
    """``reduce`` applied to the per-sample gradients ``(S, B, *param shape)`` of
    each of ``mod``'s parameters, given its input ``a`` and output gradients ``d``
    ``(S, B, *output shape)``; ``reduce`` returns a tuple of reductions over the
    first two dims (each of the parameter's shape)."""
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
    targets_for: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    check: bool,
) -> None:
    """See :func:`_accumulate`; a checked chunk on CUDA runs without TF32 (:func:`_exact_float32`)."""
    with _exact_float32(check and x.is_cuda):
        _accumulate(model, owner, fisher, x, targets_for, check)


def _accumulate(
    model: nn.Module,
    owner: dict[str, tuple[nn.Module, str]],
    fisher: dict[str, torch.Tensor],
    x: torch.Tensor,
    targets_for: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    check: bool,
) -> None:
    """Add ``Σ_{s,b} weights[s,b] · (∂ log p(targets[s,b] | x_b) / ∂θ)²`` to ``fisher``.

    ``targets_for(logits)`` is called once with the detached ``(B, C)`` logits
    of the recording forward pass (so one forward pass serves both) and returns
    ``(targets, weights)``, both ``(S, B)``: class indices and their weights
    (``exact``: every class with weight ``p``; ``sampled``/``empirical``: one
    label with weight 1, one backward pass in all). With ``check``, the
    layer-wise gradients for ``targets[0]`` are compared with autograd's
    (batch sum and first sample, from the same forward pass); a mismatch
    raises :class:`Unsupported`, possibly after part of ``fisher`` was updated.
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
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    targets, weights = targets_for(logits.detach())
    if any(len(c) != 1 for c in calls.values()):
        raise Unsupported("a layer ran more or less than once in the forward pass")
    with torch.enable_grad():
        logp = torch.log_softmax(logits, dim=-1)
    order = list(layers)
    names = list(owner)
    live = dict(model.named_parameters())
    tensors = [live[n] for n in names]
    want = {}
    if check:
        # the first and last samples on their own, as the vmap and loop
        # backends see them: autograd's gradient for each must be what the
        # contraction gives for it inside the batch
        for i in sorted({0, len(x) - 1}):
            with torch.enable_grad():
                lp = torch.log_softmax(model(x[i : i + 1]), dim=-1)[0, targets[0, i]]
            grads = torch.autograd.grad(lp, tensors, allow_unused=True)
            want[i] = dict(zip(names, grads, strict=True))
    outs = [calls[i][0][1] for i in order]
    n_targets = targets.shape[0]
    for g0 in range(0, n_targets, CLASS_GROUP):
        group = range(g0, min(n_targets, g0 + CLASS_GROUP))
        deltas = [[] for _ in order]
        for s in group:
            obj = logp.gather(1, targets[s].reshape(-1, 1)).sum()
            keep = s + 1 < n_targets
            gs = torch.autograd.grad(obj, outs, retain_graph=keep, allow_unused=True)
            for i, g in enumerate(gs):
                deltas[i].append(torch.zeros_like(outs[i]) if g is None else g)
        per_layer = {
            lid: (calls[lid][0][0], dl[0].unsqueeze(0) if len(dl) == 1 else torch.stack(dl))
            for lid, dl in zip(order, deltas, strict=True)
        }
        w = weights[g0 : g0 + len(group)]
        if check and g0 == 0:
            _contract_and_check(layers, owner, per_layer, w, fisher, want)
        else:
            _contract(layers, owner, per_layer, w, fisher)


def _weighted_square(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w.reshape(w.shape + (1,) * (g.ndim - 2)) * g.pow(2)).sum((0, 1))


def _contract(layers, owner, per_layer, weights, fisher) -> None:
    """Add the weighted squared per-sample gradients of one group of targets."""
    for lid, (a, d) in per_layer.items():
        mod = layers[lid]
        _contract_layer(mod, {attr: n for n, (m, attr) in owner.items() if m is mod}, a, d, weights, fisher)


def _contract_layer(mod, attrs, a, d, weights, fisher) -> None:
    if type(mod) is nn.Linear and a.ndim == 2:
        # Σ_{s,b} w (δ_o a_i)² = Σ_b (Σ_s w δ_o²) a_i²: never form g_b
        d2 = (weights.unsqueeze(-1) * d.pow(2)).sum(0)  # (B, O)
        if "weight" in attrs:
            fisher[attrs["weight"]] += d2.T @ a.pow(2)
        if "bias" in attrs:
            fisher[attrs["bias"]] += d2.sum(0)
        return
    red = _reduced(mod, a, d, lambda g: (_weighted_square(g, weights),))
    for attr, name in attrs.items():
        fisher[name] += red[attr][0]


def _contract_and_check(layers, owner, per_layer, weights, fisher, want) -> None:
    """:func:`_contract`, and compare the layer-wise gradients for the first
    target with autograd's ``want`` (``{sample: {name: gradient}}``, each
    sample run on its own). A mismatch means a parameter used outside its
    layer (tied weights, a functional call), samples that interact, or a batch
    regrouped inside the model. With one target (``sampled``, ``empirical``)
    each conv layer's per-sample gradients are formed once for the square and
    the checks."""
    samples = list(want)

    def checks(g):
        return tuple(g[0, i] for i in samples)

    for lid, (a, d) in per_layer.items():
        mod = layers[lid]
        attrs = {attr: n for n, (m, attr) in owner.items() if m is mod}
        if d.shape[0] == 1 and not (type(mod) is nn.Linear and a.ndim == 2):
            red = _reduced(mod, a, d, lambda g: (_weighted_square(g, weights), *checks(g)))
            squares = {attr: red[attr][0] for attr in attrs}
            red = {attr: r[1:] for attr, r in red.items()}
        else:
            squares = {attr: torch.zeros_like(fisher[n]) for attr, n in attrs.items()}
            _contract_layer(mod, attrs, a, d, weights, {n: squares[attr] for attr, n in attrs.items()})
            red = _reduced(mod, a, d[:1], checks)
        for attr, name in attrs.items():
            for i, got in zip(samples, red[attr], strict=True):
                w = want[i][name]
                w = torch.zeros_like(got) if w is None else w
                tol = 1e-4 * float(w.abs().max().clamp(min=1e-12)) + 1e-6
                if float((got - w).abs().max()) > tol:
                    raise Unsupported(
                        f"layer-wise gradient of {name} for sample {i} disagrees with autograd "
                        "(a parameter used outside its layer, or samples that interact)"
                    )
            fisher[name] += squares[attr]

"""Closed-form refit of a head's layers onto merged features.

A head copied from data model i reads features of a *merged* trunk it was not
trained on. Refitting makes it read them as model i read its own: each
``nn.Linear`` / ``nn.Conv2d`` of the head, in the order the head calls them,
is set to the ridge solution

    W' = argmin ||X W'ᵀ − T||² + λ ||W' − W_i||²,   λ = α · tr(XᵀX) / D,

where X is what the (already refit) copy feeds the layer on the merged
features and T is the target: the layer's output in model i's own head on
model i's own features (convolutions on unfolded patches). ``α → ∞`` is the
copied layer.

Two things make this work on modern blocks (:func:`plan_refit`):

- **Norms.** A head may start with LayerNorm / BatchNorm / GroupNorm: the
  norm is kept (model i's own affine), and the first Linear/Conv after it is
  refit on the normalised merged features.
- **Residuals.** A layer whose output is added back into a residual stream
  (``x + mlp(norm(x))``, ``relu(bn(conv(x)) + shortcut)``) is refit so that the
  *sum* matches model i's: its target is ``own(x + f) − running(x)``, what model
  i's sum was minus what the copy's residual carries now. The merged trunk's
  error in the residual stream is then cancelled where the stream is written,
  not carried past every refit layer. A BatchNorm (eval mode) between the layer
  and the add is inverted on the target.

The plan is read from the head's :mod:`torch.fx` graph, so it applies to any
traceable head; the refit itself is a few ridge solves per layer.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from coinfer.errors import SplitError

__all__ = [
    "MAX_DESIGN",
    "NORMS",
    "RefitStats",
    "RefitLayer",
    "plan_refit",
    "refit_layer",
    "layer_stats",
    "HeadRefit",
]

#: Widest design (input features + bias) a refit solves for: its Gram matrix is (D+1)² float64.
MAX_DESIGN = 8192
#: Norms a head may start with (kept; the layer after them is refit).
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
_PASS = (nn.Dropout, nn.Identity)
_ADDS = (operator.add, operator.iadd, torch.add)


# --------------------------------------------------------------------------- ridge primitives
@dataclass
class RefitStats:
    """Sufficient statistics of one layer's ridge problem."""

    gram: torch.Tensor  #: (D+1, D+1) XᵀX over the design rows
    cross: torch.Tensor  #: (D+1, out) XᵀT
    w0: torch.Tensor  #: (out, D+1) the original weights (the shrinkage target)
    scale: float  #: mean diagonal of the gram (λ = α · scale)


def check_refittable(name: str, layer: nn.Module) -> None:
    """Raise a named :class:`SplitError` unless ``layer`` can be refit in closed form."""
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
        "and nn.Conv2d, after any number of norms (choose another split or refit=False)"
    )


def refittable(layer: nn.Module) -> bool:
    try:
        check_refittable("", layer)
    except SplitError:
        return False
    return True


def design(layer: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """Rows of the regression: features (Linear, any leading dims) or unfolded
    patches (Conv2d), plus a ones column where the layer has a bias."""
    if isinstance(layer, nn.Linear):
        x = a.reshape(-1, a.shape[-1])
    else:
        cols = F.unfold(a, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (N, D, L)
        x = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    x = x.double()
    if layer.bias is None:
        return x
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)


def targets(layer: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """The layer's outputs as rows matching :func:`design`."""
    if isinstance(layer, nn.Linear):
        return out.reshape(-1, out.shape[-1]).double()
    return out.flatten(2).transpose(1, 2).reshape(-1, out.shape[1]).double()


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The weight as a matrix over the design columns: (out, D), or (out, D + 1) with the bias last."""
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
    if layer.bias is None:
        return w
    return torch.cat([w, layer.bias.detach().double()[:, None]], 1)


def layer_stats(layer: nn.Module, a_in: torch.Tensor, t_out: torch.Tensor) -> RefitStats:
    """The ridge statistics of ``layer`` for inputs ``a_in`` and target outputs ``t_out``."""
    width = layer.weight[0].numel() + (layer.bias is not None)
    if width > MAX_DESIGN:
        raise SplitError(
            f"cannot refit a layer reading {width} values per output (limit {MAX_DESIGN}): its ridge "
            "problem would not fit in memory; choose a later split or refit=False"
        )
    x = design(layer, a_in)
    gram = x.T @ x
    return RefitStats(gram, x.T @ targets(layer, t_out), weight_matrix(layer), float(gram.diagonal().mean()))


def refit_layer(layer: nn.Module, stats: RefitStats, alpha: float) -> None:
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


# --------------------------------------------------------------------------- the plan
@dataclass
class RefitLayer:
    """One layer of a head to refit, read from the head's graph."""

    name: str  #: module name in the head
    input: str  #: fx node whose value the layer reads
    output: str  #: fx node of the layer's output
    add: str | None = None  #: the residual add its output writes into, if any
    other: str | None = None  #: that add's other operand (the residual stream)
    bns: list[str] = field(default_factory=list)  #: BatchNorms between the layer and the add (inverted)


def as_graph(head: nn.Module) -> fx.GraphModule:
    """``head`` as a GraphModule sharing its submodules (traced if it is not one)."""
    if isinstance(head, fx.GraphModule):
        return head
    try:
        return fx.symbolic_trace(head)
    except Exception as exc:  # fx raises many types
        raise SplitError(
            f"cannot refit the head: torch.fx could not trace it ({type(exc).__name__})"
        ) from None


def _is_add(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _ADDS) or (
        n.op == "call_method" and n.target in ("add", "add_")
    )


def _reads_input(node: fx.Node) -> bool:
    """Whether ``node``'s value depends on the graph's input (per sample), not only on
    parameters or constants (those are the same in the model's head and the copy)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n.op == "placeholder":
            return True
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return False


def _writeback(
    gm: fx.GraphModule, node: fx.Node, mods: Mapping[str, nn.Module]
) -> tuple[str | None, str | None, list[str]]:
    """(add, other operand, BatchNorms passed) if ``node``'s output flows, through
    dropout / identity / eval BatchNorm only, into one residual add."""
    cur, bns = node, []
    while len(cur.users) == 1:
        (u,) = cur.users
        if u.op == "call_module" and isinstance(mods.get(str(u.target)), _PASS):
            cur = u
            continue
        bn = mods.get(str(u.target)) if u.op == "call_module" else None
        if (
            isinstance(bn, nn.modules.batchnorm._BatchNorm)
            and bn.track_running_stats
            and bn.running_var is not None
        ):
            bns.append(str(u.target))
            cur = u
            continue
        if _is_add(u) and len(u.args) >= 2 and not u.kwargs:
            a, b = u.args[0], u.args[1]
            other = b if a is cur else a if b is cur else None
            if isinstance(other, fx.Node) and _reads_input(other):
                return u.name, other.name, bns
        break
    return None, None, []


def _fits(layer: nn.Module) -> bool:
    return layer.weight[0].numel() + (layer.bias is not None) <= MAX_DESIGN


def plan_refit(head: nn.Module) -> list[RefitLayer]:
    """The head's refittable layers in call order, each with where it writes.

    The head's first module holding parameters must be a norm or a refittable
    layer (a Linear, or an ungrouped zero-padded Conv2d); a module called more
    than once (shared weights) is left as it is.

    Raises:
        SplitError: naming the first layer when the head cannot be refit.
    """
    gm = as_graph(head)
    mods = dict(gm.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and any(True for _ in mods[str(n.target)].parameters(recurse=False)):
            calls.setdefault(str(n.target), []).append(n)
    if not calls:
        raise SplitError("the head has no layer with parameters to refit")
    first_non_norm = next((name for name in calls if not isinstance(mods[name], NORMS)), None)
    if first_non_norm is None:
        raise SplitError("the head has only norms: nothing to refit")
    check_refittable(first_non_norm, mods[first_non_norm])
    if not _fits(mods[first_non_norm]):
        raise SplitError(
            f"cannot refit head layer {first_non_norm!r}: it reads more than {MAX_DESIGN} values per output "
            "(its ridge problem would not fit in memory); choose a later split or refit=False"
        )
    plan = []
    for name, nodes in calls.items():
        layer = mods[name]
        if len(nodes) != 1 or not refittable(layer) or not _fits(layer):
            continue  # shared, not refittable or too wide: kept as it is; later layers still refit
        node = nodes[0]
        if not node.args or not isinstance(node.args[0], fx.Node):
            continue
        add, other, bns = _writeback(gm, node, mods)
        plan.append(RefitLayer(name, node.args[0].name, node.name, add, other, bns))
    return plan


# --------------------------------------------------------------------------- running the graph
class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names = names
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        v = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = v.detach().clone()  # clone: an in-place op next would overwrite it
        return v


def node_values(
    gm: fx.GraphModule, x: torch.Tensor, names: Sequence[str], batch: int = 512
) -> dict[str, torch.Tensor]:
    """The values of the graph nodes ``names`` when ``gm`` runs on ``x`` (batched, no grad)."""
    want = set(names)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in want}
    with torch.no_grad():
        for s in range(0, len(x), batch):
            rec = _Recorder(gm, want)
            rec.run(x[s : s + batch])
            for n in want:
                parts[n].append(rec.values[n])
    return {n: torch.cat(v) for n, v in parts.items()}


def _invert_bn(bn: nn.modules.batchnorm._BatchNorm, y: torch.Tensor) -> torch.Tensor:
    """z with bn(z) = y (eval mode: a per-channel affine map on dim 1)."""
    with torch.no_grad():
        gamma = bn.weight.detach() if bn.affine else torch.ones_like(bn.running_var)
        beta = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean)
        scale = gamma / torch.sqrt(bn.running_var + bn.eps)
        shift = beta - scale * bn.running_mean
        shape = [1, -1] + [1] * (y.ndim - 2)
        tiny = scale.abs() < 1e-6  # a channel the norm zeroes (gamma = 0): any input will do
        safe = torch.where(tiny, torch.ones_like(scale), scale)
        z = (y - shift.reshape(shape)) / safe.reshape(shape)
        return torch.where(tiny.reshape(shape), torch.zeros_like(z), z)


class HeadRefit:
    """One data model's head, ready to be refit onto merged features.

    Holds the plan, the targets from the model's own head on its own features
    (computed once) and the first layer's ridge statistics (the same for every
    α); :meth:`fit` returns refit copies for a list of depths at one α.
    """

    def __init__(
        self, head: nn.Module, h_own: torch.Tensor, h_merged: torch.Tensor, plan: Sequence[RefitLayer]
    ):
        self.head = head.eval()
        self.plan = list(plan)
        self.h_merged = h_merged
        gm = as_graph(self.head)
        wanted = [(p.add if p.add else p.output) for p in self.plan]
        self.own = node_values(gm, h_own, wanted) if self.plan else {}
        self._first: RefitStats | None = None

    def _target(self, p: RefitLayer, running: Mapping[str, torch.Tensor], mods) -> torch.Tensor:
        if p.add is None:
            return self.own[p.output]
        t = self.own[p.add] - running[p.other]
        for bn in reversed(p.bns):
            t = _invert_bn(mods[bn], t)
        return t

    @torch.no_grad()
    def fit(self, alpha: float, depths: Sequence[int]) -> dict[int, nn.Module]:
        """Copies of the head with its first ``d`` planned layers refit at
        strength ``alpha``, for each ``d`` in ``depths`` (``alpha = inf``: copies)."""
        if not math.isfinite(alpha):
            return {d: copy.deepcopy(self.head) for d in depths}
        out: dict[int, nn.Module] = {}
        head = copy.deepcopy(self.head)
        top = max(depths)
        gm = as_graph(head)
        mods = dict(gm.named_modules())
        for li, p in enumerate(self.plan[:top]):
            layer = mods[p.name]
            if li == 0 and self._first is not None:
                st = self._first
            else:
                names = [p.input] + ([p.other] if p.other else [])
                running = node_values(gm, self.h_merged, names)
                st = layer_stats(layer, running[p.input], self._target(p, running, mods))
                if li == 0:
                    self._first = st
            refit_layer(layer, st, alpha)
            if li + 1 in depths:
                out[li + 1] = copy.deepcopy(head)
        for d in depths:  # depths past the plan's end are the whole plan
            out.setdefault(d, copy.deepcopy(head))
        return out

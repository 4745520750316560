"""Split a classifier into a trunk and a head, and count FLOPs.

``split_model(model, "fc1")`` returns ``(trunk, head)`` with
``head(trunk(x)) == model(x)``: the head starts at the first call of module
``fc1``. A plain ``nn.Sequential`` is sliced at a child's name; any other model
is traced with :mod:`torch.fx` and its graph is cut in two. A cut is accepted
only where exactly one value crosses it (the features the heads read), so a
cut inside a residual block, where the block input also flows around it, is
refused with the names of the values that cross. ``"input"`` splits before the
first layer: the trunk is the identity and the head is the whole model.

The state-dict keys of the trunk and the head are the model's own (``fc1.weight``
stays ``fc1.weight``), so splitting a freshly built model of the same
architecture gives skeletons that a saved trunk or head loads into.

FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode` (matrix
products and convolutions, two FLOPs per multiply-add; element-wise work is
not counted).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from coinfer.errors import SplitError

__all__ = ["split_model", "split_candidates", "count_flops", "INPUT"]

#: The split point before the first layer (trunk = identity, head = the model).
INPUT = "input"


@dataclass
class _Traced:
    gm: fx.GraphModule
    nodes: list[fx.Node]


def _trace(model: nn.Module) -> _Traced:
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SplitError(
            f"cannot split {type(model).__name__}: torch.fx could not trace it "
            f"({type(exc).__name__}: {first[:200]}). Data-dependent control flow in forward() "
            "is the usual cause; write it without Python branches on tensor values, "
            "or make the model an nn.Sequential and split at a child's name"
        ) from None
    return _Traced(gm, list(gm.graph.nodes))


def _module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def _cut_index(t: _Traced, split: str) -> int | None:
    for i, n in enumerate(t.nodes):
        if n.op == "call_module" and (n.target == split or str(n.target).startswith(split + ".")):
            return i
    return None


def _crossing(t: _Traced, cut: int) -> list[fx.Node]:
    after = set(t.nodes[cut:])
    return [n for n in t.nodes[:cut] if n.op != "get_attr" and any(u in after for u in n.users)]


def _plain_sequential(model: nn.Module) -> bool:
    """An nn.Sequential whose forward is Sequential's own (a subclass may override it)."""
    return isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward


def _sequential_split(model: nn.Sequential, split: str, after: bool) -> tuple[nn.Module, nn.Module] | None:
    names = [n for n, _ in model.named_children()]
    if split not in names:
        return None
    i = names.index(split) + (1 if after else 0)
    return model[:i], model[i:]


def split_model(model: nn.Module, split: str, after: bool = False) -> tuple[nn.Module, nn.Module]:
    """Split ``model`` into ``(trunk, head)`` so that ``head(trunk(x)) == model(x)``.

    Args:
        model: a classifier; it is deep-copied, never modified.
        split: the name of the module where the head starts (e.g. ``"fc1"``,
            ``"layers.6"``), or ``"input"`` (trunk = identity).
        after: cut right after the (single) call of module ``split`` instead
            of before it: the trunk ends with that module's output.

    Raises:
        SplitError: unknown module name, a model torch.fx cannot trace, a
            module that forward() never calls, or a cut that more than one
            value crosses.
    """
    if not isinstance(split, str) or not split:
        raise SplitError(f"split must be a module name or {INPUT!r}, got {split!r}")
    model = copy.deepcopy(model).eval()  # fx records self.training as a constant: trace the eval branch
    if split == INPUT:
        if after:
            raise SplitError("after=True needs a module name, not 'input'")
        return nn.Identity(), model
    names = _module_names(model)
    if split not in names:
        shown = ", ".join(repr(n) for n in names[:12]) + (" …" if len(names) > 12 else "")
        raise SplitError(
            f"split {split!r} is not a module of {type(model).__name__}: expected {INPUT!r} or one of {shown}"
        )
    if _plain_sequential(model):
        parts = _sequential_split(model, split, after)
        if parts is not None:
            return parts
    t = _trace(model)
    cut = _cut_index(t, split)
    if cut is None:
        raise SplitError(f"module {split!r} of {type(model).__name__} is never called by its forward()")
    if after:
        calls = [i for i, n in enumerate(t.nodes) if n.op == "call_module" and n.target == split]
        if len(calls) != 1:
            raise SplitError(
                f"cannot cut after {split!r}: it must be a layer called exactly once, found {len(calls)} calls"
            )
        cut = calls[0] + 1
    crossing = _crossing(t, cut)
    extra_inputs = [n.name for n in crossing if n.op == "placeholder" and n is not t.nodes[0]]
    if extra_inputs:
        raise SplitError(
            f"cannot split {type(model).__name__} at {split!r}: the head would read forward() argument(s) "
            f"{extra_inputs} besides the features; a split model's forward must take one input"
        )
    if len(crossing) != 1:
        raise SplitError(
            f"cannot split {type(model).__name__} at {split!r}: {len(crossing)} values cross the cut "
            f"({', '.join(n.name for n in crossing)}); a head must read exactly one tensor "
            "(a cut inside a residual block is the usual cause: split at the block instead)"
        )
    h = crossing[0]
    before, after = t.nodes[:cut], t.nodes[cut:]

    trunk_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in before:
        env[n] = trunk_graph.node_copy(n, lambda a: env[a])
    trunk_graph.output(env[h])

    head_graph = fx.Graph()
    env2: dict[fx.Node, fx.Node] = {h: head_graph.placeholder("features")}
    after_set = set(after)
    for n in before:  # parameters read directly (get_attr) by the head come along
        if n.op == "get_attr" and any(u in after_set for u in n.users):
            env2[n] = head_graph.node_copy(n, lambda a: env2[a])
    for n in after:
        env2[n] = head_graph.node_copy(n, lambda a: env2[a])
    trunk = fx.GraphModule(t.gm, trunk_graph, class_name=f"{type(model).__name__}Trunk")
    head = fx.GraphModule(t.gm, head_graph, class_name=f"{type(model).__name__}Head")
    return trunk, head


def split_candidates(model: nn.Module) -> list[str]:
    """Module names where ``model`` can be split, in forward order, ``"input"`` first.

    One name per distinct cut (the outermost module that starts there); only
    modules holding parameters, and only cuts a single value crosses.
    """
    has_params = {n for n, m in model.named_modules() if n and any(True for _ in m.parameters())}
    if _plain_sequential(model):
        names = [n for n, _ in model.named_children()]
        return [INPUT] + [n for n in names[1:] if n in has_params]
    t = _trace(copy.deepcopy(model).eval())
    seen: dict[int, str] = {}
    for name in _module_names(model):  # named_modules: outer before inner
        if name not in has_params:
            continue
        cut = _cut_index(t, name)
        if cut is None or cut in seen or len(_crossing(t, cut)) != 1:
            continue
        seen[cut] = name
    first_call = min((i for i, n in enumerate(t.nodes) if n.op == "call_module"), default=None)
    out = [INPUT]
    for cut in sorted(seen):
        # a cut before the first layer (nothing but reshapes above it) is the input split
        if first_call is not None and cut <= first_call:
            continue
        out.append(seen[cut])
    return out


def count_flops(module: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass of ``module`` on ``x``, counted by
    :class:`~torch.utils.flop_counter.FlopCounterMode`."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            module(x)
    finally:
        for m, was in flags:
            m.training = was
    return int(fc.get_total_flops())

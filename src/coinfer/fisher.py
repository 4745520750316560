"""Diagonal Fisher information of a classifier.

``F = E_x E_{y ~ q(y|x)} [ (d/dθ log p_θ(y|x))^2 ]`` element-wise, where ``q`` is

* ``exact``: the model's own predictive distribution, summed over all classes;
* ``sampled``: one ``y ~ p_θ(·|x)`` per input (seeded), an unbiased estimate of
  ``exact`` at about one class's cost;
* ``empirical``: the given labels (cheap, but biased when models disagree).

Three backends compute the per-sample squared gradients:

* ``layers`` (:mod:`coinfer.fisher_layers`): batched forward/backward passes
  and a per-layer contraction, for models built from ``nn.Linear``,
  ``nn.Conv2d`` and BatchNorm — the fastest;
* ``vmap``: per-sample gradients batched with ``torch.func``
  (``functional_call``, ``vmap``, ``grad``/``jacrev``) in chunks — any module;
* ``loop``: the slow per-sample autograd loop that serves as the reference.

``backend="auto"`` (the default) takes ``layers`` where it applies, for every
estimator, and ``vmap`` otherwise (also when the first chunk's check against
autograd fails). ``sampled`` draws its labels from the class probabilities
with one ``torch.multinomial`` call per chunk and the seeded generator, the
same on every backend, so all backends use the same labels for a seed and
agree up to rounding.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap
from tqdm.auto import tqdm

from coinfer import fisher_layers
from coinfer.errors import CalibrationError

__all__ = ["diagonal_fisher", "ESTIMATORS", "fisher_total"]

log = logging.getLogger(__name__)

ESTIMATORS = ("exact", "sampled", "empirical")
BACKENDS = ("auto", "layers", "vmap", "loop")

#: Default samples per vmap call, per estimator, chosen with
#: ``benchmarks/fisher.py`` on a 2-core CPU (docs/performance.md). ``exact``
#: holds ``chunk * C`` per-sample gradients at once and peaks near 8-16 samples
#: (lenet5, resnet20); beyond that it gets slower again. One-gradient
#: estimators keep improving up to 64 and more.
DEFAULT_CHUNK = {"exact": 8, "sampled": 64, "empirical": 64}

#: Default samples per batched pass of the ``layers`` backend, per estimator,
#: from the chunk sweep of ``benchmarks/fisher.py`` (lenet5, resnet20). Memory
#: grows with ``chunk * S`` copies of the largest conv layer's weight gradient
#: (``S``: up to 10 classes for ``exact``, 1 otherwise). ``sampled`` draws its
#: labels chunk by chunk, so its chunk must be the same on every backend for
#: them to draw the same labels from the same seed: it is ``DEFAULT_CHUNK``'s.
DEFAULT_LAYER_CHUNK = {"exact": 32, "sampled": DEFAULT_CHUNK["sampled"], "empirical": 64}


def _iter_batches(
    inputs: torch.Tensor | Iterable, labels: torch.Tensor | None, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    if isinstance(inputs, torch.Tensor):
        if labels is not None and len(labels) != len(inputs):
            raise CalibrationError(f"labels has {len(labels)} entries but inputs has {len(inputs)} samples")
        for s in range(0, len(inputs), batch_size):
            yield inputs[s : s + batch_size], None if labels is None else labels[s : s + batch_size]
        return
    for item in inputs:
        if isinstance(item, torch.Tensor):
            yield item, None
        elif isinstance(item, list | tuple) and len(item) >= 1:
            x = item[0]
            y = item[1] if len(item) > 1 else None
            yield x, y
        else:
            raise CalibrationError(
                f"calibration batches must be tensors or (inputs, labels) pairs, got {type(item).__name__}"
            )


def _n_samples(inputs) -> int | None:
    if isinstance(inputs, torch.Tensor):
        return len(inputs)
    ds = getattr(inputs, "dataset", None)
    try:
        return len(ds) if ds is not None else len(inputs)
    except TypeError:
        return None


def diagonal_fisher(
    model: nn.Module,
    inputs: torch.Tensor | Iterable,
    estimator: str = "exact",
    labels: torch.Tensor | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    max_samples: int | None = None,
    vectorize: bool = True,
    progress: bool | None = None,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information of ``model`` (returning logits) on ``inputs``.

    Args:
        model: an ``nn.Module`` classifier mapping ``(B, *input_shape)`` to
            ``(B, C)`` logits. Evaluated in eval mode (BatchNorm uses its running
            statistics); its mode is restored afterwards.
        inputs: a ``(N, *input_shape)`` tensor, or an iterable/DataLoader of
            tensors or ``(inputs, labels)`` pairs.
        estimator: ``"exact"``, ``"sampled"`` or ``"empirical"``.
        labels: ``(N,)`` class indices, needed by ``empirical`` with a tensor input.
        batch_size: samples per batched chunk (bounds memory: ``exact`` under
            ``vmap`` holds ``batch_size * C`` gradients at once). Default:
            :data:`DEFAULT_LAYER_CHUNK` for ``layers``, :data:`DEFAULT_CHUNK` for ``vmap``.
        seed: seed for the ``sampled`` estimator.
        max_samples: stop after this many samples.
        vectorize: ``False`` is ``backend="loop"`` (kept for compatibility).
        progress: show a progress bar (default: when stderr is a terminal).
        backend: ``"auto"``, ``"layers"``, ``"vmap"`` or ``"loop"`` (see the
            module docstring). ``"layers"`` raises ``ValueError`` when the model
            does not fit it; ``"auto"`` falls back to ``"vmap"``. All give the
            same result up to floating-point rounding.

    Returns:
        ``{name: tensor}`` aligned with ``model.named_parameters()`` (parameters
        that require grad), each the mean over samples of squared score.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not vectorize:
        backend = "loop"
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no parameters that require grad")
    owner = None
    explicit = backend == "layers"
    if backend in ("auto", "layers"):
        try:
            owner = fisher_layers.plan(model, list(params))
            backend = "layers"
        except fisher_layers.Unsupported as e:
            if backend == "layers":
                raise ValueError(f"the layers backend does not apply to this model: {e}") from None
            backend = "vmap"
    vmap_chunk = DEFAULT_CHUNK[estimator] if batch_size is None else batch_size
    if batch_size is None:
        batch_size = DEFAULT_LAYER_CHUNK[estimator] if backend == "layers" else vmap_chunk
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    gen = (
        torch.Generator().manual_seed(seed)
        if seed is not None
        else torch.Generator().manual_seed(torch.seed() % (2**63))
    )
    was_training = model.training
    model.eval()

    def log_probs(p, x):
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return torch.log_softmax(out, dim=-1).squeeze(0)

    def log_prob_of(p, x, y):
        # gather, not [y]: indexing with a batched tensor is data-dependent under vmap
        return log_probs(p, x).gather(0, y.reshape(1)).squeeze(0)

    per_sample_jac = vmap(jacrev(log_probs), in_dims=(None, 0))
    per_sample_grad = vmap(grad(log_prob_of), in_dims=(None, 0, 0))

    total = _n_samples(inputs)
    if max_samples is not None and total is not None:
        total = min(total, max_samples)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=total, desc=f"fisher[{estimator}]", unit="sample", disable=not show, leave=False)
    seen = 0
    state = {
        "backend": backend,
        "owner": owner,
        "checked": False,
        "explicit": explicit,
        "vmap_chunk": vmap_chunk,
    }
    try:
        for x, y in _iter_batches(inputs, labels, batch_size):
            if max_samples is not None and seen >= max_samples:
                break
            if max_samples is not None:
                x = x[: max_samples - seen]
                y = None if y is None else y[: max_samples - seen]
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise CalibrationError(
                    f"calibration inputs must be a floating-point tensor, got "
                    f"{getattr(x, 'dtype', type(x).__name__)}"
                )
            if estimator == "empirical" and y is None:
                raise CalibrationError("the empirical estimator needs labels")
            # split loader batches into vectorisation chunks
            for s in range(0, len(x), batch_size):
                xc = x[s : s + batch_size]
                yc = None if y is None else torch.as_tensor(y[s : s + batch_size]).long()
                _accumulate(
                    model,
                    params,
                    buffers,
                    fisher,
                    xc,
                    yc,
                    estimator,
                    gen,
                    state,
                    per_sample_jac,
                    per_sample_grad,
                )
                seen += len(xc)
                bar.update(len(xc))
    finally:
        bar.close()
        model.train(was_training)
    if seen == 0:
        raise CalibrationError("no calibration samples were given")
    return {n: f / seen for n, f in fisher.items()}


def _probs_and_labels(logits, y, estimator, gen):
    """Class probabilities of one chunk and its labels: drawn from them for
    ``sampled`` (one ``multinomial`` call per chunk with the seeded generator,
    whatever the backend), the given ones for ``empirical``, ``None`` for ``exact``."""
    if logits.ndim != 2:
        raise CalibrationError(f"model must return (batch, C) logits, got shape {tuple(logits.shape)}")
    probs = torch.softmax(logits, dim=-1)
    if estimator == "sampled":
        # drawn on the CPU with the seeded CPU generator: the same labels whatever the device
        y = torch.multinomial(probs.detach().cpu(), 1, generator=gen).squeeze(1).to(probs.device)
    if y is not None and ((y < 0).any() or (y >= probs.shape[1]).any()):
        raise CalibrationError(f"labels must lie in 0..{probs.shape[1] - 1}")
    return probs, y


def _accumulate(model, params, buffers, fisher, x, y, estimator, gen, state, jac_fn, grad_fn):
    drawn: dict[str, torch.Tensor | None] = {}
    if state["backend"] == "layers":

        def targets_for(logits):  # called once, on the layers' own forward pass
            probs, labels = _probs_and_labels(logits, y, estimator, gen)
            drawn.update(probs=probs, y=labels)
            if estimator == "exact":
                c = probs.shape[1]
                return torch.arange(c, device=probs.device).unsqueeze(1).expand(c, len(x)), probs.T
            return labels.unsqueeze(0), torch.ones(1, len(x), dtype=probs.dtype, device=probs.device)

        # on a failed first-chunk check nothing was added yet: fall back cleanly
        part = fisher if state["checked"] else {n: torch.zeros_like(f) for n, f in fisher.items()}
        try:
            fisher_layers.accumulate(model, state["owner"], part, x, targets_for, check=not state["checked"])
        except fisher_layers.Unsupported as e:
            if state["explicit"]:
                raise ValueError(f"the layers backend does not apply to this model: {e}") from None
            state["backend"] = "vmap"
        except (RuntimeError, IndexError) as e:
            # a model the structural checks missed (e.g. reshaping the batch
            # before a layer) can also fail outright on the first chunk
            if state["checked"] or state["explicit"]:
                raise
            log.debug("layers backend failed on the first chunk (%s); using vmap", e)
            state["backend"] = "vmap"
        else:
            if not state["checked"]:
                state["checked"] = True
                for n in fisher:
                    fisher[n] += part[n]
            return
    if drawn:  # the layers backend fell back after drawing this chunk's labels: keep them
        probs, y = drawn["probs"], drawn["y"]
    else:
        with torch.no_grad():
            logits = functional_call(model, (params, buffers), (x,))
        probs, y = _probs_and_labels(logits, y, estimator, gen)
    if state["backend"] == "loop":
        _accumulate_loop(model, params, fisher, x, y, probs, estimator)
        return
    m = state["vmap_chunk"]
    for s in range(0, len(x), m):  # after a fall-back the chunk may be the layers' size
        _accumulate_vmap(
            params,
            fisher,
            x[s : s + m],
            None if y is None else y[s : s + m],
            probs[s : s + m],
            estimator,
            jac_fn,
            grad_fn,
        )


def _accumulate_vmap(params, fisher, x, y, probs, estimator, jac_fn, grad_fn):
    if estimator == "exact":
        jac = jac_fn(params, x)  # name -> (B, C, *shape)
        for n, j in jac.items():
            w = probs.reshape(probs.shape + (1,) * (j.ndim - 2))
            fisher[n] += (w * j.pow(2)).sum(dim=(0, 1))
    else:
        g = grad_fn(params, x, y)  # name -> (B, *shape)
        for n, gi in g.items():
            fisher[n] += gi.pow(2).sum(dim=0)


def _accumulate_loop(model, params, fisher, x, y, probs, estimator):
    names = list(params)
    live = dict(model.named_parameters())
    tensors = [live[n] for n in names]
    for b in range(len(x)):
        with torch.enable_grad():
            lp = torch.log_softmax(model(x[b : b + 1]), dim=-1)[0]
        classes = range(lp.shape[0]) if estimator == "exact" else [int(y[b])]
        for c in classes:
            gs = torch.autograd.grad(lp[c], tensors, retain_graph=True)
            wgt = probs[b, c] if estimator == "exact" else 1.0
            for n, g in zip(names, gs, strict=True):
                fisher[n] += wgt * g.pow(2)


def fisher_total(fisher: dict[str, torch.Tensor]) -> float:
    """Sum of all diagonal Fisher entries (the trace)."""
    return float(sum(f.sum() for f in fisher.values()))

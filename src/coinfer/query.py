"""Coding over queries: one model F, K queries in a group, N ≥ K workers.

**Berrut code** (ApproxIFER: Soleymani, Ali, Mahdavifar, Avestimehr, AAAI 2022;
no training). The K queries are the values at points ``α_0..α_{K-1}`` of
Berrut's rational interpolant

    u(z) = Σ_j (-1)^j X_j / (z − α_j)  /  Σ_j (-1)^j / (z − α_j),

worker n evaluates ``F(u(β_n))`` at its own point ``β_n``, and ``F(X_j)`` is read
back by Berrut interpolation, at ``α_j``, of whichever answers came. Both maps
are fixed weight matrices (:meth:`BerrutCode.encoding_matrix`,
:meth:`BerrutCode.decoding_matrix`), so encoding and decoding are one matrix
product each, on any tensors (inputs or logits).

``systematic=True`` (the default) puts the query points among the evaluation
points: worker ``j < K`` evaluates ``F(X_j)`` itself, so with nothing late the
answers are exact; the ``N − K`` extra workers evaluate combinations of the
queries, and a late systematic worker's answer is interpolated from the rest
(approximate: F is not a rational function of degree K). ``systematic=False`` is
the paper's form (Chebyshev evaluation points apart from the query points),
approximate even when nothing is late.

Decode logits, not probabilities: the interpolant of logits keeps the
top-1 far more often (logits are smoother in the input than softmax is).

**ParM** (Kosaian, Rashmi, Venkataraman, SOSP 2019), addition encoder: one
parity model P of F's architecture, trained so that ``P(X_1 + .. + X_K) ≈
Σ_i F(X_i)`` (logits, mean squared error); a late ``F(X_j)`` is read back as
``P(Σ X) − Σ_{i≠j} F(X_i)`` (:func:`train_parm`, :func:`parm_decode`).

**Cheap backup**: one extra worker runs a student K times cheaper than F on
every query of the group, distilled from F (:func:`train_backup`); a late
query's answer is the student's.

**Locating a corrupt worker.** With two or more extra workers the answers are
redundant: :meth:`BerrutCode.locate` leaves each worker out in turn, scores
the rest by their leave-one-out consistency (each answer against the one
re-encoded from the others' decode), and names the worker whose removal
leaves the most consistent set when the full set is ``threshold`` times less
consistent. Measured on LeNet-5 it locates little (docs/results.md): the
interpolation error of clean answers is as large as a corruption.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from coinfer.distill import train_toward
from coinfer.errors import CodeError, DecodeError
from coinfer.options import show_progress
from coinfer.predict import predict_probs

__all__ = ["BerrutCode", "berrut_weights", "chebyshev_points", "train_parm", "parm_decode", "train_backup"]

#: Largest group size and worker count accepted (a bound on the matrices built).
MAX_QUERIES = 256


def chebyshev_points(n: int) -> np.ndarray:
    """The ``n`` Chebyshev points of the first kind on (−1, 1), increasing."""
    return np.sort(np.cos((2 * np.arange(n) + 1) * math.pi / (2 * n)))


def berrut_weights(nodes: Sequence[float], z: Sequence[float]) -> np.ndarray:
    """``(len(z), len(nodes))`` weights of Berrut's interpolant through ``nodes``
    (increasing), evaluated at each point of ``z``: row i gives
    ``r(z_i) = Σ_j W[i, j] f_j``. A point equal to a node gets that node's value exactly."""
    nodes = np.asarray(nodes, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    if np.any(np.diff(nodes) <= 0):
        raise CodeError(f"interpolation nodes must be strictly increasing, got {nodes.tolist()}")
    signs = (-1.0) ** np.arange(len(nodes))
    out = np.zeros((len(z), len(nodes)))
    for i, zi in enumerate(z):
        hit = np.isclose(zi, nodes, rtol=0, atol=1e-12)
        if hit.any():
            out[i, int(np.argmax(hit))] = 1.0
            continue
        t = signs / (zi - nodes)
        out[i] = t / t.sum()
    return out


class BerrutCode:
    """The Berrut (ApproxIFER) code over a group of ``k`` queries and ``n`` workers.

    Args:
        k: queries per group (≥ 1).
        n: workers (≥ k); ``n − k`` of them are redundant.
        systematic: put the query points among the evaluation points (exact when
            no systematic worker is late); otherwise the paper's Chebyshev
            evaluation points apart from the query points.
    """

    def __init__(self, k: int, n: int, systematic: bool = True):
        for name, v in (("k", k), ("n", n)):
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_QUERIES:
                raise CodeError(f"{name} must be an integer in 1..{MAX_QUERIES}, got {v!r}")
        if n < k:
            raise CodeError(f"n = {n} workers cannot carry k = {k} queries: need n >= k")
        if not isinstance(systematic, bool):
            raise CodeError(f"systematic must be True or False, got {systematic!r}")
        self.k, self.n, self.systematic = k, n, systematic
        if systematic:
            beta = chebyshev_points(n)
            extra = self._extra_positions(n, n - k)
            alpha = np.delete(beta, extra)
            # workers 0..k-1 are the systematic ones (alpha in order), then the extras
            self.beta = np.concatenate([alpha, beta[extra]])
            self.alpha = alpha
        else:
            self.alpha = chebyshev_points(k)
            self.beta = chebyshev_points(n)
        self._enc = torch.from_numpy(berrut_weights(self.alpha, self.beta))  # (n, k)

    @staticmethod
    def _extra_positions(n: int, extras: int) -> list[int]:
        """Positions among n sorted points for the extra workers, spread evenly."""
        if extras == 0:
            return []
        return sorted({min(n - 1, int((i + 0.5) * n / extras)) for i in range(extras)})

    def __repr__(self) -> str:
        return f"BerrutCode(k={self.k}, n={self.n}, systematic={self.systematic})"

    # ------------------------------------------------------------------ maps
    def encoding_matrix(self) -> torch.Tensor:
        """``(n, k)`` float64: worker i's input is ``Σ_j E[i, j] X_j``."""
        return self._enc.clone()

    def encode(self, queries: torch.Tensor) -> torch.Tensor:
        """``(k, *shape)`` queries -> ``(n, *shape)`` worker inputs."""
        if not isinstance(queries, torch.Tensor) or queries.ndim < 1 or queries.shape[0] != self.k:
            shape = tuple(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__
            raise DecodeError(f"encode expects a (k={self.k}, ...) tensor of queries, got {shape}")
        e = self._enc.to(
            dtype=queries.dtype if queries.is_floating_point() else torch.float64, device=queries.device
        )
        return torch.einsum("nk,k...->n...", e, queries.to(e.dtype))

    def _check_workers(self, workers: Iterable[int]) -> list[int]:
        out = []
        for w in workers:
            if not isinstance(w, int | np.integer) or isinstance(w, bool) or not 0 <= int(w) < self.n:
                raise DecodeError(f"worker index {w!r} is not in 0..{self.n - 1}")
            out.append(int(w))
        if len(set(out)) != len(out):
            raise DecodeError(f"worker indices repeat: {out}")
        return out

    def decoding_matrix(self, workers: Iterable[int]) -> torch.Tensor:
        """``(k, len(workers))`` float64: query j's answer is ``Σ_i D[j, i] Y_{workers[i]}``
        (Berrut interpolation through those workers' points, read at the query points)."""
        ws = self._check_workers(workers)
        if not ws:
            raise DecodeError("no worker answered: nothing to decode")
        order = np.argsort(self.beta[ws])
        nodes = self.beta[ws][order]
        d = berrut_weights(nodes, self.alpha)  # columns in sorted-node order
        out = np.zeros_like(d)
        out[:, order] = d
        return torch.from_numpy(out)

    def decode(self, answers: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """``{worker: (*shape) answer}`` -> ``(k, *shape)`` approximate ``F(X_j)``
        (exact for a systematic worker that answered)."""
        if not isinstance(answers, Mapping) or not answers:
            raise DecodeError("decode needs a non-empty {worker index: answer} mapping")
        ws = self._check_workers(answers)
        ys = [answers[w] for w in ws]
        shape = ys[0].shape
        if any(y.shape != shape for y in ys):
            raise DecodeError(f"answers must share one shape, got {sorted({tuple(y.shape) for y in ys})}")
        y = torch.stack(ys)
        if not torch.isfinite(y).all():
            bad = [w for w, t in zip(ws, ys, strict=True) if not torch.isfinite(t).all()]
            raise DecodeError(f"answers of workers {bad} are not finite")
        d = self.decoding_matrix(ws).to(
            dtype=y.dtype if y.is_floating_point() else torch.float64, device=y.device
        )
        # a systematic worker's row of D is exactly one 1 and zeros: its answer comes back as it came
        return torch.einsum("ki,i...->k...", d, y.to(d.dtype))

    # ------------------------------------------------------------------ corruption
    def residuals(self, answers: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """For each worker i that answered: ``‖Y_i − Ŷ_i‖`` per sample, where ``Ŷ_i``
        re-encodes the queries decoded from the *other* answers (a leave-one-out
        prediction of worker i's answer). Answers ``(batch, C)`` or ``(C,)``."""
        ws = self._check_workers(answers)
        if len(ws) < self.k + 1:
            raise DecodeError(f"checking answers needs at least k + 1 = {self.k + 1} of them, got {len(ws)}")
        out = {}
        for i in ws:
            rest = {w: answers[w] for w in ws if w != i}
            x_hat = self.decode(rest)  # (k, ...)
            pred = torch.einsum("k,k...->...", self._enc[i].to(x_hat), x_hat)
            diff = answers[i].to(pred) - pred
            out[i] = diff.reshape(diff.shape[0], -1).norm(dim=-1) if diff.ndim > 1 else diff.norm().reshape(1)
        return out

    def consistency(self, answers: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Per sample, the mean leave-one-out residual of ``answers`` (:meth:`residuals`):
        near the interpolation error when they are all right, large when one is not."""
        res = self.residuals(answers)
        return torch.stack(list(res.values())).mean(dim=0)

    def locate(self, answers: Mapping[int, torch.Tensor], threshold: float) -> torch.Tensor:
        """Per sample, the worker whose answer is inconsistent with the others, or −1.

        A corrupt answer spoils every prediction it enters, so each worker is
        left out in turn and the rest scored by :meth:`consistency`; the worker
        whose removal leaves the most consistent set is named when the full set
        is more than ``threshold`` times less consistent than that set (a
        relative test: answers of any scale). Needs ``len(answers) ≥ k + 2``."""
        if not isinstance(threshold, int | float) or isinstance(threshold, bool) or not threshold > 0:
            raise DecodeError(f"threshold must be a positive number, got {threshold!r}")
        score, suspect = self.inconsistency(answers)
        return torch.where(score > threshold, suspect, torch.full_like(suspect, -1))

    def inconsistency(self, answers: Mapping[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample, the score :meth:`locate` compares with its threshold (how many
        times less consistent the full set is than the best set without one worker)
        and that worker; calibrate the threshold on clean answers' scores."""
        if len(answers) < self.k + 2:
            raise DecodeError(
                f"locating a corrupt worker needs at least k + 2 = {self.k + 2} answers, got {len(answers)}"
            )
        ws = self._check_workers(answers)
        full = self.consistency(answers)
        without = torch.stack([self.consistency({w: answers[w] for w in ws if w != c}) for c in ws])
        best, idx = without.min(dim=0)
        return full / best.clamp_min(1e-12), torch.tensor(ws, device=idx.device)[idx]


# --------------------------------------------------------------------------- learned codes
def _groups_of(inputs: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``(G, k, *shape)`` random groups of k inputs (a fresh draw each epoch)."""
    perm = torch.randperm(len(inputs), generator=generator)
    g = len(inputs) // k
    return inputs[perm[: g * k]].reshape(g, k, *inputs.shape[1:])


def _check_training(inputs: torch.Tensor, k: int, epochs: int, lr: float, batch_size: int) -> None:
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point() or inputs.ndim < 2:
        raise DecodeError("training inputs must be a floating (N, *input_shape) tensor")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_QUERIES or len(inputs) < k:
        raise DecodeError(f"k must be an integer in 1..{MAX_QUERIES} with at least k inputs, got k={k!r}")
    if not isinstance(epochs, int) or epochs < 0 or not (isinstance(lr, int | float) and lr > 0):
        raise DecodeError(f"epochs must be an integer >= 0 and lr > 0, got {epochs!r}, {lr!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DecodeError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def train_parm(
    model: nn.Module,
    inputs: torch.Tensor,
    k: int,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    init: nn.Module | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """ParM's parity model for the addition encoder: a copy of ``init`` (default:
    ``model`` itself, a better start than random weights) trained with Adam so
    that ``P(Σ_i X_i) ≈ Σ_i model(X_i)`` in logits (MSE), on random groups of
    ``k`` of the unlabelled ``inputs``, a new grouping each epoch."""
    _check_training(inputs, k, epochs, lr, batch_size)
    model.eval()
    parity = copy.deepcopy(init if init is not None else model).train()
    optim = torch.optim.Adam(parity.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil((len(inputs) // k) / batch_size)
    bar = tqdm(total=steps, desc=f"ParM parity (k={k})", disable=not show_progress(progress), leave=False)
    for _ in range(epochs):
        groups = _groups_of(inputs, k, g)
        for s in range(0, len(groups), batch_size):
            xb = groups[s : s + batch_size]  # (B, k, ...)
            with torch.no_grad():
                target = model(xb.flatten(0, 1)).reshape(len(xb), k, -1).sum(1)
            loss = torch.nn.functional.mse_loss(parity(xb.sum(1)), target)
            optim.zero_grad()
            loss.backward()
            optim.step()
            bar.update(1)
    bar.close()
    return parity.eval()


def parm_decode(parity_output: torch.Tensor, others: Sequence[torch.Tensor]) -> torch.Tensor:
    """The late query's logits: the parity's answer minus the other ``k − 1``
    queries' answers (``P(Σ X) − Σ_{i≠j} F(X_i)``)."""
    out = parity_output.clone()
    for o in others:
        if o.shape != parity_output.shape:
            raise DecodeError(
                f"answers must share the parity's shape {tuple(parity_output.shape)}, got {tuple(o.shape)}"
            )
        out = out - o
    return out


def train_backup(
    model: nn.Module,
    student: nn.Module,
    inputs: torch.Tensor,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool | None = None,
) -> nn.Module:
    """The cheap backup: ``student`` (a smaller network of the caller's choice)
    distilled from ``model`` with Adam on the unlabelled ``inputs`` (cross-entropy
    to the model's softmax); trained in place and returned in eval mode."""
    _check_training(inputs, 1, epochs, lr, batch_size)
    with torch.no_grad():
        target = predict_probs(model, inputs)
    return train_toward(
        student,
        inputs,
        target,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        desc="backup student",
        progress=progress,
    )

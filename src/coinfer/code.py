"""The erasure code: a systematic generator ``[I_k; W]`` and its decoder.

Rows ``0..k-1`` of the generator are the data models, rows ``k..n-1`` the coded
(parity) models. Each parity row of ``W`` is non-negative and sums to one, so the
parity is a *mixture* of the data models' outputs — a valid KL-barycenter target.
Every set of ``k`` rows of the generator is invertible, so any ``<= r`` erasures
decode.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from coinfer.errors import CodeError, DecodeError

__all__ = ["Code", "project_simplex"]

_ROW_SUM_TOL = 1e-6
_SINGULAR_COND = 1e12
_MAX_SUBSETS_CHECKED = 200_000
#: ``decode`` computes in NumPy when the batch holds at most this many entries
#: (batch x C): a serving request is (1..few, C) and a dozen small torch ops
#: cost more in dispatch than in arithmetic (see docs/performance.md).
SMALL_DECODE = 4096
_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


#: Cauchy nodes ``(x, y)`` of the default ``W`` for ``2 <= r <= 3``, ``2 <= k <= 6``:
#: chosen by ``tools/code_nodes.py`` to minimise the worst condition number of
#: the rows used to decode, over every decodable erasure pattern (decoding
#: multiplies the coded models' error by up to that number). The worst case
#: drops from 11-8982 with the evenly spaced nodes to 5-200. A node of 1e4 makes
#: its row (nearly) the uniform average. Other ``(k, r)`` use evenly spaced nodes.
_NODES = {
    # worst condition number 5.1 (heuristic nodes: 11.1)
    (2, 2): ([0.000335, 10000.0], [0.001753, 0.00461]),
    # worst condition number 11.3 (heuristic nodes: 57.3)
    (3, 2): ([0.000335, 146.078192], [0.009915, 0.0175, 0.045055]),
    # worst condition number 19.1 (heuristic nodes: 151.2)
    (4, 2): ([0.563147, 649.231699], [0.941048, 1.705578, 3.292605, 9.218757]),
    # worst condition number 30.5 (heuristic nodes: 314.9)
    (5, 2): ([1.066255, 47.992293], [0.044205, 1.102374, 2.606078, 0.441831, 8.963565]),
    # worst condition number 45.2 (heuristic nodes: 570.2)
    (6, 2): ([0.716339, 73.808498], [0.365857, 1.091984, 2.691836, 4.80478, 1.690872, 14.086643]),
    # worst condition number 7.7 (heuristic nodes: 39.0)
    (2, 3): ([0.000335, 0.002369, 10000.0], [0.000414, 0.002425]),
    # worst condition number 27.6 (heuristic nodes: 253.0)
    (3, 3): ([0.000335, 10000.0, 1.441975], [0.32066, 0.769063, 2.623942]),
    # worst condition number 62.1 (heuristic nodes: 1226.5)
    (4, 3): ([0.082284, 7.801949, 9999.987544], [0.839357, 4.534138, 2.053111, 14.865876]),
    # worst condition number 114.8 (heuristic nodes: 3660.8)
    (5, 3): ([0.09147, 7.14202, 1230.442184], [0.75119, 1.468645, 16.7302, 3.185533, 5.702627]),
    # worst condition number 199.9 (heuristic nodes: 8982.2)
    (6, 3): (
        [0.000335, 4.000097, 4516.476125],
        [1.040131, 0.539992, 1.666107, 4.746899, 2.821358, 12.655157],
    ),
}


def _cauchy_weights(k: int, r: int) -> np.ndarray:
    """Positive Cauchy matrix ``1 / (x_i + y_j)``, rows normalised to sum to one.

    With distinct positive ``x`` and ``y`` every square minor of a Cauchy matrix
    is non-zero, and scaling rows by positive constants keeps that property, so
    every ``k``-subset of ``[I_k; W]`` is invertible. The nodes come from
    :data:`_NODES` where listed, else ``x_i = 2i + 1/2``, ``y_j = j + 1/2``.
    """
    if (k, r) in _NODES:
        x, y = (np.asarray(v, dtype=np.float64) for v in _NODES[(k, r)])
    else:
        x = np.arange(r, dtype=np.float64) * 2.0 + 0.5
        y = np.arange(k, dtype=np.float64) + 0.5
    c = 1.0 / (x[:, None] + y[None, :])
    return c / c.sum(axis=1, keepdims=True)


class Code:
    """A systematic (n = k + r, k) code over model outputs.

    Args:
        k: number of data models (>= 1).
        r: number of coded (parity) models (>= 1).
        weights: optional ``(r, k)`` parity weights. Each row must be
            non-negative and sum to 1, and every set of ``k`` generator rows must
            be invertible. Defaults to uniform weights for ``r = 1`` and a
            row-normalised positive Cauchy matrix for ``r >= 2``.

    Indices ``0..k-1`` name the data models and ``k..n-1`` the coded models.
    """

    def __init__(self, k: int, r: int, weights: Sequence[Sequence[float]] | np.ndarray | None = None):
        if not isinstance(k, int | np.integer) or k < 1:
            raise CodeError(f"k must be a positive integer, got {k!r}")
        if not isinstance(r, int | np.integer) or r < 1:
            raise CodeError(f"r must be a positive integer, got {r!r}")
        self.k, self.r = int(k), int(r)
        if weights is None:
            w = np.full((1, self.k), 1.0 / self.k) if self.r == 1 else _cauchy_weights(self.k, self.r)
        else:
            w = self._validate_weights(weights)
        self._weights = w
        self._weights.setflags(write=False)
        self._generator = np.vstack([np.eye(self.k), w])
        self._generator.setflags(write=False)
        self._inverse_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self._np_inverse_cache: dict[tuple[tuple[int, ...], tuple[int, ...], type], np.ndarray] = {}

    # ------------------------------------------------------------------ validation
    def _validate_weights(self, weights) -> np.ndarray:
        try:
            w = np.array(weights, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise CodeError(f"weights must be a numeric (r, k) matrix: {exc}") from None
        if w.ndim != 2 or w.shape != (self.r, self.k):
            raise CodeError(f"weights must have shape (r, k) = ({self.r}, {self.k}), got {tuple(w.shape)}")
        if not np.all(np.isfinite(w)):
            raise CodeError("weights contain NaN or infinite entries")
        neg = np.argwhere(w < 0)
        if len(neg):
            i, j = neg[0]
            raise CodeError(f"weights must be non-negative (a mixture), got weights[{i}][{j}] = {w[i, j]:g}")
        sums = w.sum(axis=1)
        bad = np.flatnonzero(np.abs(sums - 1.0) > _ROW_SUM_TOL)
        if len(bad):
            i = bad[0]
            raise CodeError(f"each parity row must sum to 1, row {i} sums to {sums[i]:.6g}")
        g = np.vstack([np.eye(self.k), w])
        n = self.k + self.r
        checked = 0
        for rows in itertools.combinations(range(n), self.k):
            checked += 1
            if checked > _MAX_SUBSETS_CHECKED:
                break
            cond = np.linalg.cond(g[list(rows)])
            if not np.isfinite(cond) or cond > _SINGULAR_COND:
                erased = sorted(set(range(n)) - set(rows))
                raise CodeError(
                    f"weights do not give an MDS code: with workers {erased} erased the "
                    f"remaining rows {list(rows)} are singular (condition number {cond:.3g})"
                )
        return w

    # ------------------------------------------------------------------ properties
    @property
    def n(self) -> int:
        """Total number of models, ``k + r``."""
        return self.k + self.r

    @property
    def weights(self) -> np.ndarray:
        """The ``(r, k)`` parity weights (read-only)."""
        return self._weights

    @property
    def generator(self) -> np.ndarray:
        """The ``(n, k)`` systematic generator ``[I_k; W]`` (read-only)."""
        return self._generator

    def __repr__(self) -> str:
        return f"Code(k={self.k}, r={self.r}, weights={np.round(self._weights, 4).tolist()})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Code)
            and (self.k, self.r) == (other.k, other.r)
            and np.allclose(self._weights, other._weights)
        )

    def __hash__(self) -> int:
        return hash((self.k, self.r, self._weights.tobytes()))

    # ------------------------------------------------------------------ algebra
    def _check_indices(self, indices: Iterable[int]) -> list[int]:
        out = []
        for i in indices:
            if not isinstance(i, int | np.integer) or not 0 <= int(i) < self.n:
                raise DecodeError(f"worker index {i!r} is out of range 0..{self.n - 1}")
            out.append(int(i))
        return sorted(set(out))

    def can_decode(self, available_indices: Iterable[int]) -> bool:
        """Whether the data outputs can be recovered from these worker indices."""
        avail = self._check_indices(available_indices)
        return len(avail) >= self.k

    def missing(self, available_indices: Iterable[int]) -> list[int]:
        """Worker indices (``0..n-1``) that are not in ``available_indices``."""
        avail = set(self._check_indices(available_indices))
        return [i for i in range(self.n) if i not in avail]

    def choose_rows(self, available_indices: Iterable[int]) -> tuple[int, ...]:
        """The ``k`` rows used to decode: all available data rows, then the
        lowest available parity rows."""
        avail = self._check_indices(available_indices)
        if len(avail) < self.k:
            missing = self.missing(avail)
            raise DecodeError(
                f"cannot decode: workers {missing} are missing ({len(missing)} erasures) but a "
                f"({self.n}, {self.k}) code recovers at most r={self.r}; need any {self.k} of "
                f"{self.n} outputs, got {len(avail)} ({avail})"
            )
        data = [i for i in avail if i < self.k]
        parity = [i for i in avail if i >= self.k]
        return tuple(sorted(data + parity[: self.k - len(data)]))

    def decoding_matrix(self, rows: Sequence[int]) -> torch.Tensor:
        """``(k, k)`` float64 matrix ``D`` with ``data = D @ outputs[rows]``."""
        key = tuple(rows)
        inv = self._inverse_cache.get(key)
        if inv is None:
            inv = torch.from_numpy(np.linalg.inv(self._generator[list(key)]))
            self._inverse_cache[key] = inv
        return inv

    def condition_number(self, erased: Iterable[int]) -> float:
        """Condition number of the rows used to decode when ``erased`` are missing."""
        erased = set(self._check_indices(erased))
        rows = self.choose_rows([i for i in range(self.n) if i not in erased])
        return float(np.linalg.cond(self._generator[list(rows)]))

    def erasure_patterns(self, max_erasures: int | None = None) -> list[tuple[int, ...]]:
        """Every decodable erasure pattern that erases at least one data model,
        of size ``1..min(r, max_erasures)``, as sorted tuples of worker indices."""
        m = self.r if max_erasures is None else min(self.r, max_erasures)
        pats = []
        for size in range(1, m + 1):
            for pat in itertools.combinations(range(self.n), size):
                if any(i < self.k for i in pat):
                    pats.append(pat)
        return pats

    def encode_outputs(self, data_outputs: torch.Tensor) -> torch.Tensor:
        """Apply the generator to ``(k, ...)`` data outputs, giving ``(n, ...)``.

        This is what an ideal (linear) coded model would output; useful as the
        target mixture and in tests."""
        if data_outputs.shape[0] != self.k:
            raise DecodeError(f"expected {self.k} data outputs along dim 0, got {data_outputs.shape[0]}")
        g = torch.tensor(self._generator, dtype=data_outputs.dtype, device=data_outputs.device)
        return torch.einsum("nk,k...->n...", g, data_outputs)

    def decode(self, available: Mapping[int, torch.Tensor], project: bool = False) -> torch.Tensor:
        """Recover all ``k`` data outputs from whichever outputs arrived.

        Args:
            available: maps a worker index ``0..n-1`` to its ``(batch, C)`` output
                (probabilities). Any ``>= k`` of the ``n`` suffice.
            project: project decoded (reconstructed) vectors onto the probability
                simplex. Decoding amplifies the coded model's error by ``1/w_j``,
                so raw decoded vectors can carry negative entries.

        Returns:
            ``(k, batch, C)`` tensor. Data outputs that arrived are returned
            unchanged; missing ones are reconstructed.

        Raises:
            DecodeError: more than ``r`` outputs missing, shapes that disagree, or
                NaN/inf in an output needed to reconstruct a missing one.
        """
        if not isinstance(available, Mapping) or not available:
            raise DecodeError("decode expects a non-empty mapping {worker index: (batch, C) tensor}")
        rows = self.choose_rows(available.keys())
        first = available[rows[0]]
        shape = tuple(first.shape)
        if len(shape) != 2:
            raise DecodeError(f"each output must be a (batch, C) tensor, worker {rows[0]} gave {shape}")
        for i in rows:
            if tuple(available[i].shape) != shape:
                raise DecodeError(
                    f"output shapes disagree: worker {rows[0]} gave {shape}, worker {i} gave "
                    f"{tuple(available[i].shape)}"
                )
        missing_data = [j for j in range(self.k) if j not in available]
        if not missing_data:
            return torch.stack([available[j] for j in range(self.k)])
        if first.numel() <= SMALL_DECODE:
            fast = self._decode_small(available, rows, missing_data, project)
            if fast is not None:
                return fast
        dtype = first.dtype if first.is_floating_point() else torch.float32
        y = torch.stack([available[i].to(dtype) for i in rows])  # (k, B, C)
        if not torch.isfinite(y).all():
            raise _nonfinite([i for i, yi in zip(rows, y, strict=True) if not torch.isfinite(yi).all()])
        dmat = self.decoding_matrix(rows)[missing_data].to(dtype=dtype, device=y.device)
        rec = torch.einsum("mk,kbc->mbc", dmat, y)
        if project:
            rec = project_simplex(rec)
        out = []
        it = iter(rec)
        for j in range(self.k):
            out.append(next(it) if j in missing_data else available[j].to(dtype))
        return torch.stack(out)

    def _decode_small(self, available, rows, missing_data, project) -> torch.Tensor | None:
        """NumPy path of :meth:`decode` for small CPU batches (same result);
        ``None`` when the inputs do not qualify (GPU, autograd, mixed dtypes)."""
        tensors = [available[i] for i in rows]
        dtype = tensors[0].dtype
        npdt = _NP_DTYPES.get(dtype)
        if npdt is None or any(
            t.dtype != dtype or t.device.type != "cpu" or t.requires_grad for t in tensors
        ):
            return None
        key = (tuple(rows), tuple(missing_data), npdt)
        dmat = self._np_inverse_cache.get(key)
        if dmat is None:
            dmat = self.decoding_matrix(rows).numpy()[missing_data].astype(npdt)
            self._np_inverse_cache[key] = dmat
        b, c = tensors[0].shape
        y = np.stack([t.numpy() for t in tensors]).reshape(self.k, b * c)
        if not np.isfinite(y).all():
            bad = [i for i, t in zip(rows, tensors, strict=True) if not np.isfinite(t.numpy()).all()]
            raise _nonfinite(bad)
        rec = (dmat @ y).reshape(len(missing_data), b, c)
        if project:
            rec = _project_simplex_np(rec)
        out = np.empty((self.k, b, c), dtype=npdt)
        out[missing_data] = rec
        for j in range(self.k):
            if j in available:
                out[j] = available[j].numpy()
        return torch.from_numpy(out)

    def to_dict(self) -> dict:
        """JSON-serialisable description (used in bundle manifests)."""
        return {"k": self.k, "r": self.r, "weights": self._weights.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping) -> Code:
        """Inverse of :meth:`to_dict`."""
        return cls(int(d["k"]), int(d["r"]), d.get("weights"))


def _nonfinite(workers: list[int]) -> DecodeError:
    return DecodeError(
        f"cannot decode: the outputs of workers {workers} hold NaN or inf, and decoding "
        f"would spread them into the reconstructed outputs"
    )


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each vector along the last dim onto the simplex.

    Sort-based algorithm (Held et al. 1974; Duchi et al. 2008), batched."""
    c = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(dim=-1) - 1.0
    ind = torch.arange(1, c + 1, device=v.device, dtype=v.dtype)
    cond = (u - css / ind) > 0
    # cond holds on a prefix; rho is its last index
    rho = cond.sum(-1, keepdim=True) - 1
    theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return torch.clamp(v - theta, min=0.0)


def _project_simplex_np(v: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`project_simplex` (used by the small-batch decode)."""
    c = v.shape[-1]
    v2 = v.reshape(-1, c)
    u = np.sort(v2, axis=-1)[:, ::-1]
    css = u.cumsum(axis=-1)
    css -= 1.0
    rho = (u * np.arange(1, c + 1, dtype=v.dtype) > css).sum(-1) - 1  # u_j > (css_j - 1) / j
    theta = (css[np.arange(len(v2)), rho] / (rho + 1)).astype(v.dtype)
    out = v2 - theta[:, None]
    np.maximum(out, 0.0, out=out)
    return out.reshape(v.shape)

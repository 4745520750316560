"""The erasure code: a systematic generator ``[I_k; W]`` and its decoder.

Rows ``0..k-1`` of the generator are the data models, rows ``k..n-1`` the coded
(parity) models. Each parity row of ``W`` is non-negative and sums to one, so the
parity is a *mixture* of the data models' outputs — a valid KL-barycenter target.
Every set of ``k`` rows of the generator is invertible, so any ``<= r`` erasures
decode.

Validation is bounded work (the parameters may come from a bundle manifest):
``k <= MAX_K`` and ``r <= MAX_R``; ``W`` is checked for shape, finiteness, sign,
row sums and the condition number of every ``k``-row decoding matrix up to
:data:`MAX_PATTERNS_CHECKED` of them (beyond that a seeded sample: every
single-erasure matrix plus random ones), and :meth:`Code.decoding_matrix`
refuses an ill-conditioned matrix the first time it is used, so a pattern that
the sample missed never decodes garbage either.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from numbers import Real

import numpy as np
import torch

from coinfer.errors import CodeError, DecodeError

__all__ = [
    "Code",
    "project_simplex",
    "MAX_K",
    "MAX_R",
    "DEFAULT_MAX_CONDITION",
    "MAX_CONDITION_CEILING",
    "MAX_PATTERNS_CHECKED",
    "MAX_PATTERNS_LISTED",
]

_ROW_SUM_TOL = 1e-6
#: Largest number of data models of a code (each one is a served model).
MAX_K = 32
#: Largest number of coded models of a code.
MAX_R = 8
#: Default limit on the condition number of any decoding matrix: decoding
#: multiplies the coded models' error by up to this factor, and float32 outputs
#: carry ~1e-7 relative error, so 1e6 already allows ~10% error in a decoded output.
DEFAULT_MAX_CONDITION = 1e6
#: No code, whoever builds it, may allow more than this (numerically singular).
MAX_CONDITION_CEILING = 1e12
#: At most this many ``k``-row decoding matrices are checked when a code is built.
MAX_PATTERNS_CHECKED = 2048
#: :meth:`Code.erasure_patterns` refuses to build a list longer than this.
MAX_PATTERNS_LISTED = 100_000
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
        max_condition: largest allowed condition number of a decoding matrix
            (default :data:`DEFAULT_MAX_CONDITION`, at most
            :data:`MAX_CONDITION_CEILING`); recorded in :meth:`to_dict`.

    ``k`` and ``r`` are integers (not bool) with ``1 <= k <= MAX_K`` and
    ``1 <= r <= MAX_R``. Indices ``0..k-1`` name the data models and
    ``k..n-1`` the coded models. After construction ``patterns_checked`` and
    ``patterns_total`` say how many decoding matrices were checked, of how many,
    and ``worst_condition`` the largest condition number among them.
    """

    def __init__(
        self,
        k: int,
        r: int,
        weights: Sequence[Sequence[float]] | np.ndarray | None = None,
        max_condition: float = DEFAULT_MAX_CONDITION,
    ):
        self.k = _check_count(k, "k", MAX_K)
        self.r = _check_count(r, "r", MAX_R)
        self.max_condition = _check_max_condition(max_condition)
        if weights is None:
            w = np.full((1, self.k), 1.0 / self.k) if self.r == 1 else _cauchy_weights(self.k, self.r)
        else:
            w = self._validate_weights(weights)
        self._check_conditioning(w, default=weights is None)
        self._weights = w
        self._weights.setflags(write=False)
        self._generator = np.vstack([np.eye(self.k), w])
        self._generator.setflags(write=False)
        self._inverse_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self._np_inverse_cache: dict[tuple[tuple[int, ...], tuple[int, ...], type], np.ndarray] = {}
        self._residual_cache: dict[tuple[int, ...], torch.Tensor] = {}  # rows -> I - G pinv(G)

    # ------------------------------------------------------------------ validation
    def _validate_weights(self, weights) -> np.ndarray:
        if not isinstance(weights, np.ndarray):
            _check_numbers(weights)
        elif weights.dtype.kind not in "fiu":
            raise CodeError(f"weights must be a numeric (r, k) matrix, got dtype {weights.dtype}")
        try:
            shape = np.shape(weights)
        except ValueError:  # a ragged nested list
            raise CodeError(
                f"weights must be an (r, k) = ({self.r}, {self.k}) matrix, got ragged rows"
            ) from None
        if shape != (self.r, self.k):
            raise CodeError(f"weights must have shape (r, k) = ({self.r}, {self.k}), got {tuple(shape)}")
        try:
            w = np.array(weights, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise CodeError(f"weights must be a numeric (r, k) matrix: {exc}") from None
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
        return w

    def _row_sets(self) -> Iterator[tuple[int, ...]]:
        """The ``k``-row sets that decode some erasure pattern (every ``k``-subset
        of the ``n`` rows but the data rows themselves): all of them when there
        are at most :data:`MAX_PATTERNS_CHECKED`, else every single-erasure set
        and then a seeded random sample, :data:`MAX_PATTERNS_CHECKED` in all."""
        k, n = self.k, self.n
        if math.comb(n, k) - 1 <= MAX_PATTERNS_CHECKED:
            yield from itertools.islice(itertools.combinations(range(n), k), 1, None)
            return
        seen: set[tuple[int, ...]] = set()
        for j in range(k):
            for p in range(k, n):
                rows = tuple(sorted([i for i in range(k) if i != j] + [p]))
                seen.add(rows)
                yield rows
        rng = np.random.default_rng(1000 * k + self.r)
        tries = 0
        while len(seen) < MAX_PATTERNS_CHECKED and tries < 4 * MAX_PATTERNS_CHECKED:
            tries += 1
            rows = tuple(sorted(int(i) for i in rng.choice(n, size=k, replace=False)))
            if rows not in seen and rows != tuple(range(k)):
                seen.add(rows)
                yield rows

    def _check_conditioning(self, w: np.ndarray, default: bool) -> None:
        g = np.vstack([np.eye(self.k), w])
        sets = list(self._row_sets())
        self.patterns_total = math.comb(self.n, self.k) - 1
        self.patterns_checked = len(sets)
        self.worst_condition = 1.0
        for start in range(0, len(sets), 256):
            chunk = sets[start : start + 256]
            with np.errstate(all="ignore"):
                conds = np.linalg.cond(g[np.array(chunk)])
            conds = np.where(np.isfinite(conds), conds, np.inf)
            self.worst_condition = max(self.worst_condition, float(conds.max()))
            bad = np.flatnonzero(conds > self.max_condition)
            if len(bad):
                rows = chunk[int(bad[0])]
                erased = sorted(set(range(self.n)) - set(rows))
                what = f"the default weights of (k={self.k}, r={self.r})" if default else "the weights"
                c = conds[bad[0]]
                state = "are singular" if not np.isfinite(c) or c > MAX_CONDITION_CEILING else "decode badly"
                raise CodeError(
                    f"{what} {state}: with workers {erased} erased the remaining rows "
                    f"{list(rows)} have condition number {c:.3g} > max_condition "
                    f"{self.max_condition:.3g} (decoding would multiply the coded models' error by up "
                    "to that factor); use better-conditioned weights or raise max_condition"
                )

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
        """``(k, k)`` float64 matrix ``D`` with ``data = D @ outputs[rows]``.

        Raises:
            DecodeError: the rows' condition number exceeds ``max_condition``
                (checked once per row set, then cached)."""
        key = tuple(rows)
        inv = self._inverse_cache.get(key)
        if inv is None:
            m = self._generator[list(key)]
            with np.errstate(all="ignore"):
                cond = float(np.linalg.cond(m))
            if not cond <= self.max_condition:
                raise DecodeError(
                    f"cannot decode from workers {list(key)}: their rows have condition number "
                    f"{cond:.3g} > max_condition {self.max_condition:.3g}"
                )
            inv = torch.from_numpy(np.linalg.inv(m))
            self._inverse_cache[key] = inv
        return inv

    def condition_number(self, erased: Iterable[int]) -> float:
        """Condition number of the rows used to decode when ``erased`` are missing."""
        erased = set(self._check_indices(erased))
        rows = self.choose_rows([i for i in range(self.n) if i not in erased])
        return float(np.linalg.cond(self._generator[list(rows)]))

    def iter_erasure_patterns(self, max_erasures: int | None = None) -> Iterator[tuple[int, ...]]:
        """Lazily, every decodable erasure pattern that erases at least one data
        model, of size ``1..min(r, max_erasures)``, as sorted tuples of worker indices."""
        m = self.r if max_erasures is None else min(self.r, max_erasures)
        for size in range(1, m + 1):
            for pat in itertools.combinations(range(self.n), size):
                if pat[0] < self.k:
                    yield pat

    def count_erasure_patterns(self, max_erasures: int | None = None) -> int:
        """How many patterns :meth:`iter_erasure_patterns` yields (computed, not enumerated)."""
        m = self.r if max_erasures is None else min(self.r, max_erasures)
        return sum(math.comb(self.n, s) - math.comb(self.r, s) for s in range(1, m + 1))

    def erasure_patterns(self, max_erasures: int | None = None) -> list[tuple[int, ...]]:
        """Every decodable erasure pattern that erases at least one data model,
        of size ``1..min(r, max_erasures)``, as sorted tuples of worker indices.

        Raises:
            CodeError: more than :data:`MAX_PATTERNS_LISTED` patterns (use
                :meth:`iter_erasure_patterns` or a smaller ``max_erasures``)."""
        count = self.count_erasure_patterns(max_erasures)
        if count > MAX_PATTERNS_LISTED:
            raise CodeError(
                f"a (k={self.k}, r={self.r}) code has {count} erasure patterns, more than the "
                f"{MAX_PATTERNS_LISTED} listed at once; pass a smaller max_erasures or iterate"
            )
        return list(self.iter_erasure_patterns(max_erasures))

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

    def residual(self, available: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Per sample, how far the outputs that arrived are from any consistent set:
        ``‖G_S p̂ − y_S‖`` with ``p̂`` the least-squares data outputs from all of
        them (``S``: the workers in ``available``, at least ``k + 1``). Near the
        parities' approximation error when every output is right; large when one
        is not."""
        if not isinstance(available, Mapping) or len(available) < self.k + 1:
            raise DecodeError(
                f"checking outputs needs at least k + 1 = {self.k + 1} of them, got "
                f"{len(available) if isinstance(available, Mapping) else type(available).__name__}"
            )
        ws = self._check_indices(available.keys())
        ys = [available[i] for i in ws]
        shape = tuple(ys[0].shape)
        if len(shape) != 2 or any(tuple(y.shape) != shape for y in ys):
            raise DecodeError(
                f"outputs must share one (batch, C) shape, got {sorted({tuple(y.shape) for y in ys})}"
            )
        dtype = ys[0].dtype if ys[0].is_floating_point() else torch.float64
        y = torch.stack([v.to(dtype) for v in ys])  # (S, B, C)
        if not torch.isfinite(y).all():
            raise _nonfinite([i for i, v in zip(ws, ys, strict=True) if not torch.isfinite(v).all()])
        proj = self._residual_cache.get(tuple(ws))
        if proj is None:  # the projection onto what no set of data outputs explains, once per row set
            g = self._generator[ws]
            proj = self._residual_cache[tuple(ws)] = torch.from_numpy(np.eye(len(ws)) - g @ np.linalg.pinv(g))
        res = torch.einsum("st,tbc->sbc", proj.to(dtype=dtype, device=y.device), y)
        return res.pow(2).sum(dim=(0, 2)).sqrt()

    def locate(self, available: Mapping[int, torch.Tensor], threshold: float) -> torch.Tensor:
        """Per sample, the worker whose output is inconsistent with the others, or −1.

        Each worker is left out in turn and the rest scored by :meth:`residual`;
        the worker whose removal leaves the most consistent set is named when the
        full set's residual exceeds ``threshold`` (probabilities live on one
        scale, so an absolute test; calibrate it on clean outputs, e.g. their
        99th percentile for about 1 % false alarms). Needs at least ``k + 2`` outputs
        (``r ≥ 2`` with nothing late): with ``k + 1`` a corrupt output can be
        detected but not told apart from the ones it contradicts."""
        if not isinstance(threshold, int | float) or isinstance(threshold, bool) or not threshold > 0:
            raise DecodeError(f"threshold must be a positive number, got {threshold!r}")
        if not isinstance(available, Mapping) or len(available) < self.k + 2:
            n = len(available) if isinstance(available, Mapping) else type(available).__name__
            raise DecodeError(
                f"locating a corrupt output needs at least k + 2 = {self.k + 2} outputs, got {n}"
            )
        ws = self._check_indices(available.keys())
        full = self.residual(available)
        without = torch.stack([self.residual({w: available[w] for w in ws if w != c}) for c in ws])
        idx = without.argmin(dim=0)
        named = torch.tensor(ws, device=full.device)[idx]
        return torch.where(full > threshold, named, torch.full_like(named, -1))

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
        return {
            "k": self.k,
            "r": self.r,
            "weights": self._weights.tolist(),
            "max_condition": self.max_condition,
        }

    @classmethod
    def from_dict(cls, d: Mapping, max_condition: float | None = None) -> Code:
        """Inverse of :meth:`to_dict`, strict about types (the dict may come from a file).

        The condition limit is the smaller of the recorded ``max_condition`` and
        the caller's ``max_condition`` (default :data:`DEFAULT_MAX_CONDITION`):
        a recorded value can tighten the check but never loosen it; only the
        caller can raise it (up to :data:`MAX_CONDITION_CEILING`)."""
        if not isinstance(d, Mapping):
            raise CodeError(f"a code must be an object with k, r and weights, got {type(d).__name__}")
        for key in ("k", "r"):
            if key not in d:
                raise CodeError(f"the code lacks the field {key!r}")
        limit = _check_max_condition(DEFAULT_MAX_CONDITION if max_condition is None else max_condition)
        recorded = d.get("max_condition")
        if recorded is not None:
            limit = min(limit, _check_max_condition(recorded, "recorded max_condition"))
        weights = d.get("weights")
        if weights is not None and not isinstance(weights, list | tuple | np.ndarray):
            raise CodeError(f"weights must be an (r, k) list of lists, got {type(weights).__name__}")
        return cls(d["k"], d["r"], weights, max_condition=limit)


def _check_count(v: object, name: str, cap: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int | np.integer):
        raise CodeError(f"{name} must be an integer, got {v!r} ({type(v).__name__})")
    if not 1 <= int(v) <= cap:
        raise CodeError(f"{name} must be in 1..{cap}, got {int(v)}")
    return int(v)


def _check_max_condition(v: object, name: str = "max_condition") -> float:
    if isinstance(v, bool) or not isinstance(v, Real):
        raise CodeError(f"{name} must be a number, got {v!r}")
    f = float(v)
    if not 1.0 <= f <= MAX_CONDITION_CEILING:
        raise CodeError(f"{name} must be in 1..{MAX_CONDITION_CEILING:g}, got {v!r}")
    return f


def _check_numbers(weights: object) -> None:
    """``weights`` given as nested sequences hold only real numbers (not bool,
    not strings), in at most two levels; raises CodeError naming the first bad entry."""
    if not isinstance(weights, Sequence) or isinstance(weights, str | bytes):
        raise CodeError(f"weights must be a numeric (r, k) list of lists, got {type(weights).__name__}")
    for i, row in enumerate(weights):
        if isinstance(row, np.ndarray) and row.dtype.kind in "fiu" and row.ndim == 1:
            continue
        if not isinstance(row, Sequence) or isinstance(row, str | bytes):
            raise CodeError(f"weights row {i} must be a list of numbers, got {row!r}")
        for j, v in enumerate(row):
            if isinstance(v, bool) or not isinstance(v, Real):
                raise CodeError(f"weights[{i}][{j}] must be a number, got {v!r}")


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

"""Metrics of decoded outputs over erasure patterns.

The headline metric is *reconstruction accuracy*: top-1 agreement of a decoded
output with the erased model's own output. Decoded *task* accuracy (against
labels, on the erased model's own task images) can flatter: subtracting a
surviving model's output removes its classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from coinfer.code import Code

__all__ = [
    "total_variation",
    "negative_mass",
    "evaluate_patterns",
    "evaluate_estimates",
    "substitute_estimates",
    "default_estimates",
    "summarize",
    "target_mixture_tv",
    "METRICS",
]

#: The per-row metrics, in the order tables show them.
METRICS = (
    "reconstruction_acc",
    "reconstruction_acc_task",
    "decoded_task_acc",
    "own_task_acc",
    "tv",
    "negative_mass",
)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-row total variation ``0.5 * sum |p - q|`` along the last dim."""
    return 0.5 * (p - q).abs().sum(-1)


def negative_mass(p: torch.Tensor) -> torch.Tensor:
    """Per-row total of the negative entries' magnitudes."""
    return (-p).clamp(min=0).sum(-1)


def target_mixture_tv(code: Code, outputs: torch.Tensor) -> list[float]:
    """Mean TV between each coded model's output and its target mixture
    ``Σ w_i p_i``; ``outputs`` is ``(n, N, C)``."""
    ideal = code.encode_outputs(outputs[: code.k])
    return [float(total_variation(outputs[code.k + j], ideal[code.k + j]).mean()) for j in range(code.r)]


def evaluate_patterns(
    code: Code,
    outputs: torch.Tensor,
    labels: torch.Tensor | None = None,
    task_masks: Sequence[torch.Tensor] | None = None,
    patterns: Sequence[Sequence[int]] | None = None,
) -> list[dict]:
    """Decode every erasure pattern and measure each erased data model.

    Args:
        code: the code.
        outputs: ``(n, N, C)`` probabilities of all workers on the test inputs.
        labels: ``(N,)`` labels, for task accuracy.
        task_masks: per data model, a boolean ``(N,)`` mask of its task's images.
        patterns: erasure patterns (default: every decodable one).

    Returns:
        One row per (pattern, erased data model) with ``reconstruction_acc``
        (whole test set), ``reconstruction_acc_task``, ``decoded_task_acc``,
        ``own_task_acc``, ``tv``, ``negative_mass``.
    """
    n, _, _ = outputs.shape
    if n != code.n:
        raise ValueError(f"outputs has {n} workers along dim 0, the code has n = {code.n}")
    estimates = {}
    for pat in patterns if patterns is not None else code.erasure_patterns():
        avail = {i: outputs[i] for i in range(code.n) if i not in pat}
        estimates[tuple(pat)] = code.decode(avail)
    return evaluate_estimates(outputs[: code.k], estimates, labels, task_masks)


def _row(pat, j, true, est, labels, task_masks) -> dict:
    agree = est.argmax(-1) == true.argmax(-1)
    row = {
        "pattern": list(pat),
        "erased": j,
        "reconstruction_acc": float(agree.float().mean()),
        "tv": float(total_variation(est, true).mean()),
        "negative_mass": float(negative_mass(est).mean()),
    }
    if task_masks is not None:
        m = task_masks[j]
        row["reconstruction_acc_task"] = float(agree[m].float().mean())
        if labels is not None:
            row["decoded_task_acc"] = float((est[m].argmax(-1) == labels[m]).float().mean())
            row["own_task_acc"] = float((true[m].argmax(-1) == labels[m]).float().mean())
    elif labels is not None:
        row["decoded_task_acc"] = float((est.argmax(-1) == labels).float().mean())
        row["own_task_acc"] = float((true.argmax(-1) == labels).float().mean())
    return row


def evaluate_estimates(
    data_outputs: torch.Tensor,
    estimates: Mapping[tuple[int, ...], torch.Tensor],
    labels: torch.Tensor | None = None,
    task_masks: Sequence[torch.Tensor] | None = None,
) -> list[dict]:
    """Measure estimated outputs of erased data models against their true outputs.

    Args:
        data_outputs: ``(k, N, C)`` true outputs of the k data models.
        estimates: maps an erasure pattern (worker indices) to ``(k, N, C)``
            estimates; only the erased data models' rows are read.
        labels, task_masks: as in :func:`evaluate_patterns`.

    Returns:
        One row per (pattern, erased data model); see :func:`evaluate_patterns`.
    """
    k = data_outputs.shape[0]
    rows = []
    for pat, est in estimates.items():
        for j in pat:
            if j < k:
                rows.append(_row(pat, j, data_outputs[j], est[j], labels, task_masks))
    return rows


def substitute_estimates(
    data_outputs: torch.Tensor, patterns: Sequence[Sequence[int]]
) -> dict[tuple[int, ...], torch.Tensor]:
    """No parity: each erased model's output is replaced by the mean output of the
    surviving data models (uniform if none survives)."""
    k, _, c = data_outputs.shape
    out = {}
    for pat in patterns:
        alive = [i for i in range(k) if i not in pat]
        sub = data_outputs[alive].mean(0) if alive else torch.full_like(data_outputs[0], 1.0 / c)
        est = data_outputs.clone()
        for j in pat:
            if j < k:
                est[j] = sub
        out[tuple(pat)] = est
    return out


def default_estimates(
    data_outputs: torch.Tensor, patterns: Sequence[Sequence[int]]
) -> dict[tuple[int, ...], torch.Tensor]:
    """No parity: each erased model's output is a constant answer, the uniform
    distribution (its top-1 is class 0: chance accuracy, as ParM reports "default")."""
    _, _, c = data_outputs.shape
    out = {}
    for pat in patterns:
        est = data_outputs.clone()
        for j in pat:
            if j < data_outputs.shape[0]:
                est[j] = 1.0 / c
        out[tuple(pat)] = est
    return out


def summarize(rows: Sequence[dict]) -> dict[str, float]:
    """Mean of each metric over rows (patterns x erased models); NaN if absent."""
    out = {}
    for m in METRICS:
        vals = [r[m] for r in rows if m in r and r[m] == r[m]]
        out[m] = sum(vals) / len(vals) if vals else float("nan")
    return out

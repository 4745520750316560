"""Metrics of decoded outputs over erasure patterns.

The headline metric is *reconstruction accuracy*: top-1 agreement of a decoded
output with the erased model's own output. Decoded *task* accuracy (against
labels, on the erased model's own task images) can flatter: subtracting a
surviving model's output removes its classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from coinfer.code import Code

__all__ = [
    "total_variation",
    "negative_mass",
    "evaluate_patterns",
    "target_mixture_tv",
]


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
    rows = []
    for pat in patterns if patterns is not None else code.erasure_patterns():
        avail = {i: outputs[i] for i in range(code.n) if i not in pat}
        dec = code.decode(avail)
        for j in pat:
            if j >= code.k:
                continue
            true, est = outputs[j], dec[j]
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
            rows.append(row)
    return rows

"""Checks at the boundary of encoding: the k models and the calibration inputs.

Each refuses bad input with an error that names the model, the parameter or
the shape, before any expensive work.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from coinfer.errors import CalibrationError, ModelMismatchError

__all__ = ["check_models", "as_calibration", "check_calibration"]


def check_models(models: Sequence[nn.Module], k: int | None = None) -> None:
    """Refuse models that cannot be encoded together, naming index and parameter."""
    if not isinstance(models, Sequence) or isinstance(models, nn.Module):
        raise ModelMismatchError(f"models must be a list of nn.Module, got {type(models).__name__}")
    if len(models) < 2:
        raise ModelMismatchError(f"encoding needs k >= 2 data models, got k = {len(models)}")
    if k is not None and len(models) != k:
        raise ModelMismatchError(f"the code has k = {k} but {len(models)} models were given")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise ModelMismatchError(f"model {i} is a {type(m).__name__}, not an nn.Module")
    ref = models[0].state_dict()
    ref_params = {n for n, _ in models[0].named_parameters()}
    for i, m in enumerate(models):
        sd = m.state_dict()
        if i > 0:
            missing = [n for n in ref if n not in sd]
            extra = [n for n in sd if n not in ref]
            if missing or extra:
                raise ModelMismatchError(
                    f"model {i} has a different architecture than model 0: "
                    f"missing {missing[:3]}, unexpected {extra[:3]}"
                )
            pnames = {n for n, _ in m.named_parameters()}
            if pnames != ref_params:
                diff = sorted(pnames ^ ref_params)[:3]
                raise ModelMismatchError(
                    f"model {i} differs from model 0 in which tensors are parameters: {diff}"
                )
        for n, t in sd.items():
            r = ref[n]
            if t.shape != r.shape:
                raise ModelMismatchError(
                    f"model {i} parameter {n!r} has shape {tuple(t.shape)}, model 0 has {tuple(r.shape)}"
                )
            if t.dtype != r.dtype:
                raise ModelMismatchError(
                    f"model {i} parameter {n!r} has dtype {t.dtype}, model 0 has {r.dtype}"
                )
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise ModelMismatchError(f"model {i} parameter {n!r} has {bad} NaN/inf entries")


def as_calibration(calibration) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tensor, ``(x, y)`` pair, or an iterable of batches -> ``(x, y or None)``."""
    if isinstance(calibration, torch.Tensor):
        return calibration, None
    if (
        isinstance(calibration, tuple | list)
        and len(calibration) == 2
        and all(isinstance(t, torch.Tensor) for t in calibration)
    ):
        x, y = calibration
        if len(x) != len(y):
            raise CalibrationError(f"calibration inputs have {len(x)} samples but labels {len(y)}")
        return x, y.long()
    if isinstance(calibration, Iterable):
        xs, ys = [], []
        for b in calibration:
            if isinstance(b, torch.Tensor):
                xs.append(b)
            elif isinstance(b, list | tuple) and b and isinstance(b[0], torch.Tensor):
                xs.append(b[0])
                if len(b) > 1:
                    ys.append(torch.as_tensor(b[1]))
            else:
                raise CalibrationError(
                    f"calibration batches must be tensors or (inputs, labels) pairs, got {type(b).__name__}"
                )
        if not xs:
            raise CalibrationError("calibration data is empty")
        x = torch.cat(xs)
        y = torch.cat(ys).long() if len(ys) == len(xs) else None
        return x, y
    raise CalibrationError(
        f"calibration must be a tensor, an (inputs, labels) pair or a DataLoader, got {type(calibration).__name__}"
    )


def check_calibration(
    models: Sequence[nn.Module], x: torch.Tensor, input_shape: Sequence[int] | None
) -> None:
    """Refuse calibration inputs that are not a finite floating batch of
    ``input_shape`` samples, or that model 0 cannot run into (batch, C) logits."""
    if not x.is_floating_point():
        raise CalibrationError(f"calibration inputs must be floating point, got {x.dtype}")
    if x.ndim < 2 or len(x) == 0:
        raise CalibrationError(
            f"calibration inputs must be a (N, *input_shape) batch, got shape {tuple(x.shape)}"
        )
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise CalibrationError(
            f"calibration inputs have per-sample shape {tuple(x.shape[1:])}, expected {tuple(input_shape)}"
        )
    if not torch.isfinite(x).all():
        raise CalibrationError("calibration inputs contain NaN or inf")
    m = models[0]
    was = m.training
    m.eval()
    try:
        with torch.no_grad():
            out = m(x[:2])
    except Exception as exc:  # the model's own error says what did not fit
        raise CalibrationError(
            f"calibration inputs of per-sample shape {tuple(x.shape[1:])} do not fit model 0: {exc}"
        ) from None
    finally:
        m.train(was)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise CalibrationError(
            f"models must return (batch, C) logits; model 0 returned {getattr(out, 'shape', type(out))}"
        )

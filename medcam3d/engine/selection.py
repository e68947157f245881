"""Validate the input tensor and the requested classes (the scores are validated in ``scores``)."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Union

import torch
from torch import nn

from medcam3d.errors import ClassIndexError, InputError

ClassSpec = Union[int, Sequence[int], Sequence[Sequence[int]], torch.Tensor, str, None]


def check_input(x: object, model: nn.Module) -> torch.Tensor:
    """A float (B, C, *spatial) tensor with 2 or 3 spatial dims, finite, on the model's device."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"x must be a torch.Tensor of shape (B, C, *spatial), not {type(x).__name__}.")
    if not x.is_floating_point():
        raise InputError(f"x must be a floating-point tensor, got {x.dtype}; convert it with x.float().")
    if x.ndim not in (4, 5):
        raise InputError(
            f"x must have shape (B, C, *spatial) with 2 or 3 spatial dims, got shape {tuple(x.shape)} "
            f"({x.ndim} dims). For one 3D volume of shape (D, H, W) pass x[None, None]."
        )
    if x.shape[0] == 0 or any(s == 0 for s in x.shape[1:]):
        raise InputError(f"x has an empty dimension: shape {tuple(x.shape)}.")
    if not bool(torch.isfinite(x).all()):
        raise InputError("x contains NaN or infinite values; fix or mask them before explaining.")
    param = next(model.parameters(), None)
    if param is not None and param.device != x.device:
        raise InputError(
            f"x is on {x.device} but the model's parameters are on {param.device}; move one of them "
            f"(x.to('{param.device}'))."
        )
    return x


def _as_index_list(values: Sequence[object], n_outputs: int) -> list[int]:
    result = []
    for v in values:
        try:
            if isinstance(v, bool):
                raise TypeError
            i = operator.index(v)
        except TypeError:
            raise InputError(f"class indices must be integers, got {v!r} ({type(v).__name__}).") from None
        if not 0 <= i < n_outputs:
            raise ClassIndexError(
                f"class index {i} is out of range: the model has {n_outputs} output(s), valid "
                f"indices are 0..{n_outputs - 1}."
            )
        result.append(i)
    return result


def select_classes(class_idx: ClassSpec, scores: torch.Tensor) -> torch.Tensor:
    """(B, K) int64 indices of the outputs to explain, on the scores' device.

    ``None``: argmax per sample (K=1); int: that class; a sequence: those classes for every sample;
    ``"all"``: every output; a (B, K) nested sequence or tensor: per-sample classes.
    """
    batch, n_outputs = scores.shape
    device = scores.device
    if class_idx is None:
        return scores.detach().argmax(dim=1, keepdim=True)
    if isinstance(class_idx, str):
        if class_idx != "all":
            raise InputError(f"class_idx must be an int, a sequence of ints, 'all' or None, not {class_idx!r}.")
        return torch.arange(n_outputs, device=device).expand(batch, n_outputs).clone()
    if isinstance(class_idx, torch.Tensor):
        if class_idx.is_floating_point() or class_idx.ndim > 2:
            raise InputError(f"class_idx tensor must be integer with 0-2 dims, got {class_idx.dtype} {tuple(class_idx.shape)}.")
        class_idx = class_idx.tolist()
    if isinstance(class_idx, int) and not isinstance(class_idx, bool):
        rows = [_as_index_list([class_idx], n_outputs)] * batch
    elif isinstance(class_idx, Sequence) and len(class_idx) > 0:
        if all(isinstance(r, Sequence) and not isinstance(r, str) for r in class_idx):
            if len(class_idx) != batch:
                raise InputError(f"per-sample class_idx has {len(class_idx)} rows for a batch of {batch}.")
            rows = [_as_index_list(r, n_outputs) for r in class_idx]
            if len({len(r) for r in rows}) != 1 or not rows[0]:
                raise InputError("per-sample class_idx rows must all have the same, non-zero length.")
        else:
            rows = [_as_index_list(class_idx, n_outputs)] * batch
    else:
        raise InputError(
            f"class_idx must be an int, a non-empty sequence of ints, 'all' or None, not {class_idx!r}."
        )
    return torch.tensor(rows, dtype=torch.long, device=device)

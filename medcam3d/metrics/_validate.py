"""Input checks shared by the metrics: numpy or torch in, validated numpy out, InputError otherwise."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from medcam3d.errors import InputError

ArrayLike = np.ndarray | torch.Tensor


def to_numpy(x: object, name: str) -> np.ndarray:
    """A numpy view/copy of a numpy array or torch tensor (any device); anything else is an InputError."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        if t.is_complex():
            raise InputError(f"{name} must be real-valued, got a complex tensor")
        return t.numpy()
    if isinstance(x, np.ndarray):
        return x
    raise InputError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")


def _real_array(x: object, name: str) -> np.ndarray:
    """``x`` as a numpy array of real numbers, rank >= 1, non-empty (no copy, dtype kept)."""
    a = to_numpy(x, name)
    if a.dtype.kind not in "biuf":
        raise InputError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    if a.ndim < 1 or a.size == 0:
        raise InputError(f"{name} must be a non-empty array with at least one dimension, got shape {a.shape}")
    return a


def _not_finite(name: str) -> InputError:
    return InputError(f"{name} contains NaN or infinite values; fix the map before scoring it")


def as_map(x: object, name: str = "saliency") -> np.ndarray:
    """A finite, real, non-empty float64 map of any rank >= 1."""
    a = _real_array(x, name).astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        raise _not_finite(name)
    return a


def checked_map(x: object, name: str = "saliency") -> tuple[np.ndarray, float, float]:
    """(map, min, max) of a finite, real, non-empty map, checked WITHOUT a float64 copy (a
    full-size map on a thin-slice scan is 400 MB in float32; :func:`as_map` would copy it to
    800 MB). The map keeps its dtype. A NaN or an infinity makes the minimum or the maximum
    non-finite, so the two reductions check every value."""
    a = _real_array(x, name)
    lo, hi = float(a.min()), float(a.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise _not_finite(name)
    return a, lo, hi


def map_range(x: object, name: str = "saliency") -> tuple[float, float]:
    """(min, max) of a finite, real, non-empty map (:func:`checked_map` without the array)."""
    _, lo, hi = checked_map(x, name)
    return lo, hi


CHUNK = 1 << 22  # elements per float64 chunk in :func:`chunks` (32 MB)


def chunks(a: np.ndarray, *others: np.ndarray):
    """Aligned float64 chunks of ``a`` and the matching chunks of ``others`` (same shape), walked in
    ``a``'s memory order (Fortran for a Fortran-ordered map, else C): how the scores below evaluate
    their float64 formulas on a full-size map holding only one 32 MB chunk of float64 at a time."""
    order = "F" if (a.flags.f_contiguous and not a.flags.c_contiguous) else "C"
    flat = a.ravel(order=order)
    rest = [np.asarray(o).ravel(order=order) for o in others]
    for i in range(0, flat.size, CHUNK):
        yield (flat[i:i + CHUNK].astype(np.float64), *[r[i:i + CHUNK] for r in rest])


def as_mask(x: object, shape: tuple[int, ...], name: str = "mask", nonempty: bool = True) -> np.ndarray:
    """A boolean mask of exactly ``shape`` from bool or 0/1 numeric input."""
    a = to_numpy(x, name)
    if a.dtype.kind not in "biuf":
        raise InputError(f"{name} must be a boolean or 0/1 array, got dtype {a.dtype}")
    if a.shape != tuple(shape):
        raise InputError(f"{name} has shape {a.shape} but the map has shape {tuple(shape)}; they must "
                         "match voxel for voxel (squeeze batch/channel axes, resample the mask first)")
    if a.dtype != bool:
        if not np.isin(a, (0, 1)).all():
            raise InputError(f"{name} must contain only 0 and 1 (a binary mask), got other values")
        a = a.astype(bool)
    if nonempty and not a.any():
        raise InputError(f"{name} is empty (no voxel set); this metric is undefined without a region")
    return a


def as_spacing(spacing: Sequence[float] | np.ndarray | None, ndim: int) -> np.ndarray:
    """Per-axis voxel size (mm); None means 1 per axis (distances in voxels)."""
    if spacing is None:
        return np.ones(ndim)
    try:
        sp = np.asarray([float(s) for s in spacing], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"spacing must be {ndim} positive numbers, got {spacing!r}") from None
    if sp.shape != (ndim,) or not np.all(np.isfinite(sp)) or not np.all(sp > 0):
        raise InputError(f"spacing must be {ndim} positive numbers (one per map axis), got {spacing!r}")
    return sp


def as_number(x: object, name: str, low: float = -math.inf, high: float = math.inf,
              low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number in the given range."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise InputError(f"{name} must be a number, got {x!r}")
    v = float(x)
    bad_low = v <= low if low_open else v < low
    bad_high = v >= high if high_open else v > high
    if not math.isfinite(v) or bad_low or bad_high:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise InputError(f"{name} must be in {lo}{low}, {high}{hi}, got {x!r}")
    return v

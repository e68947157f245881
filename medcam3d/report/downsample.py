"""Shrink a displayed slice to about the pixels it occupies in the PNG, by area averaging.

A panel a few hundred pixels wide cannot show more than one value per pixel; matplotlib would
otherwise resample the full slice with nearest-neighbour sampling, which drops voxels (aliasing)
and costs time on large slices. Here a slice is reduced by whole ``fv x fh`` voxel blocks only
when at least two voxels fall on one pixel along an axis (``factor``), each block showing the mean
of the voxels it holds (area averaging, the box filter); a last, partial block averages the voxels
it has, and keeps its true physical size (the caller draws it with :func:`extent_mm`).

For a map the block that holds the map's peak shows the block's maximum instead of its mean, so
the peak keeps its location (to within one block, i.e. one displayed pixel) and its value: the
colour bar's top is still reached where the peak is.
"""

from __future__ import annotations

import numpy as np


def factor(n_voxels: int, n_pixels: float) -> int:
    """Voxels per block along an axis of ``n_voxels`` shown on ``n_pixels`` pixels (>= 1, whole)."""
    return max(1, int(n_voxels // max(float(n_pixels), 1.0)))


def _mean_along(a: np.ndarray, f: int, axis: int) -> np.ndarray:
    if f <= 1:
        return a
    starts = np.arange(0, a.shape[axis], f)
    counts = np.diff(np.append(starts, a.shape[axis])).astype(np.float64)
    shape = [1, 1]
    shape[axis] = len(starts)
    return np.add.reduceat(a, starts, axis=axis, dtype=np.float64) / counts.reshape(shape)


def block_mean(a: np.ndarray, fv: int, fh: int) -> np.ndarray:
    """Mean of each ``fv x fh`` block of a 2-D slice ``a`` (rows x columns) as float32.

    Shape ``(ceil(rows / fv), ceil(columns / fh))``; a factor of 1 leaves that axis as it is."""
    if fv <= 1 and fh <= 1:
        return np.asarray(a, dtype=np.float32)
    return _mean_along(_mean_along(np.asarray(a), fv, 0), fh, 1).astype(np.float32)


def block_mean_keep_peak(a: np.ndarray, fv: int, fh: int, peak: tuple[int, int]) -> np.ndarray:
    """:func:`block_mean`, except that the block holding ``peak`` (row, column of ``a``) shows its
    maximum (the map's maximum when ``peak`` is the argmax)."""
    out = block_mean(a, fv, fh)
    if fv > 1 or fh > 1:
        r, c = peak[0] // max(fv, 1), peak[1] // max(fh, 1)
        block = a[r * fv:(r + 1) * fv, c * fh:(c + 1) * fh]
        out[r, c] = float(np.max(block))
    return out


def extent_mm(n: int, f: int, d: float) -> float:
    """Physical length (mm) covered by the blocks of ``f`` voxels of ``d`` mm along an axis of ``n``
    voxels: ``ceil(n / f) * f * d`` (a partial last block is drawn at full size and clipped by the
    axes' limits, so every voxel stays where it is)."""
    return -(-n // f) * f * d

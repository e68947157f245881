"""Localisation scores: does a map point at, and put its weight on, the annotated region?

All functions take a map and a binary mask of the same shape (any rank: 2D, 3D...), as numpy arrays
or torch tensors, and return plain Python numbers. Maps are compared as given (signed HiResCAM maps
are fine: each definition says how negative values count).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medcam3d.metrics._validate import ArrayLike, as_map, as_mask, as_number, as_spacing, checked_map, chunks
from medcam3d.metrics.peak import first_max_index


def pointing_game(saliency: ArrayLike, mask: ArrayLike, spacing: Sequence[float] | None = None,
                  tolerance_mm: float = 0.0) -> bool:
    """Pointing game hit: the map's peak voxel lies in the mask, or within ``tolerance_mm`` of it.

    Definition: p = the FIRST maximal voxel in C (row-major) order, i.e. ``np.argmax`` of the
    flattened map (deterministic; ties never count as several guesses). Hit ⇔ mask[p], or
    min over mask voxels q of ||(p - q) * spacing||_2 <= tolerance_mm (distance between voxel
    centres in mm; ``spacing=None`` = 1 per axis, i.e. voxels). A flat map (max == min) has no peak
    and is a miss. The mask must be non-empty.
    """
    s, lo, hi = checked_map(saliency)  # only compared, never computed with: no float64 copy
    m = as_mask(mask, s.shape)
    sp = as_spacing(spacing, s.ndim)
    tol = as_number(tolerance_mm, "tolerance_mm", low=0.0)
    if hi == lo:
        return False
    p = first_max_index(s)
    if m[p]:
        return True
    if tol == 0.0:
        return False
    # only mask voxels inside the box of half-width tol around p can be close enough
    box = tuple(slice(max(c - int(np.floor(tol / d)), 0), c + int(np.floor(tol / d)) + 1)
                for c, d in zip(p, sp))
    near = np.argwhere(m[box])
    if near.size == 0:
        return False
    offset = np.array([b.start for b in box])
    d2 = ((((near + offset) - np.asarray(p)) * sp) ** 2).sum(axis=1)
    return bool(d2.min() <= tol * tol * (1.0 + 1e-9))


def mass_in_mask(saliency: ArrayLike, mask: ArrayLike) -> float:
    """Share of the positive map mass inside the mask (the "weighting game" / energy pointing game).

    Definition: sum(relu(s)[mask]) / sum(relu(s)). Negative values carry no mass. Returns NaN when
    the map has no positive value (0/0: the map attributes nothing). The mask must be non-empty.
    """
    s, _, _ = checked_map(saliency)
    m = as_mask(mask, s.shape)
    total = inside = 0.0
    for c, mc in chunks(s, m):  # float64, one chunk at a time (full-size maps: no 2x copy)
        np.maximum(c, 0.0, out=c)
        total += float(c.sum())
        inside += float(c[mc].sum())
    if total <= 0.0:
        return float("nan")
    return float(inside / total)


def fraction_inside_allowed(saliency: ArrayLike, allowed: ArrayLike, threshold: float = 0.5,
                            weighted: bool = False) -> float:
    """Draelos & Carin's "fraction inside the allowed region" (AxialNet/HiResCAM IoU-like score).

    Definition (as in their code, with the edge case fixed): n = relu(s) - min(relu(s)), divided by
    max(n) (their clip-and-normalise); selected voxels A = {n > threshold}; a = |A ∩ allowed|,
    b = |A \\ allowed| (with ``weighted=True``: the sums of n over those voxels); score = a / (a + b).
    So 1.0 when all selected attribution is inside the region (their code returned 0 when b == 0),
    0.0 when all of it is outside, NaN when nothing is selected (flat or all non-positive map, or
    threshold above every value). Draelos tuned ``threshold`` per class on validation data
    (0.004–0.98); 0.5 = the half-maximum region. The allowed region must be non-empty.
    """
    s, lo, hi = checked_map(saliency)
    m = as_mask(allowed, s.shape, name="allowed")
    thr = as_number(threshold, "threshold", 0.0, 1.0, high_open=True)
    low = max(lo, 0.0)  # min(relu(s)), exact
    top = max(hi, 0.0) - low  # max(n)
    if top <= 0.0:
        return float("nan")
    a = b = 0.0
    for n, mc in chunks(s, m):  # n = (relu(s) - min) / max(n) in float64, one chunk at a time
        np.maximum(n, 0.0, out=n)
        n -= low
        n /= top
        sel = n > thr
        if weighted:
            a += float(n[sel & mc].sum())
            b += float(n[sel & ~mc].sum())
        else:
            a += float(np.count_nonzero(sel & mc))
            b += float(np.count_nonzero(sel & ~mc))
    if a + b == 0.0:
        return float("nan")
    return a / (a + b)


def iou_at_threshold(saliency: ArrayLike, mask: ArrayLike, threshold: float = 0.5,
                     relative: bool = True) -> float:
    """Intersection over union of the thresholded map with the mask.

    Definition: region R = {s >= threshold * max(s)} ∩ {s > 0} when ``relative`` (threshold in
    [0, 1], a fraction of the maximum; NaN if max(s) <= 0), else R = {s >= threshold};
    IoU = |R ∩ mask| / |R ∪ mask|. The mask must be non-empty, so the union is never empty.
    """
    s = as_map(saliency)
    m = as_mask(mask, s.shape)
    if relative:
        thr = as_number(threshold, "threshold", 0.0, 1.0)
        top = s.max()
        if top <= 0.0:
            return float("nan")
        region = (s >= thr * top) & (s > 0.0)
    else:
        region = s >= as_number(threshold, "threshold")
    inter = np.count_nonzero(region & m)
    union = np.count_nonzero(region | m)
    return float(inter / union)

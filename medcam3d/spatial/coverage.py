"""How much of a map's evidence lies outside the scan: measured on the model grid, never dropped silently.

Preprocessing may pad the scan (ResizeWithPadOrCrop, SpatialPad, Spacing onto a larger box) or place
the model grid partly outside the scanned volume. Map mass there has no voxel of the scan to land on,
so the inverse back onto the scan's grid drops it. A model that relies on padding is a shortcut users
must see, so :func:`outside_scan_fraction` measures it before the inverse.

Method (exact, geometric): every model-input voxel centre is taken to world space by the model input's
affine (MONAI updates it through every recorded crop/pad/resample/reorientation step) and then to a
continuous scan index by the inverse of the scan's affine. The voxel belongs to the scan's field of
view when that index lies within the scan's voxel boxes, ``-0.5 <= index_a <= n_a - 0.5`` on every
axis a; otherwise it is padding or lies outside the original volume. Unlike pushing a volume of ones
through the transforms, this does not depend on padding modes ("edge"/"reflect" would copy scan values
into the padding) or on data-driven steps such as CropForeground.
"""

from __future__ import annotations

from typing import Any

import torch

#: fractions above this are reported by the command line (5 % of a map's positive mass)
NOTICEABLE_OUTSIDE_FRACTION = 0.05
_EDGE_TOL = 1e-4  # voxels: float round-off on a voxel-box edge counts as inside


def scan_coverage(x: Any, volume: Any) -> torch.Tensor:
    """Which voxels of the model input come from the scan.

    Args:
        x: the model input, MetaTensor (C, *model_spatial) with its world affine.
        volume: the scan it was made from, MetaTensor (1, *scan_spatial), same world convention.

    Returns:
        bool tensor of shape ``model_spatial``: True where the voxel centre lies inside the scan's
        field of view (see the module docstring).
    """
    a_model = torch.as_tensor(x.affine, dtype=torch.float64)
    a_scan = torch.as_tensor(volume.affine, dtype=torch.float64)
    m = torch.linalg.solve(a_scan, a_model)  # model voxel index -> scan voxel index
    model_shape = tuple(int(s) for s in x.shape[1:])
    scan_shape = tuple(int(s) for s in volume.shape[1:])
    rank = len(model_shape)
    axes = [torch.arange(n, dtype=torch.float64) for n in model_shape]
    inside = torch.ones(model_shape, dtype=torch.bool)
    for a in range(rank):  # one scan axis at a time: one float64 volume of temporary memory
        idx = torch.full(model_shape, float(m[a, rank]), dtype=torch.float64)
        for b in range(rank):
            view = [1] * rank
            view[b] = model_shape[b]
            idx += float(m[a, b]) * axes[b].reshape(view)
        inside &= (idx >= -0.5 - _EDGE_TOL) & (idx <= scan_shape[a] - 0.5 + _EDGE_TOL)
    return inside


def outside_scan_fraction(maps: torch.Tensor, x: Any, volume: Any) -> torch.Tensor:
    """Per map, the fraction of its positive mass on model-input voxels outside the scan.

    ``fraction_k = sum(map_k * outside) / sum(map_k)`` over the model input's grid, with ``outside``
    the complement of :func:`scan_coverage`. Maps are taken as they are (>= 0 after HiResCAM's /
    Grad-CAM's ReLU); a map with no positive mass has fraction 0.

    Args:
        maps: (K, *model_spatial) float tensor on the model input's grid.
        x: the model input (MetaTensor with its affine).
        volume: the scan (MetaTensor with its affine).

    Returns:
        (K,) float32 tensor in [0, 1].
    """
    outside = (~scan_coverage(x, volume)).to(torch.float64)
    m = torch.as_tensor(maps).detach().to("cpu", torch.float64).clamp(min=0).flatten(1)
    total = m.sum(dim=1)
    out = m @ outside.flatten()
    frac = torch.where(total > 0, out / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total))
    return frac.to(torch.float32)

"""Accept the scan to explain: a MetaTensor with its affine, or a path that ``load_volume`` reads."""

from __future__ import annotations

import os
from typing import Any

import torch

from medcam3d.errors import InputError


def as_volume(volume: Any) -> Any:
    """Return a checked MetaTensor (1, X, Y, Z) for ``volume`` (MetaTensor, or a NIfTI/DICOM path).

    Raises:
        InputError: not a MetaTensor/path, wrong shape, or an affine that is not a finite,
            invertible 4x4 (the map could not be placed in world space).
        VolumeLoadError: from :func:`medcam3d.io.load_volume` for a path.
    """
    from monai.data import MetaTensor

    if isinstance(volume, (str, os.PathLike)):
        from medcam3d.io import load_volume

        volume = load_volume(volume)
    if not isinstance(volume, MetaTensor):
        raise InputError(
            f"volume must be a monai.data.MetaTensor of shape (1, X, Y, Z) with its affine, or a path to "
            f"a NIfTI file / DICOM folder; got {type(volume).__name__}. A bare array has no world "
            "coordinates: wrap it as MetaTensor(array[None], affine=affine_4x4)."
        )
    if volume.ndim != 4 or volume.shape[0] != 1:
        hint = " Add the channel axis with volume[None]." if volume.ndim == 3 else ""
        raise InputError(
            f"volume must have shape (1, X, Y, Z) (one channel, three spatial axes); got "
            f"{tuple(volume.shape)}.{hint}"
        )
    if any(s < 1 for s in volume.shape):
        raise InputError(f"volume has an empty axis: shape {tuple(volume.shape)}.")
    affine = torch.as_tensor(volume.affine, dtype=torch.float64)
    if (
        affine.shape != (4, 4)
        or not bool(torch.isfinite(affine).all())
        or abs(float(torch.linalg.det(affine[:3, :3]))) < 1e-9
    ):
        raise InputError(
            f"volume.affine must be a finite, invertible 4x4 voxel-to-world matrix; got {affine.tolist()}."
        )
    return volume

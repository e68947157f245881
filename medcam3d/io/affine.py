"""Affines as numpy: one place for the torch→numpy copy and the LPS→RAS world conversion."""

from __future__ import annotations

from typing import Any

import numpy as np

#: Flips x and y: DICOM/ITK LPS world coordinates <-> nibabel/MONAI RAS world coordinates.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def to_numpy_affine(affine: Any) -> np.ndarray:
    """A float64 numpy copy of a torch/numpy affine."""
    if hasattr(affine, "detach"):
        affine = affine.detach().cpu().numpy()
    return np.array(affine, dtype=np.float64)


def ras_affine(tensor: Any) -> np.ndarray:
    """The voxel → RAS-mm affine of a MetaTensor (converted from LPS when its meta says so)."""
    aff = to_numpy_affine(tensor.affine)
    meta = getattr(tensor, "meta", None)
    if isinstance(meta, dict) and str(meta.get("space", "RAS")).upper() == "LPS":
        aff = LPS_TO_RAS @ aff
    return aff

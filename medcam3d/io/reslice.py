"""Orthogonal copies of scans with sheared voxel grids (gantry tilt), for ITK-based viewers.

A CT acquired with a tilted gantry is a sheared slice stack: each slice is shifted in-plane relative
to the previous one, so the voxel axes are not orthogonal. The affine medcam3d reads (from DICOM
ImagePositionPatient, or a NIfTI sform) keeps the shear, and maps on that grid are right in world
space; nibabel, MONAI and napari place them correctly. ITK (SimpleITK, 3D Slicer, ITK-SNAP) stores an
orthonormal direction matrix only and refuses or mis-places such files. Converters such as dcm2niix
therefore write a resliced, orthogonal copy of tilted series; medcam3d does the same for the scan and
its maps.

The orthogonal grid (:func:`orthogonal_grid`): the affine's 3x3 part M = Q R (QR decomposition) gives
orthonormal axes Q, the first along voxel axis 0, the second in the plane of axes 0 and 1 (the slice
plane), the third along the slice normal, with voxel sizes |R_ii| (the in-plane pixel spacing and the
slice separation along the normal). Its extent covers every source voxel box (all 8 corners), so no
part of the scan is cut off; voxels outside the source are filled (-1024 HU for CT, 0 for maps).
Values are resampled by world position with MONAI's ``SpatialResample`` (trilinear).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from medcam3d.io.affine import to_numpy_affine

#: voxel axes whose directions' cosines exceed this are sheared (about 0.06 degrees)
SHEAR_COS_TOL = 1e-3
RESLICED_SUFFIX = "_resliced"


def shear_degrees(affine: Any) -> float:
    """Largest deviation from 90 degrees between two voxel axes of a 4x4 (or 3x3) affine, in degrees."""
    m = to_numpy_affine(affine)[:3, :3]
    unit = m / np.linalg.norm(m, axis=0, keepdims=True)
    cos = np.abs(unit.T @ unit - np.eye(3)).max()
    return float(math.degrees(math.asin(min(1.0, cos))))


def is_sheared(affine: Any) -> bool:
    """True when the voxel axes are not orthogonal (gantry tilt or any sheared affine)."""
    m = to_numpy_affine(affine)[:3, :3]
    unit = m / np.linalg.norm(m, axis=0, keepdims=True)
    return bool(np.abs(unit.T @ unit - np.eye(3)).max() > SHEAR_COS_TOL)


def orthogonal_grid(affine: Any, shape: tuple[int, int, int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The orthogonal grid (affine, shape) that covers a possibly sheared grid (see module docstring).

    Args:
        affine: (4, 4) voxel -> world (mm) affine of the source grid.
        shape: its spatial shape.

    Returns:
        ``(affine, shape)`` of the covering grid; its 3x3 part has orthogonal columns.
    """
    a = to_numpy_affine(affine)
    q, r = np.linalg.qr(a[:3, :3])
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    q = q * signs  # columns follow the source's voxel axes (axis 0 exactly, axis 2 along the normal)
    spacing = np.abs(np.diag(r))
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape], indexing="ij")).reshape(3, -1)
    world = a[:3, :3] @ corners + a[:3, 3:4]
    local = q.T @ world  # coordinates along the orthonormal axes (mm)
    lo, hi = local.min(axis=1), local.max(axis=1)
    new_shape = tuple(int(math.ceil((h - l) / s - 1e-6)) for l, h, s in zip(lo, hi, spacing))
    out = np.eye(4)
    out[:3, :3] = q * spacing
    out[:3, 3] = q @ (lo + spacing / 2)
    return out, new_shape  # type: ignore[return-value]


def reslice_orthogonal(image: Any, fill: float = 0.0) -> Any:
    """Resample a (C, X, Y, Z) MetaTensor onto :func:`orthogonal_grid` of its affine (trilinear).

    Args:
        image: MetaTensor with its (RAS) affine; a sheared grid is the use case.
        fill: value given to voxels outside the source grid (e.g. -1024 for CT in HU, 0 for maps).

    Returns:
        MetaTensor (C, *new_shape) float32 on the orthogonal grid; meta keeps ``space`` and
        ``filename_or_obj`` (so exporters still refuse to overwrite the source) and gets
        ``qform_code``/``sform_code`` 1 (scanner) or the source's sform code when it had one, plus
        ``resliced_from_shear_deg``.
    """
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    src_affine = to_numpy_affine(image.affine)
    dst_affine, dst_shape = orthogonal_grid(src_affine, tuple(int(s) for s in image.shape[1:]))
    resample = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float64)
    data = MetaTensor(image.as_tensor().to(torch.float64) - fill, affine=torch.as_tensor(src_affine))
    with resample.trace_transform(False):
        out = resample(data, dst_affine=torch.as_tensor(dst_affine), spatial_size=dst_shape)
    values = (torch.as_tensor(out.as_tensor()) + fill).to(torch.float32)
    old = image.meta if isinstance(getattr(image, "meta", None), dict) else {}
    code = int(np.asarray(old.get("sform_code", 0) or 0).reshape(-1)[0]) or 1
    meta = {
        "space": old.get("space", "RAS"),
        "filename_or_obj": old.get("filename_or_obj"),
        "qform_code": code,
        "sform_code": code,
        "resliced_from_shear_deg": shear_degrees(src_affine),
    }
    return MetaTensor(values, affine=torch.as_tensor(dst_affine, dtype=torch.float64), meta=meta)

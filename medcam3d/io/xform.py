"""The source scan's NIfTI qform and sform, carried verbatim onto maps written on its grid.

Why verbatim: a NIfTI file holds two voxel-to-world transforms. nibabel (and MONAI) place an image by
the sform when ``sform_code > 0``, else by the qform, else by pixdim alone; ITK (SimpleITK, 3D Slicer,
ITK-SNAP) applies its own rule (it may prefer the qform, and with both codes 0 it uses pixdim without
nibabel's x flip and centring). A map that carries only the affine nibabel chose, in both slots, is
therefore placed elsewhere than its scan by ITK whenever the scan's qform and sform differ (measured:
24.3 mm for a qform/sform pair offset by (12, -7, 20) mm). Copying the scan's quaternion, offsets,
qfac, pixdim, srow matrix and both codes makes every reader place the map exactly where it places the
scan, whatever rule it follows.

The copy is made only when the fields still describe the maps' grid: the header they form must give
the maps' affine (nibabel's ``get_best_affine``) and shape. Otherwise (e.g. the volume was resampled
after loading) the exporter falls back to the maps' affine in both slots.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

#: header fields that define the qform (with pixdim[0] = qfac and pixdim[1:4] = voxel sizes)
QFORM_FIELDS = ("qform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")
#: header fields that define the sform
SFORM_FIELDS = ("sform_code", "srow_x", "srow_y", "srow_z")
#: a field-built affine may differ from the maps' affine by float32 round-off only (mm)
XFORM_ATOL_MM = 1e-3


@dataclass(frozen=True)
class SourceXforms:
    """The qform/sform header fields of the source NIfTI (numpy values as nibabel stores them)."""

    fields: dict[str, np.ndarray]
    pixdim: np.ndarray  # (4,) float32: qfac, then the three voxel sizes (mm)

    @property
    def codes(self) -> tuple[int, int]:
        """(qform_code, sform_code)."""
        return int(self.fields["qform_code"]), int(self.fields["sform_code"])

    def apply(self, header: Any) -> None:
        """Write the fields into a ``nibabel.Nifti1Header`` in place (pixdim[0:4] included)."""
        for key, value in self.fields.items():
            header[key] = value
        pixdim = header["pixdim"].copy()
        pixdim[:4] = self.pixdim
        header["pixdim"] = pixdim


def _value(meta: Mapping[str, Any], key: str) -> np.ndarray | None:
    value = meta.get(key)
    if value is None:
        return None
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError):
        return None


def source_xforms(meta: Mapping[str, Any], affine: np.ndarray, shape: tuple[int, ...]) -> SourceXforms | None:
    """The source's qform/sform fields from a MetaTensor's ``meta``, if they describe this grid.

    Args:
        meta: meta dict of a volume loaded from NIfTI by :func:`medcam3d.io.load_volume` (MONAI's
            ``NibabelReader`` keeps every header field) or of maps derived from it.
        affine: (4, 4) voxel -> RAS-mm affine of the data about to be written.
        shape: its spatial shape (X, Y, Z).

    Returns:
        The fields, or None when ``meta`` holds no complete NIfTI transform (e.g. a DICOM source),
        a code outside ``nibabel.nifti1.xform_codes``, or fields whose affine or shape differ from
        ``affine``/``shape`` (the data no longer sits on the source grid).
    """
    import nibabel as nib

    values = {k: _value(meta, k) for k in (*QFORM_FIELDS, *SFORM_FIELDS, "pixdim", "dim")}
    if any(v is None for v in values.values()):
        return None
    codes = nib.nifti1.xform_codes.value_set()
    try:
        if int(values["qform_code"]) not in codes or int(values["sform_code"]) not in codes:
            return None
        dim = values["dim"].reshape(-1)
        pixdim = values["pixdim"].reshape(-1).astype(np.float32)
        if dim.size < 4 or pixdim.size < 4 or tuple(int(d) for d in dim[1:4]) != tuple(shape[:3]):
            return None
        hdr = nib.Nifti1Header()
        hdr.set_data_shape(tuple(int(s) for s in shape[:3]))
        fields = {k: np.asarray(values[k]).copy() for k in (*QFORM_FIELDS, *SFORM_FIELDS)}
        found = SourceXforms(fields=fields, pixdim=pixdim[:4].copy())
        found.apply(hdr)
        best = hdr.get_best_affine()
    except (TypeError, ValueError, IndexError, np.linalg.LinAlgError):
        return None
    if not np.allclose(best, np.asarray(affine, dtype=np.float64), rtol=0, atol=XFORM_ATOL_MM):
        return None
    return found

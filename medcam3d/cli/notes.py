"""What the command line tells the user about a case besides its maps: load notes (DICOM positions
fitted, files ignored), gantry-tilt reslicing, and evidence that lay outside the scan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: HU given to resliced CT voxels outside the scan (air)
RESLICE_FILL_HU = -1024.0


def load_notes(volume: Any) -> list[str]:
    """Notes the loader recorded in ``volume.meta['load_notes']`` (e.g. rounded DICOM positions)."""
    meta = getattr(volume, "meta", None)
    notes = meta.get("load_notes") if isinstance(meta, dict) else None
    return [str(n) for n in notes] if notes else []


def write_resliced_ct(volume: Any, case_dir: Path, case_id: str) -> tuple[Path, str] | None:
    """For a sheared (gantry-tilted) scan, write ``<case_id>_ct_resliced.nii.gz`` and say so.

    Returns ``(path, note)``, or None when the scan's voxel axes are orthogonal (nothing written).
    """
    from medcam3d.io.affine import ras_affine
    from medcam3d.io.export import save_volume_nifti
    from medcam3d.io.reslice import RESLICED_SUFFIX, is_sheared, reslice_orthogonal, shear_degrees

    affine = ras_affine(volume)
    if not is_sheared(affine):
        return None
    path = save_volume_nifti(
        reslice_orthogonal(volume, fill=RESLICE_FILL_HU),
        case_dir / f"{case_id}_ct{RESLICED_SUFFIX}.nii.gz",
        descrip="medcam3d CT resliced orthogonal",
        overwrite=True,
    )
    note = (
        f"scan sheared by {shear_degrees(affine):.2f} degrees (gantry tilt): maps on the scan's own grid are "
        "right in world space (nibabel, napari) but ITK-based viewers (3D Slicer, ITK-SNAP) cannot open that "
        f"grid, so orthogonal resliced copies were written too: {path.name} and *{RESLICED_SUFFIX}.nii.gz maps"
    )
    return path, note


def outside_scan_notes(case_id: str, rows: list[dict[str, Any]]) -> list[str]:
    """One line per explained class whose map had a noticeable share of its mass outside the scan."""
    from medcam3d.spatial.coverage import NOTICEABLE_OUTSIDE_FRACTION

    lines = []
    for r in rows:
        for name, f in zip(r.get("class_names") or [], r.get("outside_scan_fraction") or []):
            if f is not None and f >= NOTICEABLE_OUTSIDE_FRACTION:
                lines.append(
                    f"medcam3d: case {case_id} ({r['method']}): {100 * f:.0f}% of the positive map mass of "
                    f"{name!r} lies outside the scan on the model's grid (padding or beyond the field of "
                    "view); the saved maps cannot show it (manifest column outside_scan_fraction)."
                )
    return lines

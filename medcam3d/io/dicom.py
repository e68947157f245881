"""Read one CT series from a DICOM folder into a HU volume with a RAS affine.

Why our own reader and not MONAI's ``PydicomReader`` (MONAI 1.6.1)? That reader is fine for a clean
single-series folder, but it
- stacks every DICOM file in the folder, so two series in one folder silently become one volume;
- sorts slices by InstanceNumber, not by position along the slice normal;
- takes the slice step as the mean |dz| between neighbours, so a missing slice or uneven spacing gives
  a volume whose affine is silently wrong (it only warns on mismatched slice sizes);
- returns slices in descending-z order for the sample series (axcodes LPI), unlike dcm2niix/ITK.
Here slices are grouped by SeriesInstanceUID, sorted by ``IPP . (row x col)``, checked for gaps,
duplicates, uneven steps and mixed geometry, and the affine comes from ImagePositionPatient (never
from SliceThickness, which may differ from the step when slices overlap).

Array convention (same as ITK/SimpleITK and dcm2niix without reorientation):
``vol[i, j, k]`` = column ``i``, row ``j`` of slice ``k``, slices ascending along the normal.
The LPS affine has columns ``rowcos*PixelSpacing[1]``, ``colcos*PixelSpacing[0]``, the slice step
vector and origin ``IPP`` of the first slice; the RAS affine is ``diag(-1,-1,1,1) @ LPS``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medcam3d.errors import VolumeLoadError
from medcam3d.io.affine import LPS_TO_RAS


# Geometry tolerances. Positions: max(ABS_TOL_MM, REL_TOL * step). Directions: cosine components.
ABS_TOL_MM = 0.01
REL_TOL = 0.01
IOP_TOL = 1e-4

_INSTALL_HINT = "pip install pylibjpeg pylibjpeg-openjpeg (JPEG 2000) or pylibjpeg-libjpeg (JPEG)"


@dataclass
class _Slice:
    path: Path
    ds: Any  # pydicom Dataset, header only


def _pydicom():
    try:
        import pydicom
    except ImportError as e:  # pragma: no cover - pydicom is a hard dependency
        raise VolumeLoadError("Reading DICOM needs pydicom: pip install pydicom") from e
    return pydicom


def _scan_folder(folder: Path) -> tuple[list[_Slice], list[str]]:
    """Read the headers of every DICOM image file directly in ``folder`` (not recursive).

    Returns the image slices and a list of notes about entries that were skipped.
    """
    pydicom = _pydicom()
    entries = sorted(folder.iterdir())
    if not entries:
        raise VolumeLoadError(
            f"{folder} is an empty folder. Pass a folder holding the DICOM files of one series, "
            "or a .nii/.nii.gz file."
        )
    slices: list[_Slice] = []
    subdirs = [p.name for p in entries if p.is_dir()]
    unreadable: list[str] = []
    n_non_dicom = 0
    n_non_image = 0
    for p in entries:
        if not p.is_file():
            continue
        try:
            if not pydicom.misc.is_dicom(p):  # needs the DICM preamble (DICOM Part 10 files)
                n_non_dicom += 1
                continue
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception as e:  # unreadable/corrupt header: note it, keep going with the rest
            unreadable.append(f"{p.name} ({type(e).__name__}: {e})")
            continue
        if "Rows" not in ds or "Columns" not in ds:  # DICOMDIR, structured reports, RT structs...
            n_non_image += 1
            continue
        slices.append(_Slice(p, ds))
    if not slices:
        notes = [f"{n_non_dicom} non-DICOM file(s)"] if n_non_dicom else []
        if n_non_image:
            notes.append(f"{n_non_image} DICOM file(s) without an image")
        if unreadable:
            notes.append(f"unreadable: {', '.join(unreadable[:3])}")
        if subdirs:
            notes.append(f"subfolders {subdirs[:5]} (files in subfolders are not read; pass the series folder itself)")
        raise VolumeLoadError(
            f"No DICOM image files found in {folder} ({'; '.join(notes) or 'nothing usable'}). "
            "Pass a folder holding the DICOM files of one series, or a .nii/.nii.gz file."
        )
    return slices, unreadable


def _series_uid(ds: Any) -> str:
    return str(ds.get("SeriesInstanceUID", "") or "")


def _describe_series(groups: dict[str, list[_Slice]]) -> str:
    lines = []
    for uid, sl in groups.items():
        ds = sl[0].ds
        lines.append(
            f"  - series_uid={uid!r}: description={str(ds.get('SeriesDescription', '') or '')!r}, "
            f"modality={str(ds.get('Modality', '') or '?')}, {len(sl)} slice(s)"
        )
    return "\n".join(lines)


def _select_series(folder: Path, slices: list[_Slice], series_uid: str | None) -> tuple[str, list[_Slice]]:
    groups: dict[str, list[_Slice]] = {}
    for s in slices:
        groups.setdefault(_series_uid(s.ds), []).append(s)
    if series_uid is not None:
        if series_uid not in groups:
            raise VolumeLoadError(
                f"Series {series_uid!r} not found in {folder}. Series found:\n{_describe_series(groups)}"
            )
        return series_uid, groups[series_uid]
    if len(groups) > 1:
        raise VolumeLoadError(
            f"{folder} holds {len(groups)} DICOM series; pass series_uid=... to choose one. "
            f"Series found:\n{_describe_series(groups)}"
        )
    uid = next(iter(groups))
    return uid, groups[uid]


def _floats(ds: Any, keyword: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(keyword, None)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise VolumeLoadError(
            f"DICOM file {path} has a missing or invalid {keyword} ({value!r}); the slice geometry "
            "cannot be derived. Check the export or convert the series with dcm2niix."
        )
    return arr


def _check_series(folder: Path, sl: list[_Slice], allow_non_ct: bool) -> None:
    first = sl[0].ds
    modality = str(first.get("Modality", "") or "")
    if modality != "CT" and not allow_non_ct:
        raise VolumeLoadError(
            f"Series in {folder} has Modality {modality or '(missing)'!r}, not 'CT'. medcam3d expects CT "
            "in Hounsfield units; pass allow_non_ct=True to load it anyway (values then follow the "
            "modality's own rescale)."
        )
    for s in sl:
        frames = int(s.ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise VolumeLoadError(
                f"{s.path} is a multi-frame (enhanced) DICOM object with {frames} frames, which is not "
                "supported. Convert it to NIfTI (e.g. dcm2niix) and load the .nii.gz."
            )
        if int(s.ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise VolumeLoadError(f"{s.path} is not a greyscale image (SamplesPerPixel != 1); not a CT slice.")
    if len(sl) < 2:
        raise VolumeLoadError(
            f"Series in {folder} has a single slice ({sl[0].path.name}), i.e. a 2D image; a 3D CT volume "
            "needs the whole series. Put all slices of the series in the folder."
        )
    sizes: dict[tuple[int, int], str] = {}
    for s in sl:
        sizes.setdefault((int(s.ds.Rows), int(s.ds.Columns)), s.path.name)
    if len(sizes) > 1:
        desc = ", ".join(f"{r}x{c} (e.g. {name})" for (r, c), name in sizes.items())
        raise VolumeLoadError(
            f"Slices in {folder} have different sizes (rows x columns): {desc}. One series must share one "
            "grid; remove the odd files (scout/localiser images?) or pick another series."
        )


def _geometry(folder: Path, sl: list[_Slice]) -> tuple[list[_Slice], np.ndarray]:
    """Sort the slices along the normal, validate spacing, return (sorted slices, RAS affine)."""
    iop0 = _floats(sl[0].ds, "ImageOrientationPatient", 6, sl[0].path)
    ps0 = _floats(sl[0].ds, "PixelSpacing", 2, sl[0].path)
    for s in sl[1:]:
        iop = _floats(s.ds, "ImageOrientationPatient", 6, s.path)
        if not np.allclose(iop, iop0, atol=IOP_TOL):
            raise VolumeLoadError(
                f"Slices in {folder} have different orientations: ImageOrientationPatient {iop0.tolist()} "
                f"in {sl[0].path.name} but {iop.tolist()} in {s.path.name}. Remove the odd slices or pick "
                "one series (scout/localiser images mixed in?)."
            )
        ps = _floats(s.ds, "PixelSpacing", 2, s.path)
        if not np.allclose(ps, ps0, rtol=1e-4, atol=1e-6):
            raise VolumeLoadError(
                f"Slices in {folder} have different PixelSpacing: {ps0.tolist()} in {sl[0].path.name} but "
                f"{ps.tolist()} in {s.path.name}."
            )
    row_cos, col_cos = iop0[:3], iop0[3:]
    if abs(np.linalg.norm(row_cos) - 1) > 1e-3 or abs(np.linalg.norm(col_cos) - 1) > 1e-3 or abs(
        float(row_cos @ col_cos)
    ) > 1e-3:
        raise VolumeLoadError(
            f"ImageOrientationPatient {iop0.tolist()} in {sl[0].path.name} is not two orthogonal unit vectors."
        )
    normal = np.cross(row_cos, col_cos)
    ipp = {id(s): _floats(s.ds, "ImagePositionPatient", 3, s.path) for s in sl}
    sl = sorted(sl, key=lambda s: float(ipp[id(s)] @ normal))
    pos = np.stack([ipp[id(s)] for s in sl])  # (N, 3) LPS mm, ascending along the normal
    d = pos @ normal
    steps = np.diff(d)

    dup = np.flatnonzero(steps < ABS_TOL_MM)
    if dup.size:
        a, b = sl[dup[0]], sl[dup[0] + 1]
        raise VolumeLoadError(
            f"Slices {a.path.name} and {b.path.name} in {folder} lie at the same position "
            f"({d[dup[0]]:.3f} mm along the slice normal); {dup.size} duplicate position(s) in all. The folder "
            "may mix several acquisitions or reconstructions with one SeriesInstanceUID; keep one of them."
        )
    nominal = float(np.median(steps))
    tol = max(ABS_TOL_MM, REL_TOL * nominal)
    bad = np.flatnonzero(np.abs(steps - nominal) > tol)
    if bad.size:
        msgs = []
        for b in bad[:5]:
            ratio = steps[b] / nominal
            where = (
                f"between {sl[b].path.name} ({d[b]:.3f} mm) and {sl[b + 1].path.name} ({d[b + 1]:.3f} mm)"
            )
            if abs(ratio - round(ratio)) * nominal <= tol and round(ratio) >= 2:
                msgs.append(f"{round(ratio) - 1} missing slice(s) {where}: gap {steps[b]:.3f} mm")
            else:
                msgs.append(f"step {steps[b]:.3f} mm {where}")
        more = f" (and {bad.size - 5} more)" if bad.size > 5 else ""
        raise VolumeLoadError(
            f"Uneven slice spacing in {folder}: the usual step is {nominal:.3f} mm (from ImagePositionPatient), "
            f"but: {'; '.join(msgs)}{more}. Missing or extra slices would put the map on the wrong anatomy; "
            "restore the missing files, or resample the series to a regular grid and pass a NIfTI file."
        )
    n = len(sl)
    step_vec = (pos[-1] - pos[0]) / (n - 1)
    # every slice origin must lie on the line pos0 + k*step_vec (catches in-plane shifts between slices)
    dev = np.linalg.norm(pos - (pos[0] + np.arange(n)[:, None] * step_vec), axis=1)
    if dev.max() > tol:
        k = int(dev.argmax())
        raise VolumeLoadError(
            f"Slice origins in {folder} do not lie on a straight line: {sl[k].path.name} is off by "
            f"{dev[k]:.3f} mm. The series is not a regular 3D grid; resample it and pass a NIfTI file."
        )
    # step_vec may be oblique to the normal (gantry tilt): the affine is then sheared, as with ITK.
    lps = np.eye(4)
    lps[:3, 0] = row_cos * ps0[1]  # along a row = increasing column index i; PixelSpacing = [row, col] spacing
    lps[:3, 1] = col_cos * ps0[0]
    lps[:3, 2] = step_vec
    lps[:3, 3] = pos[0]
    return sl, LPS_TO_RAS @ lps


def _pixels_hu(s: _Slice, rows: int, cols: int) -> np.ndarray:
    pydicom = _pydicom()
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(s.path)
    except Exception as e:
        raise VolumeLoadError(f"Cannot read DICOM file {s.path}: {type(e).__name__}: {e}") from e
    try:
        arr = ds.pixel_array
    except Exception as e:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", str(ts)) if ts is not None else "unknown"
        raise VolumeLoadError(
            f"Cannot decode the pixel data of {s.path} (transfer syntax {ts_name}): {type(e).__name__}: {e}. "
            f"If a decoder is missing: {_INSTALL_HINT}."
        ) from e
    if arr.shape != (rows, cols):
        raise VolumeLoadError(
            f"Pixel data of {s.path} has shape {arr.shape}, expected ({rows}, {cols}) from Rows/Columns."
        )
    # RescaleSlope/Intercept (or a Modality LUT) give HU; they may differ per slice, so apply per slice.
    return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)


def read_dicom_series(
    folder: Path, series_uid: str | None = None, allow_non_ct: bool = False
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read one series from ``folder``.

    Returns ``(vol, affine_ras, meta)``: ``vol`` float32 indexed ``[column, row, slice]`` in the
    modality's rescaled units (HU for CT), the 4x4 RAS affine, and a small de-identified meta dict
    (SeriesInstanceUID, Modality, slice step and thickness; never patient tags).
    """
    slices, unreadable = _scan_folder(folder)
    if unreadable:  # may be slices of this series; a gap check catches inner ones, not end slices
        warnings.warn(
            f"Skipped {len(unreadable)} unreadable DICOM file(s) in {folder}: {'; '.join(unreadable[:3])}",
            stacklevel=3,
        )
    uid, sl = _select_series(folder, slices, series_uid)
    _check_series(folder, sl, allow_non_ct)
    sl, affine = _geometry(folder, sl)
    rows, cols = int(sl[0].ds.Rows), int(sl[0].ds.Columns)
    vol = np.empty((cols, rows, len(sl)), dtype=np.float32)
    for k, s in enumerate(sl):
        vol[:, :, k] = _pixels_hu(s, rows, cols).T
    meta: dict[str, Any] = {
        "SeriesInstanceUID": uid,
        "Modality": str(sl[0].ds.get("Modality", "") or ""),
        "slice_step_mm": float(np.linalg.norm(affine[:3, 2])),
        "n_slices": len(sl),
    }
    thickness = sl[0].ds.get("SliceThickness", None)
    try:
        meta["SliceThickness"] = float(thickness)
    except (TypeError, ValueError):
        pass
    return vol, affine, meta

"""Read one CT series from a DICOM folder into a HU volume with a RAS affine.

Why our own reader and not MONAI's ``PydicomReader`` (MONAI 1.6.1)? That reader is fine for a clean
single-series folder, but it
- stacks every DICOM file in the folder, so two series in one folder silently become one volume;
- sorts slices by InstanceNumber, not by position along the slice normal;
- takes the slice step as the mean |dz| between neighbours, so a missing slice or uneven spacing gives
  a volume whose affine is silently wrong (it only warns on mismatched slice sizes);
- returns slices in descending-z order for the sample series (axcodes LPI), unlike dcm2niix/ITK.
Here slices are grouped by SeriesInstanceUID, sorted by ``IPP . (row x col)``, checked for gaps,
duplicates, uneven steps and mixed geometry, and the affine comes from a least-squares line through
the ImagePositionPatient values (never from SliceThickness, which may differ from the step when
slices overlap), so positions rounded to 0.01 mm do not refuse a regular series. Files that look
like damaged slices of the series are refused by name, since a lost end slice leaves no gap.

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
REL_TOL = 0.01  # deviations above max(ABS_TOL_MM, REL_TOL * step) are noted in the volume's meta
FIT_REL_TOL = 0.03  # slice origins may lie this fraction of the step off the fitted line (rounding)
STEP_REL_TOL = 2 * FIT_REL_TOL  # single steps may differ this much from the median step
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


@dataclass
class _Leftover:
    """A file in the folder that did not give an image slice, and why."""

    path: Path
    kind: str  # "unreadable" (DICM marker, header unreadable) | "no-image" (DICOM, no pixels) | "not-dicom"
    detail: str = ""
    sop_class: str = ""  # SOPClassUID (or the file meta's MediaStorageSOPClassUID) of a "no-image" file


def _name_kind(name: str) -> str:
    """A file's extension when it is a word ("dcm", "txt"), else "" (no suffix, or UID-like digits)."""
    ext = name.rsplit(".", 1)[-1] if "." in name.lstrip(".") else ""
    return ext.lower() if ext.isalpha() and len(ext) <= 5 else ""


def _is_text(p: Path) -> bool:
    """Plain UTF-8 text with no NUL byte in its first 4 KiB (README, notes), never a DICOM preamble."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(4096)
        if not head or b"\x00" in head:
            return False
        head.decode("utf-8")
        return True
    except (OSError, UnicodeDecodeError):
        return False


def _sop_class(ds: Any) -> str:
    uid = ds.get("SOPClassUID", None) or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    return str(uid or "")


def _scan_folder(folder: Path) -> tuple[list[_Slice], list[_Leftover]]:
    """Read the headers of every DICOM image file directly in ``folder`` (not recursive).

    Returns the image slices and the other files (judged later by :func:`_check_leftovers`).
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
    others: list[_Leftover] = []
    for p in entries:
        if not p.is_file():
            continue
        try:
            if not pydicom.misc.is_dicom(p):  # needs the DICM preamble (DICOM Part 10 files)
                others.append(_Leftover(p, "not-dicom"))
                continue
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception as e:  # unreadable/corrupt header
            others.append(_Leftover(p, "unreadable", f"{type(e).__name__}: {e}"))
            continue
        if "Rows" not in ds or "Columns" not in ds:  # DICOMDIR, structured reports... or a truncated slice
            others.append(_Leftover(p, "no-image", sop_class=_sop_class(ds)))
            continue
        slices.append(_Slice(p, ds))
    if not slices:
        n_non_dicom = sum(o.kind == "not-dicom" for o in others)
        n_non_image = sum(o.kind == "no-image" for o in others)
        unreadable = [f"{o.path.name} ({o.detail})" for o in others if o.kind == "unreadable"]
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
    return slices, others


def _check_leftovers(folder: Path, sl: list[_Slice], others: list[_Leftover]) -> list[str]:
    """Refuse files that look like damaged slices of the series; return notes on ignored files.

    A slice lost from the END of a series leaves no gap in the positions, so it must be caught here:
    - a DICOM Part-10 file (DICM marker) whose header cannot be read, or that has no image although
      its SOP class is that of the series' slices (or is missing): a truncated or damaged slice;
    - a file without the DICM marker that is named like the slices (same extension, or none) and is
      not plain text: a slice truncated before its marker (e.g. to 100 bytes) or not DICOM at all.
    Ignored (listed in the returned notes): hidden files, plain-text files, files with another
    extension than the slices (README.txt, a .nii.gz), and DICOM files of other SOP classes
    (DICOMDIR, reports, RT structures).
    """
    kinds = {_name_kind(s.path.name) for s in sl}
    classes = {_sop_class(s.ds) for s in sl}
    damaged: list[str] = []
    ignored: list[str] = []
    for o in others:
        if o.kind == "unreadable":
            damaged.append(f"{o.path.name}: has the DICOM marker but its header cannot be read ({o.detail})")
        elif o.kind == "no-image":
            if not o.sop_class or o.sop_class in classes:
                damaged.append(
                    f"{o.path.name}: a DICOM file of the series' type "
                    f"({o.sop_class or 'SOP class missing'}) without image data (truncated?)"
                )
            else:
                ignored.append(f"{o.path.name} (DICOM {o.sop_class}, no image)")
        elif o.path.name.startswith(".") or _is_text(o.path) or _name_kind(o.path.name) not in kinds:
            ignored.append(o.path.name)
        else:
            size = o.path.stat().st_size
            damaged.append(
                f"{o.path.name}: named like the slices but not a readable DICOM file ({size} bytes, no "
                "DICM marker; truncated?)"
            )
    if damaged:
        raise VolumeLoadError(
            f"{len(damaged)} file(s) in {folder} look like slices of the series but cannot be read: "
            f"{'; '.join(damaged[:5])}{' ...' if len(damaged) > 5 else ''}. Loading the rest would silently "
            "drop slices (a lost end slice leaves no gap). Restore the file(s) from the source (copy or "
            "export again), or move them out of the folder if they do not belong to the series."
        )
    return [f"ignored {len(ignored)} file(s) that are not slices of the series: {', '.join(ignored[:5])}"] if ignored else []


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


def _geometry(folder: Path, sl: list[_Slice], notes: list[str]) -> tuple[list[_Slice], np.ndarray]:
    """Sort the slices along the normal, validate spacing, return (sorted slices, RAS affine).

    Spacing: steps along the normal may differ from their median by ``STEP_REL_TOL`` of it (a larger
    step is a gap: refused, naming the missing slices); the slice origins are then fitted by a
    least-squares line (index -> LPS mm), which gives the affine's step and origin, and every origin
    must lie within ``FIT_REL_TOL`` of the step from that line (rounded positions do; an in-plane
    jump does not). Deviations above the old exact-grid tolerance are appended to ``notes``.
    """
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
    tol = max(ABS_TOL_MM, STEP_REL_TOL * nominal)
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
    # Least-squares line through the slice origins, pos_k = origin + k * step_vec (each coordinate):
    # positions written with few decimals (0.62/0.63 mm steps for 0.625 mm slices) scatter around it;
    # the fitted step and origin average that rounding out instead of trusting two slices.
    design = np.stack([np.ones(n), np.arange(n, dtype=np.float64)], axis=1)
    (origin, step_vec), *_ = np.linalg.lstsq(design, pos, rcond=None)
    dev = np.linalg.norm(pos - (origin + np.arange(n)[:, None] * step_vec), axis=1)
    fit_tol = max(ABS_TOL_MM, FIT_REL_TOL * nominal)
    if dev.max() > fit_tol:
        k = int(dev.argmax())
        raise VolumeLoadError(
            f"Slice origins in {folder} do not lie on a straight line: {sl[k].path.name} is off by "
            f"{dev[k]:.3f} mm ({100 * dev[k] / nominal:.1f} % of the {nominal:.3f} mm step; up to "
            f"{100 * FIT_REL_TOL:.0f} % is taken as rounding). The series is not a regular 3D grid; resample "
            "it and pass a NIfTI file."
        )
    if dev.max() > max(ABS_TOL_MM, REL_TOL * nominal):
        k = int(dev.argmax())
        notes.append(
            f"slice positions deviate from a straight line by up to {dev[k]:.3f} mm ({sl[k].path.name}, "
            f"{100 * dev[k] / nominal:.1f} % of the step): the least-squares step "
            f"{float(np.linalg.norm(step_vec)):.4f} mm and origin are used"
        )
    # step_vec may be oblique to the normal (gantry tilt): the affine is then sheared, as with ITK.
    lps = np.eye(4)
    lps[:3, 0] = row_cos * ps0[1]  # along a row = increasing column index i; PixelSpacing = [row, col] spacing
    lps[:3, 1] = col_cos * ps0[0]
    lps[:3, 2] = step_vec
    lps[:3, 3] = origin
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
    (SeriesInstanceUID, Modality, slice step and thickness, ``load_notes``: ignored files and fitted
    slice positions, each also issued as a ``UserWarning``; never patient tags).

    Raises:
        VolumeLoadError: a damaged file that looks like a slice (see :func:`_check_leftovers`), several
            series without ``series_uid``, gaps, steps or slice origins off a straight line beyond
            rounding (see :func:`_geometry`), mixed geometry, undecodable pixels.
    """
    slices, others = _scan_folder(folder)
    uid, sl = _select_series(folder, slices, series_uid)
    notes = _check_leftovers(folder, sl, others)
    _check_series(folder, sl, allow_non_ct)
    sl, affine = _geometry(folder, sl, notes)
    for note in notes:
        warnings.warn(f"{folder}: {note}", stacklevel=3)
    rows, cols = int(sl[0].ds.Rows), int(sl[0].ds.Columns)
    vol = np.empty((cols, rows, len(sl)), dtype=np.float32)
    for k, s in enumerate(sl):
        vol[:, :, k] = _pixels_hu(s, rows, cols).T
    meta: dict[str, Any] = {
        "SeriesInstanceUID": uid,
        "Modality": str(sl[0].ds.get("Modality", "") or ""),
        "slice_step_mm": float(np.linalg.norm(affine[:3, 2])),
        "n_slices": len(sl),
        "load_notes": list(notes),
    }
    thickness = sl[0].ds.get("SliceThickness", None)
    try:
        meta["SliceThickness"] = float(thickness)
    except (TypeError, ValueError):
        pass
    return vol, affine, meta

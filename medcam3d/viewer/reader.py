"""npe2 reader: NIfTI files and DICOM series folders as CT layers; medcam3d map files as heat layers.

A map written by :func:`medcam3d.save_nifti` is recognised by its header ``descrip`` (starts with
"medcam3d"); its JSON comment extension gives the class, method and target layer (a 4D file holds
all classes along axis 3). Everything else goes through :func:`medcam3d.load_volume` (HU, RAS affine).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medcam3d.errors import VolumeLoadError
from medcam3d.viewer.layers import LayerData, ct_layer_data, heat_layer_data

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAP_MARK = b"medcam3d"
_DICOM_PROBE = 20  # files looked at to decide whether a folder holds DICOM


def _is_dicom_folder(folder: Path) -> bool:
    try:
        import pydicom
    except ImportError:  # pragma: no cover
        return False
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return False
    for entry in [e for e in entries if e.is_file()][:_DICOM_PROBE]:
        try:
            if pydicom.misc.is_dicom(entry):
                return True
        except OSError:
            continue
    return False


def _readable(path: Any) -> bool:
    if not isinstance(path, (str, os.PathLike)):
        return False
    p = Path(path)
    if p.is_dir():
        return _is_dicom_folder(p)
    return p.name.lower().endswith(NIFTI_SUFFIXES) and p.is_file()


def get_reader(path: str | Sequence[str]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 reader hook: a reader for NIfTI files / DICOM folders (or a list of them), else None."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(_readable(p) for p in paths):
        return None
    return read


def read(path: str | Sequence[str]) -> list[LayerData]:
    """Layer data for each path: a CT image layer, or heat layer(s) for a medcam3d map file."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    out: list[LayerData] = []
    for p in paths:
        out.extend(read_one(Path(p)))
    return out


def read_one(path: Path) -> list[LayerData]:
    """Layer data for one NIfTI file or DICOM folder."""
    if path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES):
        header = _nifti_header(path)
        if header is not None and bytes(header["descrip"]).startswith(MAP_MARK):
            return read_map(path)
    from medcam3d.io import load_volume

    return [ct_layer_data(load_volume(path))]


def _nifti_header(path: Path) -> Any:
    import nibabel as nib

    try:
        return nib.load(str(path)).header
    except Exception:
        return None  # let load_volume report the problem with its own message


def _extension(img: Any) -> dict[str, Any]:
    for ext in img.header.extensions:
        try:
            blob = json.loads(ext.get_content())
        except (ValueError, TypeError, UnicodeDecodeError):
            continue
        if isinstance(blob, dict) and blob.get("generator") == "medcam3d":
            return blob
    return {}


def _from_descrip(descrip: str) -> dict[str, str]:
    """Fallback when the JSON extension is missing: 'medcam3d {method} class={name} layer={layer}'."""
    parts = descrip.split()
    info = {"method": parts[1] if len(parts) > 1 else "map"}
    for part in parts[2:]:
        key, _, value = part.partition("=")
        if key in ("class", "layer") and value:
            info[key] = value
    return info


def read_map(path: Path, *, colormap: str = "inferno", opacity: float = 0.6, threshold: float = 0.2) -> list[LayerData]:
    """Heat layer data for a map NIfTI written by medcam3d (3D: one class; 4D: classes on axis 3)."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as e:
        raise VolumeLoadError(f"{path} is a medcam3d map but could not be read ({type(e).__name__}: {e}).") from e
    ext = _extension(img)
    descrip = bytes(img.header["descrip"]).decode("ascii", "replace").rstrip("\x00")
    fallback = _from_descrip(descrip)
    method = str(ext.get("method") or fallback["method"])
    layer = str(ext.get("target_layer") or fallback.get("layer", ""))
    if data.ndim == 4:
        maps = np.moveaxis(data, int(ext.get("class_axis", 3)), 0)
        classes = list(ext.get("classes") or [])
        if len(classes) != maps.shape[0]:
            classes = [{"name": f"class_{i}", "index": i} for i in range(maps.shape[0])]
    elif data.ndim == 3:
        maps = data[None]
        cls = ext.get("class") or {"name": fallback.get("class", path.name.split(".")[0]), "index": None}
        classes = [cls]
    else:
        raise VolumeLoadError(f"{path}: a medcam3d map must be 3D or 4D, got shape {data.shape}.")
    header = img.header
    meta = {
        "space": "RAS",
        "qform_code": int(header["qform_code"]),
        "sform_code": int(header["sform_code"]),
        "filename_or_obj": str(path),
    }
    return heat_layer_data(
        maps, np.asarray(img.affine, dtype=np.float64), meta, classes,
        method=method, target_layer=layer, colormap=colormap, opacity=opacity, threshold=threshold,
    )  # fmt: skip

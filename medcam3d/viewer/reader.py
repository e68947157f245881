"""npe2 reader: NIfTI files and DICOM series folders as CT layers; medcam3d map files as heat layers.

A map written by :func:`medcam3d.save_nifti` is recognised by its header ``descrip`` (starts with
"medcam3d"); its JSON comment extension gives the class, method and target layer (a 4D file holds
all classes along axis 3). Everything else goes through :func:`medcam3d.load_volume` (HU, RAS affine);
a label image (:mod:`medcam3d.io.labels`) becomes an outlined labels layer, not a CT.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medcam3d.filenames import NIFTI_SUFFIXES, nifti_stem
from medcam3d.io.maps import MAP_MARK
from medcam3d.viewer.layers import LayerData, ct_layer_data, heat_layer_data, mask_layer_data

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
    from medcam3d.viewer.present import present_when_added

    present_when_added(len(out))  # axial, radiological, fitted once napari has added them
    return out


def read_one(path: Path) -> list[LayerData]:
    """Layer data for one NIfTI file or DICOM folder."""
    if path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES):
        header = _nifti_header(path)
        if header is not None and bytes(header["descrip"]).startswith(MAP_MARK):
            return read_map(path)
    from medcam3d.io import load_volume

    volume = load_volume(path)
    from medcam3d.io.labels import label_values

    if label_values(volume) is not None:  # a mask / segmentation: outlined labels, not a CT
        return [mask_layer_data(volume, nifti_stem(path), volume)]
    return [ct_layer_data(volume)]


def _nifti_header(path: Path) -> Any:
    import nibabel as nib

    try:
        return nib.load(str(path)).header
    except Exception:
        return None  # let load_volume report the problem with its own message


def read_map(path: Path, *, colormap: str = "inferno", opacity: float = 0.6, threshold: float = 0.2) -> list[LayerData]:
    """Heat layer data for a map NIfTI written by medcam3d (3D: one class; 4D: classes on axis 3)."""
    from medcam3d.io.maps import read_map_file

    f = read_map_file(path)
    return heat_layer_data(
        f.maps, f.affine, f.meta, f.classes,
        method=f.method, target_layer=f.target_layer, colormap=colormap, opacity=opacity, threshold=threshold,
    )  # fmt: skip

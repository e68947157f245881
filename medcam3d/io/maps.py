"""Read maps written by :func:`medcam3d.save_nifti` back as an :class:`~medcam3d.spatial.Explanation`.

A medcam3d map file is recognised by its header ``descrip`` (starts with "medcam3d"); its JSON
comment extension gives the class (name, index, logit, probability, evidence flag), method and
target layer; a 4D file holds all classes along axis 3. The affine is the file's (RAS, nibabel),
which ``save_nifti`` wrote from the scan, so the maps land on the scan's grid again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medcam3d.errors import VolumeLoadError
from medcam3d.filenames import NIFTI_SUFFIXES

MAP_MARK = b"medcam3d"


@dataclass
class MapFile:
    """One map file: ``maps`` (K, X, Y, Z) float32, its RAS ``affine`` (4x4 float64), header codes,
    per-class records (dicts with at least "name"), ``method`` and ``target_layer``."""

    path: Path
    maps: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any]
    classes: list[dict[str, Any]]
    method: str
    target_layer: str


def is_map_file(path: str | os.PathLike[str]) -> bool:
    """True for a NIfTI whose header ``descrip`` marks it as written by medcam3d."""
    import nibabel as nib

    p = Path(path)
    if not (p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES)):
        return False
    try:
        return bytes(nib.load(str(p)).header["descrip"]).startswith(MAP_MARK)
    except Exception:
        return False


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
    """Fallback when the JSON extension is missing: 'medcam3d {method} class={name} ... layer={layer}'."""
    parts = descrip.split()
    info = {"method": parts[1] if len(parts) > 1 else "map"}
    for part in parts[2:]:
        key, _, value = part.partition("=")
        if key in ("class", "layer") and value:
            info[key] = value
    return info


def read_map_file(path: str | os.PathLike[str]) -> MapFile:
    """Read one medcam3d map NIfTI (3D: one class; 4D: classes on axis 3).

    Raises:
        VolumeLoadError: unreadable, not written by medcam3d, or not 3D/4D.
    """
    import nibabel as nib

    p = Path(path)
    try:
        img = nib.load(str(p))
        descrip = bytes(img.header["descrip"]).decode("ascii", "replace").rstrip("\x00")
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as e:
        raise VolumeLoadError(f"{p}: cannot read it as a NIfTI map ({type(e).__name__}: {e}).") from e
    if not descrip.startswith(MAP_MARK.decode()):
        raise VolumeLoadError(f"{p} is not a medcam3d map (its header description is {descrip!r}); "
                              "open scans with medcam3d.load_volume.")
    ext = _extension(img)
    fallback = _from_descrip(descrip)
    if data.ndim == 4:
        maps = np.moveaxis(data, int(ext.get("class_axis", 3)), 0)
        classes = list(ext.get("classes") or [])
        if len(classes) != maps.shape[0]:
            classes = [{"name": f"class_{i}", "index": i} for i in range(maps.shape[0])]
    elif data.ndim == 3:
        maps = data[None]
        classes = [ext.get("class") or {"name": fallback.get("class", p.name.split(".")[0]), "index": None}]
    else:
        raise VolumeLoadError(f"{p}: a medcam3d map must be 3D or 4D, got shape {data.shape}.")
    header = img.header
    meta = {"space": "RAS", "qform_code": int(header["qform_code"]), "sform_code": int(header["sform_code"]),
            "filename_or_obj": str(p)}
    return MapFile(p, np.ascontiguousarray(maps), np.asarray(img.affine, dtype=np.float64), meta, classes,
                   str(ext.get("method") or fallback["method"]),
                   str(ext.get("target_layer") or fallback.get("layer", "")))


def _map_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if is_map_file(p)]


def load_explanation(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                     method: str | None = None) -> Any:
    """Saved maps back as an :class:`~medcam3d.spatial.Explanation` on the scan's grid.

    Args:
        path: one map file (3D or 4D) written by :func:`medcam3d.save_nifti`, or a folder of them
            (e.g. ``OUTPUT/<case_id>/`` of ``medcam3d explain``): its per-class 3D files of one method
            are stacked in class order (4D all-class files are used only when there is no 3D one); or a
            list of map files of one scan, stacked in the order given.
        method: which method's files to take from a folder holding several ("hirescam", "gradcam").

    Returns:
        Explanation with ``maps`` (K, X, Y, Z) MetaTensor (the files' affine), ``class_names``,
        ``logits``/``probabilities`` (NaN where the file does not say), ``method``, ``target_layer``;
        ``raw`` is empty (the feature-resolution maps are not saved).

    Raises:
        VolumeLoadError: no map files, several methods without ``method``, maps on different grids,
            or a file that is not a medcam3d map.
    """
    if not isinstance(path, (str, os.PathLike)):
        chosen = [read_map_file(Path(f).expanduser()) for f in path]
        if not chosen:
            raise VolumeLoadError("load_explanation: an empty list of map files was given.")
        return _explanation(chosen)
    p = Path(path).expanduser()
    if p.is_dir():
        files = [read_map_file(f) for f in _map_files(p)]
        if not files:
            raise VolumeLoadError(f"{p} holds no medcam3d map files (NIfTI written by save_nifti or explain).")
        methods = sorted({f.method for f in files})
        if method is None and len(methods) > 1:
            raise VolumeLoadError(f"{p} holds maps of several methods ({', '.join(methods)}); pass method=.")
        chosen = [f for f in files if f.method == (method or methods[0])]
        if not chosen:
            raise VolumeLoadError(f"{p} holds no {method!r} maps (found: {', '.join(methods)}).")
        three_d = [f for f in chosen if len(f.classes) == 1 and f.maps.shape[0] == 1]
        chosen = sorted(three_d, key=lambda f: (f.classes[0].get("index") is None,
                                                f.classes[0].get("index") or 0, f.path.name)) or chosen[:1]
    elif p.is_file():
        chosen = [read_map_file(p)]
    else:
        raise VolumeLoadError(f"no such map file or folder: {p}")
    return _explanation(chosen)


def _explanation(chosen: list[MapFile]) -> Any:
    import torch
    from monai.data import MetaTensor

    from medcam3d.spatial import Explanation

    first = chosen[0]
    for f in chosen[1:]:
        if f.maps.shape[1:] != first.maps.shape[1:] or not np.allclose(f.affine, first.affine, atol=1e-3):
            raise VolumeLoadError(f"{f.path} is on another grid than {first.path}; load them separately.")
    maps = np.concatenate([f.maps for f in chosen], axis=0)
    classes = [c for f in chosen for c in f.classes]

    def values(key: str) -> torch.Tensor:
        return torch.tensor([np.nan if c.get(key) is None else float(c[key]) for c in classes],
                            dtype=torch.float32)

    return Explanation(
        maps=MetaTensor(torch.from_numpy(maps), affine=torch.as_tensor(first.affine), meta=dict(first.meta)),
        logits=values("logit"),
        probabilities=values("probability"),
        class_idx=torch.tensor([-1 if c.get("index") is None else int(c["index"]) for c in classes]),
        class_names=[str(c.get("name", f"class_{i}")) for i, c in enumerate(classes)],
        method=first.method,
        target_layer=first.target_layer,
        raw=torch.empty(0),
        extra={"files": [str(f.path) for f in chosen],
               "flags": [c.get("flag") for c in classes]},
    )

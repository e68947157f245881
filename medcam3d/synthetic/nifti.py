"""Write a synthetic case as NIfTI files (CT as int16 HU, one uint8 mask per class, labels as JSON).

Files are written to temporary names first and renamed only when all of them succeeded, so a failure
leaves no partial set behind; existing files are never overwritten unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from medcam3d.errors import ExportError, InputError
from medcam3d.synthetic.phantom import CLASS_NAMES, SyntheticCase


def _nifti(data: np.ndarray, affine: np.ndarray, descrip: str) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)  # scanner coordinates
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = descrip[:79].encode()
    return img


def write_case_nifti(case: SyntheticCase, out_dir: str | os.PathLike[str], stem: str,
                     overwrite: bool = False) -> dict[str, Path]:
    """Write ``{stem}_ct.nii.gz``, ``{stem}_{class}.nii.gz`` per class and ``{stem}_labels.json``.

    Returns a dict with keys "ct", each class name and "labels", mapping to the written paths.
    Raises InputError for a bad case/stem and ExportError when a target exists or cannot be written.
    """
    if not isinstance(case, SyntheticCase):
        raise InputError(f"case must be a SyntheticCase (from make_chest_ct), got {type(case).__name__}")
    if not isinstance(stem, str) or not stem or stem in (".", "..") or any(c in stem for c in "/\\\0"):
        raise InputError(f"stem must be a plain file-name prefix without path separators, got {stem!r}")
    out = Path(out_dir)
    targets = {"ct": out / f"{stem}_ct.nii.gz"}
    targets.update({c: out / f"{stem}_{c}.nii.gz" for c in CLASS_NAMES})
    targets["labels"] = out / f"{stem}_labels.json"
    if not overwrite:
        existing = [str(p) for p in targets.values() if p.exists()]
        if existing:
            raise ExportError(f"refusing to overwrite existing files {existing}; pass overwrite=True "
                              "or choose another stem/out_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create output folder {out}: {exc}") from exc

    ct = np.clip(np.rint(case.volume), -32768, 32767).astype(np.int16)
    desc = f"medcam3d synthetic chest CT seed={case.seed}"
    images = {"ct": _nifti(ct, case.affine, desc)}
    images.update({c: _nifti(np.asarray(case.masks[c], dtype=np.uint8), case.affine, f"{desc} mask={c}")
                   for c in CLASS_NAMES})
    tmp: dict[str, Path] = {}
    try:
        for key, img in images.items():
            tmp[key] = targets[key].with_name(f".tmp-{os.getpid()}-{targets[key].name}")
            nib.save(img, tmp[key])
        tmp["labels"] = targets["labels"].with_name(f".tmp-{os.getpid()}-{targets['labels'].name}")
        tmp["labels"].write_text(json.dumps({"seed": case.seed, "labels": case.labels,
                                             "classes": list(CLASS_NAMES)}, indent=2))
        for key, path in tmp.items():
            os.replace(path, targets[key])
    except OSError as exc:
        raise ExportError(f"could not write synthetic case to {out}: {exc}") from exc
    finally:
        for path in tmp.values():
            if path.exists():
                path.unlink()
    return targets

"""Folder inputs: keep label images (masks, segmentations) out of the scans, pair them by name.

Naming rule (documented in README): in a folder given to ``--input``, a NIfTI that is a label image
(:mod:`medcam3d.io.labels`: only non-negative integers, at most 128 distinct values) is never a case.
A label file named ``<prefix>_<anything>.nii[.gz]`` becomes the mask of the one scan in the same
folder named ``<prefix>.nii[.gz]`` or ``<prefix>_<anything>.nii[.gz]`` (e.g. ``lung1_tumor.nii.gz``
-> ``lung1_ct.nii.gz``). When no scan, or more than one, matches the prefix, or several label files
match one scan, the label file is skipped with a message; give masks explicitly with a CSV ``mask``
column then.
"""

from __future__ import annotations

from pathlib import Path

from medcam3d.filenames import nifti_stem as _stem


def _is_label(path: Path) -> list[int] | None:
    from medcam3d.io.labels import nifti_is_label

    try:
        values = nifti_is_label(path)
    except Exception:  # unreadable: let load_volume report it as that case's error
        return None
    return None if values is None else [int(v) for v in values[:8]]


def pair_folder(files: list[Path]) -> tuple[list[tuple[Path, Path | None]], list[str]]:
    """Split a folder's entries into (scan, mask or None) pairs and messages about skipped labels.

    Args:
        files: the folder's candidate inputs (NIfTI files and DICOM subfolders), sorted.

    Returns:
        ``(pairs, messages)``: the scans in the given order with their paired mask, and one
        message per label image that is not explained.
    """
    labels: dict[Path, list[int]] = {}
    for p in files:
        if p.is_file():
            vals = _is_label(p)
            if vals is not None:
                labels[p] = vals
    scans = [p for p in files if p not in labels]
    messages: list[str] = []
    claims: dict[Path, list[Path]] = {}
    for lab in labels:
        stem = _stem(lab)
        prefix = stem.rsplit("_", 1)[0] if "_" in stem else None
        matches = [] if prefix is None else [
            s for s in scans if _stem(s) == prefix or _stem(s).startswith(prefix + "_")]
        if len(matches) == 1:
            claims.setdefault(matches[0], []).append(lab)
        else:
            why = "no scan" if not matches else f"{len(matches)} scans"
            messages.append(
                f"skipped {lab.name}: a label image (values {_values(labels[lab])}), not a CT; "
                f"{why} in its folder match the naming rule <prefix>_<label> -> <prefix>[_*]; "
                "give it as a mask with a CSV 'mask' column")
    masks: dict[Path, Path] = {}
    for scan, labs in claims.items():
        if len(labs) == 1:
            masks[scan] = labs[0]
            messages.append(f"paired mask {labs[0].name} with scan {scan.name}")
        else:
            names = ", ".join(p.name for p in labs)
            messages.append(f"skipped {names}: label images that all name {scan.name}; one mask per "
                            "scan can be paired by name, give the one to score with a CSV 'mask' column")
    return [(s, masks.get(s)) for s in scans], messages


def _values(values: list[int]) -> str:
    return ", ".join(map(str, values[:6])) + (", ..." if len(values) > 6 else "")

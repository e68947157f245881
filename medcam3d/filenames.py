"""NIfTI file-name conventions shared by the readers, the writers, the command line and the viewer.

Plain strings only (no numpy, torch or MONAI), so the CLI can use them before anything heavy is
imported.
"""

from __future__ import annotations

import os
from pathlib import Path

#: File names that are NIfTI images (compared in lower case).
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def nifti_stem(path: str | os.PathLike[str]) -> str:
    """The file name of ``path`` without its ``.nii``/``.nii.gz`` suffix (any case); the name as it
    is otherwise (e.g. a DICOM series folder)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name

"""NIfTI + DICOM in, NIfTI out: files, affines and headers (no autograd, no viewer).

Public API: :func:`load_volume` and :func:`save_nifti`.
"""

from .export import save_nifti
from .load import load_volume

__all__ = ["load_volume", "save_nifti"]

"""NIfTI + DICOM in, NIfTI out: files, affines and headers (no autograd, no viewer).

Public API: :func:`load_volume` and :func:`save_nifti`; :func:`save_volume_nifti` (one volume) and
:func:`reslice_orthogonal` (an ITK-openable orthogonal copy of a gantry-tilted, sheared grid).
"""

from .export import save_nifti, save_volume_nifti
from .load import load_volume
from .reslice import reslice_orthogonal

__all__ = ["load_volume", "reslice_orthogonal", "save_nifti", "save_volume_nifti"]

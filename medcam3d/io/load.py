"""Load a CT scan (NIfTI file or DICOM series folder) as a channel-first MetaTensor in HU.

Both paths give the same conventions, those of MONAI's ``LoadImage(ensure_channel_first=True)``:
shape ``(1, X, Y, Z)``, float32, ``.affine`` = 4x4 RAS world affine (mm), meta keys ``affine``,
``original_affine``, ``spatial_shape``, ``space`` (= RAS), ``filename_or_obj``. The grid is the file's
own grid (no reorientation, no resampling), so maps mapped back onto it line up with the scan in any
viewer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medcam3d.errors import VolumeLoadError
from medcam3d.filenames import NIFTI_SUFFIXES

from .dicom import read_dicom_series

# free-text NIfTI header fields that may carry anything (converters sometimes put names there)
_DROP_NIFTI_KEYS = ("descrip", "aux_file", "intent_name", "db_name", "data_type", "magic")


def load_volume(
    path: str | os.PathLike[str], series_uid: str | None = None, *, allow_non_ct: bool = False
) -> Any:
    """Load one 3D CT volume as a ``monai.data.MetaTensor`` of shape ``(1, X, Y, Z)``, float32 HU.

    Args:
        path: a ``.nii``/``.nii.gz`` file, or a folder holding the DICOM files of a series (with or
            without ``.dcm`` suffix; subfolders are not searched). Foreign files (plain text,
            another extension, hidden, DICOM without image of another SOP class) are ignored and
            listed in ``meta['load_notes']``; a file that looks like a damaged slice is an error.
        series_uid: SeriesInstanceUID to pick when the folder holds several series.
        allow_non_ct: DICOM only: accept a Modality other than CT (values are then not HU).

    Returns:
        MetaTensor whose ``.affine`` is the RAS affine of the file's own voxel grid (as MONAI's
        ``LoadImage`` gives). NIfTI meta keeps the header's numeric fields (incl. ``qform_code`` and
        ``sform_code``) as in the file; DICOM meta keeps ``SeriesInstanceUID``, ``Modality``, slice
        step/thickness and ``load_notes`` (ignored files, fitted slice positions), never patient
        identifiers.

    Raises:
        VolumeLoadError: missing path, unreadable/truncated file (a truncated DICOM slice too, named),
            not 3D, non-finite voxels, several DICOM series without ``series_uid``, missing slices or
            uneven spacing beyond rounding, non-CT modality...
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise VolumeLoadError(
            f"No such file or folder: {str(p)!r}. Pass an existing .nii/.nii.gz file or DICOM series folder."
        )
    p = Path(os.path.abspath(p))
    if p.is_dir():
        return _load_dicom(p, series_uid, allow_non_ct)
    if p.name.lower().endswith(NIFTI_SUFFIXES):
        return _load_nifti(p)
    if _is_dicom_file(p):
        raise VolumeLoadError(
            f"{p} is a single DICOM file (one 2D slice). Pass the folder that holds the whole series."
        )
    raise VolumeLoadError(
        f"Unsupported input {p}: expected a .nii or .nii.gz file, or a folder of DICOM files."
    )


def _is_dicom_file(p: Path) -> bool:
    try:
        import pydicom

        return bool(pydicom.misc.is_dicom(p))
    except Exception:
        return False


def _check_finite(arr: torch.Tensor | np.ndarray, where: Path) -> None:
    t = torch.as_tensor(arr)
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        n_nan = int(torch.isnan(t).sum())
        raise VolumeLoadError(
            f"{where} holds {bad.shape[0]} non-finite voxel(s) ({n_nan} NaN, {bad.shape[0] - n_nan} inf), "
            f"first at index {tuple(int(v) for v in bad[0][-3:])}. A CT volume in HU must be finite; "
            "fix the conversion that produced the file or replace them (e.g. by -1024)."
        )


#: DEFLATE cannot compress better than 1032:1 (one 258-byte match costs at least 2 bits), so a
#: .nii.gz whose header claims more bytes than that times the file size cannot hold them.
_MAX_DEFLATE_RATIO = 1032


def _check_claimed_size(p: Path, img: Any) -> None:
    """Refuse a single-file NIfTI whose header claims more voxel bytes than the file can hold,
    before any voxel is read (a 83-byte .nii.gz claiming 2000^3 int16 would allocate 16 GB)."""
    name = p.name.lower()
    if not name.endswith(NIFTI_SUFFIXES):
        return
    claimed = int(img.header.get_data_offset()) + int(np.prod(img.shape, dtype=np.float64)) * int(
        img.get_data_dtype().itemsize
    )
    size = p.stat().st_size
    limit = size * _MAX_DEFLATE_RATIO if name.endswith(".gz") else size
    if claimed > limit:
        raise VolumeLoadError(
            f"{p} is {size} bytes but its header claims {tuple(img.shape)} voxels of "
            f"{img.get_data_dtype()} ({claimed} bytes{', more than gzip can compress into it' if name.endswith('.gz') else ''}): "
            "the file is truncated or its header is wrong; copy or export it again."
        )


def _load_nifti(p: Path) -> Any:
    import nibabel as nib
    from monai.data import MetaTensor, NibabelReader
    from monai.transforms import EnsureChannelFirst

    try:
        hdr_img = nib.load(str(p))
    except Exception as e:  # text file named .nii, truncated header, wrong magic...
        raise VolumeLoadError(
            f"{p} is not a readable NIfTI file ({type(e).__name__}: {e}). Check that it is a NIfTI-1/2 "
            "image and that the copy/download is complete."
        ) from e
    _check_claimed_size(p, hdr_img)
    shape = tuple(int(s) for s in hdr_img.shape)
    if len(shape) < 3 or any(s < 2 for s in shape[:3]):
        raise VolumeLoadError(
            f"{p} has shape {shape}: a 2D image or a single slice, not a 3D CT volume. "
            "Pass the whole 3D scan."
        )
    if len(shape) > 3 and any(s != 1 for s in shape[3:]):
        raise VolumeLoadError(
            f"{p} has shape {shape}: a {len(shape)}D image with {int(np.prod(shape[3:]))} volumes "
            "(time points or channels). medcam3d needs one 3D CT volume; save the volume you want "
            "(e.g. nibabel: img.slicer[..., 0]) and pass that file."
        )
    if np.issubdtype(hdr_img.get_data_dtype(), np.complexfloating) or hdr_img.get_data_dtype().names:
        raise VolumeLoadError(f"{p} stores {hdr_img.get_data_dtype()} voxels (complex/RGB), not CT values.")
    # MONAI's NibabelReader gives MONAI's meta/affine conventions; the data read goes through
    # nibabel's dataobj, so scl_slope/scl_inter are applied (integer files come out in HU). The steps
    # are those of LoadImage(reader=NibabelReader, ensure_channel_first=True, dtype=float32); LoadImage
    # itself is not used because its constructor instantiates every default reader, one of which
    # registers a (GPU) decoder plugin into pydicom and warns on machines without it. The reader
    # already byteswaps the header; np.asarray(..., float32) makes big-endian data native.
    reader = NibabelReader(squeeze_non_spatial_dims=True)
    try:
        arr, meta = reader.get_data(reader.read(str(p)))
    except Exception as e:  # truncated gzip stream, short file, I/O error
        raise VolumeLoadError(
            f"Could not read the image data of {p} ({type(e).__name__}: {e}). The file is probably "
            "truncated or corrupt (interrupted download or copy); copy or export it again."
        ) from e
    meta["filename_or_obj"] = str(p)
    _keep_file_geometry(meta, hdr_img)
    img = MetaTensor.ensure_torch_and_prune_meta(np.asarray(arr, dtype=np.float32), meta)
    img = EnsureChannelFirst()(img)
    if tuple(img.shape) != (1, *shape[:3]):  # pragma: no cover - guard against reader changes
        raise VolumeLoadError(f"{p}: unexpected array shape {tuple(img.shape)} for header shape {shape}.")
    _check_finite(img.as_tensor(), p)
    aff = img.affine.numpy()
    if not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise VolumeLoadError(
            f"{p} has a degenerate affine (voxel-to-world matrix):\n{aff}\nso its voxels cannot be placed "
            "in the patient's space. Fix the header (qform/sform, pixdim) with the tool that wrote it."
        )
    for key in _DROP_NIFTI_KEYS:
        img.meta.pop(key, None)
    return img


def _keep_file_geometry(meta: dict[str, Any], hdr_img: Any) -> None:
    """Restore the file's own affine and qform/sform fields in ``meta`` (in place).

    MONAI's reader "corrects" a header whose pixdim disagrees with the affine's column norms
    (``correct_nifti_header_if_necessary``): it may replace the sform by the qform even when the qform
    code is 0, i.e. by a transform the file says not to use. A sheared sform (gantry tilt, whose
    column norm differs from the slice spacing in pixdim) written with an unused identity qform came
    back with an identity affine. The NIfTI standard and nibabel place the image by the sform when
    ``sform_code > 0``, else the qform, else pixdim: that is ``hdr_img.affine``, read before MONAI
    touched anything, and the header fields are the file's own so maps can carry them verbatim.
    """
    from medcam3d.io.xform import QFORM_FIELDS, SFORM_FIELDS

    affine = np.array(hdr_img.affine, dtype=np.float64)
    meta["affine"] = affine
    meta["original_affine"] = affine.copy()
    header = hdr_img.header
    for key in (*QFORM_FIELDS, *SFORM_FIELDS, "pixdim"):
        meta[key] = np.array(header[key], copy=True)
    meta["original_pixdim"] = np.array(header["pixdim"], copy=True)


def _load_dicom(folder: Path, series_uid: str | None, allow_non_ct: bool) -> Any:
    from monai.data import MetaTensor

    vol, affine, extra = read_dicom_series(folder, series_uid=series_uid, allow_non_ct=allow_non_ct)
    _check_finite(vol, folder)
    meta: dict[str, Any] = {
        "affine": torch.as_tensor(affine, dtype=torch.float64),
        "original_affine": affine.copy(),
        "spatial_shape": np.asarray(vol.shape, dtype=np.int64),
        "space": "RAS",
        "original_channel_dim": float("nan"),  # as LoadImage(ensure_channel_first=True) leaves it
        "filename_or_obj": str(folder),
        **extra,
    }
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(vol[None])), meta=meta)

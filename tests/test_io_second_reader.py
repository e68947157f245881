"""Maps overlay their scan in TWO independent readers: nibabel (RAS, get_best_affine) and SimpleITK
(ITK's own NIfTI rules, as 3D Slicer and ITK-SNAP read files). A cube planted at a known voxel of a
synthetic CT is explained by a model whose map is the cube itself; for every qform/sform code pair,
qfac sign and orientation, the cube's centroid in world mm must agree between the CT file and the map
file in each reader (within half a voxel), each reader opening the files itself."""

from __future__ import annotations

import itertools
import math

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from toy_evidence_models import IntensityModel

import medcam3d

SHAPE = (20, 18, 16)
SPACING = np.array([0.8, 1.1, 2.5])
CUBE = (slice(13, 16), slice(4, 7), slice(9, 12))  # off-centre on every axis: flips would show
SHIFT = np.array([12.0, -7.0, 20.0])  # sform origin = qform origin + SHIFT (mm)
CODES = list(nib.nifti1.xform_codes.value_set())  # 0..5: unknown, scanner, aligned, talairach, mni, template


def _ct() -> np.ndarray:
    data = np.full(SHAPE, -1000.0, np.float32)
    data[CUBE] = 500.0
    return data


def _affine(columns: np.ndarray, origin) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = columns
    a[:3, 3] = origin
    return a


def _rot(axis: int, deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _write_ct(path, qaff, qcode, saff, scode) -> None:
    img = nib.Nifti1Image(_ct(), None)
    img.header.set_qform(qaff, code=int(qcode))
    img.header.set_sform(saff, code=int(scode))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def _nib_centroid(path) -> np.ndarray:
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float64)
    ijk = np.argwhere(data > 0.5 * data.max()).mean(axis=0)  # the cube (not round-off around it)
    return img.affine[:3, :3] @ ijk + img.affine[:3, 3]


def _itk_centroid(path) -> np.ndarray:
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayViewFromImage(img)  # (z, y, x)
    zyx = np.argwhere(arr > 0.5 * arr.max()).mean(axis=0)
    return np.array(img.TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]]))


def _explain_and_save(ct_path, out_dir):
    vol = medcam3d.load_volume(ct_path)
    expl = medcam3d.explain_volume(IntensityModel(), vol, None, target_layer="act", class_names=["cube"])
    (map_path,) = medcam3d.save_nifti(expl, out_dir, stem="case")
    return map_path


def _assert_overlay(ct_path, map_path) -> None:
    half = 0.5 * float(SPACING.min())
    for reader in (_nib_centroid, _itk_centroid):
        ct_c, map_c = reader(ct_path), reader(map_path)
        err = float(np.linalg.norm(ct_c - map_c))
        assert err <= half, f"{reader.__name__}: map centroid {map_c} is {err:.2f} mm from the CT's {ct_c}"


def _assert_same_xforms(ct_path, map_path) -> None:
    src, out = nib.load(str(ct_path)).header, nib.load(str(map_path)).header
    for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
                "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z"):
        np.testing.assert_array_equal(out[key], src[key], err_msg=key)
    np.testing.assert_array_equal(out["pixdim"][:4], src["pixdim"][:4], err_msg="pixdim[0:4] (qfac, voxel sizes)")


@pytest.mark.parametrize(("qcode", "scode", "qfac"), list(itertools.product(CODES, CODES, (1, -1))))
def test_codes_and_qfac_map_overlays_ct_in_nibabel_and_itk(tmp_path, qcode, scode, qfac):
    rot = _rot(2, 10.0) @ _rot(0, -6.0)
    qaff = _affine(rot @ np.diag(SPACING * [1, 1, qfac]), [-20.0, 15.0, -30.0])
    saff = qaff.copy()
    saff[:3, 3] += SHIFT  # qform != sform: readers that prefer one or the other disagree on the CT itself
    ct_path = tmp_path / "ct.nii.gz"
    _write_ct(ct_path, qaff, qcode, saff, scode)
    map_path = _explain_and_save(ct_path, tmp_path / "out")
    _assert_same_xforms(ct_path, map_path)
    _assert_overlay(ct_path, map_path)


# name -> (3x3 direction*spacing, one column per voxel axis)
GEOMETRIES = {
    "LPS": np.diag(SPACING * [-1, -1, 1]),
    "det<0 (LAS)": np.diag(SPACING * [-1, 1, 1]),
    "axis-swapped (SPR)": np.array([[0, 0, 0.8], [0, -1.1, 0], [2.5, 0, 0]]),
    "oblique": _rot(2, 12.0) @ _rot(1, 7.0) @ np.diag(SPACING),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
@pytest.mark.parametrize(("qcode", "scode", "shift"), [(1, 1, False), (1, 2, True), (0, 2, False), (1, 0, False)])
def test_orientations_map_overlays_ct_in_nibabel_and_itk(tmp_path, name, qcode, scode, shift):
    qaff = _affine(GEOMETRIES[name], [31.0, -12.0, 7.5])
    saff = qaff.copy()
    if shift:
        saff[:3, 3] += SHIFT
    ct_path = tmp_path / "ct.nii.gz"
    _write_ct(ct_path, qaff, qcode, saff, scode)
    map_path = _explain_and_save(ct_path, tmp_path / "out")
    _assert_same_xforms(ct_path, map_path)
    _assert_overlay(ct_path, map_path)


def test_qform_sform_mismatch_places_ct_differently_in_itk_than_nibabel(tmp_path):
    """The failing input of issue 10: the readers disagree on the CT itself (so a map that copied only
    nibabel's choice into both slots was 24.3 mm off in ITK); the copy of both transforms follows each."""
    qaff = _affine(np.diag(SPACING), [-20.0, 15.0, -30.0])
    saff = qaff.copy()
    saff[:3, 3] += SHIFT
    ct_path = tmp_path / "ct.nii.gz"
    _write_ct(ct_path, qaff, 1, saff, 2)
    lps = np.array([-1.0, -1.0, 1.0])
    gap = float(np.linalg.norm(_nib_centroid(ct_path) - lps * _itk_centroid(ct_path)))
    assert gap == pytest.approx(np.linalg.norm(SHIFT), abs=0.01)  # ITK 5.4 places this CT by its qform
    map_path = _explain_and_save(ct_path, tmp_path / "out")
    _assert_overlay(ct_path, map_path)


def test_resampled_maps_fall_back_to_their_own_affine(tmp_path):
    """Header fields that no longer describe the maps' grid are not copied (no stale placement)."""
    from monai.data import MetaTensor

    qaff = _affine(np.diag(SPACING), [-20.0, 15.0, -30.0])
    ct_path = tmp_path / "ct.nii.gz"
    _write_ct(ct_path, qaff, 1, qaff, 1)
    vol = medcam3d.load_volume(ct_path)
    moved = vol.affine.clone()
    moved[:3, 3] += torch.tensor([5.0, 0.0, 0.0], dtype=moved.dtype)
    shifted = MetaTensor(vol.as_tensor().clone(), affine=moved, meta={k: v for k, v in vol.meta.items() if k != "affine"})
    expl = medcam3d.explain_volume(IntensityModel(), shifted, None, target_layer="act", class_names=["cube"])
    (p,) = medcam3d.save_nifti(expl, tmp_path / "out")
    np.testing.assert_allclose(nib.load(str(p)).affine, moved.numpy(), atol=1e-4)
    itk = sitk.ReadImage(str(p))
    np.testing.assert_allclose(np.array(itk.GetOrigin()), [-moved[0, 3].item(), -moved[1, 3].item(), moved[2, 3].item()], atol=1e-3)


def test_dicom_series_map_overlays_the_series_in_simpleitk(tmp_path):
    """The map of a real DICOM CT, opened by SimpleITK, sits where SimpleITK/GDCM puts the series itself:
    the intensity-weighted centroid of ReLU(HU) agrees within half a voxel (the map IS ReLU(HU)/N)."""
    import shutil

    from test_io_dicom_series import DICOM_DIR, SORTED

    series = tmp_path / "series"  # 5 of the 20 slices keep the test quick
    series.mkdir()
    for name in SORTED[5:10]:
        shutil.copy(DICOM_DIR / name, series / name)
    map_path = _explain_and_save(series, tmp_path / "out")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    ct = reader.Execute()
    m = sitk.ReadImage(str(map_path))

    def centroid(img):
        w = np.clip(sitk.GetArrayFromImage(img).astype(np.float64), 0, None)  # (z, y, x)
        zyx = (np.argwhere(w > 0) * w[w > 0][:, None]).sum(0) / w.sum()
        return np.array(img.TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]]))

    err = float(np.linalg.norm(centroid(ct) - centroid(m)))
    assert err <= 0.5 * 0.976562, f"map centroid {err:.3f} mm from the series' in SimpleITK"

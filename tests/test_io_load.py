"""load_volume on real CT data (NIfTI and a JPEG 2000 DICOM series) and on bad input.

Geometry is checked in world space (mm), not by raw index, so a reader with another axis order would
still be judged on where its voxels are. Data: tests/data (see its README and LICENSES).
"""

from __future__ import annotations

import ast
import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medcam3d.errors import VolumeLoadError
from medcam3d.io import load_volume

DATA = Path(__file__).parent / "data" / "totalseg"
DICOM_DIR = DATA / "example_ct_dicom"
GT = json.loads((DATA / "example_ct_dicom_ground_truth.json").read_text())
SORTED_FILES = GT["files_sorted_inferior_to_superior"]  # ascending z
CT_SM = DATA / "example_ct_sm.nii.gz"


@pytest.fixture(scope="module")
def dicom_vol():
    return load_volume(DICOM_DIR)


def _world(affine, ijk):
    ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
    return ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def _index(affine, xyz):
    """World mm -> voxel index, asserting it falls on a voxel centre."""
    ijk = (np.atleast_2d(xyz) - np.asarray(affine)[:3, 3]) @ np.linalg.inv(np.asarray(affine)[:3, :3]).T
    r = np.rint(ijk)
    assert np.abs(ijk - r).max() < 1e-3
    return r.astype(int)


def _copy_series(dst: Path, names=None, edit=None, suffix: str = "") -> Path:
    """Copy (some of) the sample series to ``dst``; ``edit(ds, name)`` may change headers (pixels kept)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in names if names is not None else SORTED_FILES:
        if edit is None:
            shutil.copy(DICOM_DIR / name, dst / (name + suffix))
        else:
            ds = pydicom.dcmread(DICOM_DIR / name)
            edit(ds, name)
            ds.save_as(dst / (name + suffix))
    return dst


# ---------------------------------------------------------------- DICOM, good input


def test_dicom_matches_ground_truth_in_world_space(dicom_vol):
    assert dicom_vol.shape == (1, 512, 512, 20)
    assert dicom_vol.dtype.is_floating_point and str(dicom_vol.dtype) == "torch.float32"
    aff = dicom_vol.affine.numpy()
    gt_aff = np.array(GT["affine_ras"])
    vol = dicom_vol[0].numpy()
    # the 8 corner voxel centres of the ground-truth grid are corner voxels of ours, same place in mm
    n = np.array([GT["columns"], GT["rows"], GT["n_slices"]]) - 1
    corners = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])])
    ours = _index(aff, _world(gt_aff, corners))
    assert {tuple(sorted(set(ours[:, d]))) for d in range(3)} == {(0, 511), (0, 19)}
    np.testing.assert_allclose(_world(aff, ours), _world(gt_aff, corners), atol=1e-3)
    # sample voxel values, looked up through world positions
    for key, expected in GT["hu_sample_voxels_ijk"].items():
        (i, j, k), = _index(aff, _world(gt_aff, [int(v) for v in key.split(",")]))
        assert vol[i, j, k] == expected, key
    v64 = vol.astype(np.float64)
    assert v64.min() == GT["hu_min"] and v64.max() == GT["hu_max"]
    assert v64.sum() == GT["hu_sum"]
    assert v64.mean() == pytest.approx(GT["hu_mean"], abs=1e-9)
    # and, with our [column,row,slice] ascending convention, the affine is the ground truth's itself
    np.testing.assert_allclose(aff, gt_aff, atol=1e-5)


def test_dicom_spacing_from_ipp_not_slice_thickness(dicom_vol):
    spacing = np.linalg.norm(dicom_vol.affine.numpy()[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, [0.9765625, 0.9765625, 2.0], atol=1e-6)
    assert dicom_vol.meta["SliceThickness"] == 3.0  # the tag says 3 mm; the step is 2 mm
    assert dicom_vol.meta["slice_step_mm"] == pytest.approx(2.0)


def test_dicom_meta_conventions_and_no_patient_tags(dicom_vol):
    nifti = load_volume(CT_SM)
    for key in ("affine", "original_affine", "spatial_shape", "space", "filename_or_obj"):
        assert key in dicom_vol.meta and key in nifti.meta, key
    assert dicom_vol.meta["space"] == nifti.meta["space"] == "RAS"
    assert list(dicom_vol.meta["spatial_shape"]) == [512, 512, 20]
    assert dicom_vol.meta["filename_or_obj"] == str(DICOM_DIR.resolve())
    assert "SeriesInstanceUID" in dicom_vol.meta and dicom_vol.meta["Modality"] == "CT"
    forbidden = ("Patient", "BirthDate", "Name", "Institution", "Accession", "Physician")
    assert not [k for k in dicom_vol.meta if any(f in str(k) for f in forbidden)]


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")
def test_dicom_matches_monai_pydicom_reader_in_world_space(dicom_vol):
    from monai.transforms import LoadImage

    ref = LoadImage(reader="PydicomReader", image_only=True, ensure_channel_first=True)(str(DICOM_DIR))
    ours_aff, ref_aff = dicom_vol.affine.numpy(), ref.affine.numpy()
    ijk = np.array([[0, 0, 0], [511, 0, 0], [0, 511, 19], [100, 200, 7], [511, 511, 19]])
    ref_ijk = _index(ref_aff, _world(ours_aff, ijk))
    vol, rvol = dicom_vol[0].numpy(), ref[0].numpy()
    for (i, j, k), (a, b, c) in zip(ijk, ref_ijk):
        assert vol[i, j, k] == rvol[a, b, c]
    assert ref_ijk[0, 2] == 19  # MONAI stacks superior-first (LPI); we ascend along the normal


def test_dicom_folder_with_dcm_suffix_and_non_dicom_files(tmp_path):
    names = SORTED_FILES[5:9]
    d = _copy_series(tmp_path / "series", names, suffix=".dcm")
    (d / "README.txt").write_text("not dicom")
    (d / "notes.nii.gz").write_bytes(b"junk")
    (d / "sub").mkdir()
    vol = load_volume(d)
    assert vol.shape == (1, 512, 512, 4)
    # slice 0 of the subset is slice 5 of the full series, 10 mm higher
    np.testing.assert_allclose(vol.affine.numpy()[2, 3], GT["ipp_z_sorted"][5])
    ref = pydicom.dcmread(DICOM_DIR / names[0])
    np.testing.assert_array_equal(vol[0, :, :, 0].numpy(), ref.pixel_array.T.astype(np.float32) - 1024)


def test_segmentation_overlays_dicom_ct_without_resampling(dicom_vol):
    """World positions of TotalSegmentator labels land on CT voxels of the right tissue and side."""
    seg = load_volume(DATA / "example_seg_dicom.nii.gz")
    assert seg.shape == dicom_vol.shape
    seg_np, ct = seg[0].numpy(), dicom_vol[0].numpy()
    for label, lo, hi, side in ((5, 40, 150, +1), (1, 40, 150, -1)):  # liver right, spleen left
        ijk = np.argwhere(seg_np == label)
        assert len(ijk) > 1000
        world = _world(seg.affine.numpy(), ijk)
        ct_ijk = _index(dicom_vol.affine.numpy(), world)
        assert (ct_ijk >= 0).all() and (ct_ijk < np.array(ct.shape)).all()
        mean_hu = ct[tuple(ct_ijk.T)].mean()
        assert lo < mean_hu < hi, (label, mean_hu)
        assert np.sign(world[:, 0].mean()) == side  # RAS x > 0 is the patient's right


# ---------------------------------------------------------------- NIfTI, good input


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")
def test_nifti_example_ct_sm():
    vol = load_volume(CT_SM)
    ref = nib.load(CT_SM)
    assert vol.shape == (1, 122, 101, 30)
    assert str(vol.dtype) == "torch.float32"
    np.testing.assert_allclose(np.linalg.norm(vol.affine.numpy()[:3, :3], axis=0), [3, 3, 3], atol=1e-5)
    np.testing.assert_allclose(vol.affine.numpy(), ref.affine, atol=1e-5)
    data = ref.get_fdata()
    assert float(vol.min()) == data.min() == -1100 and float(vol.max()) == data.max() == 1207
    np.testing.assert_array_equal(vol[0].numpy(), data.astype(np.float32))
    assert int(vol.meta["qform_code"]) == 0 and int(vol.meta["sform_code"]) == 2
    assert vol.meta["filename_or_obj"] == str(CT_SM.resolve())
    assert "descrip" not in vol.meta
    # same array, affine and core meta as MONAI's own LoadImage
    from monai.transforms import LoadImage

    ref = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True)(str(CT_SM))
    assert ref.shape == vol.shape
    np.testing.assert_array_equal(ref.numpy(), vol.numpy())
    np.testing.assert_array_equal(ref.affine.numpy(), vol.affine.numpy())
    for key in ("original_affine", "spatial_shape", "space", "qform_code", "sform_code", "pixdim"):
        np.testing.assert_array_equal(np.asarray(ref.meta[key]), np.asarray(vol.meta[key]), err_msg=key)


def test_nifti_integer_with_scaling_comes_out_in_hu(tmp_path):
    raw = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    img = nib.Nifti1Image(raw, np.diag([0.7, 0.8, 2.5, 1.0]))
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, tmp_path / "scaled.nii.gz")
    vol = load_volume(tmp_path / "scaled.nii.gz")
    np.testing.assert_array_equal(vol[0].numpy(), raw.astype(np.float32) * 2 - 1024)


def test_nifti_4d_with_singleton_fourth_dim_is_squeezed(tmp_path):
    arr = np.random.default_rng(0).normal(size=(4, 5, 6, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "one.nii")
    vol = load_volume(tmp_path / "one.nii")
    assert vol.shape == (1, 4, 5, 6)
    np.testing.assert_array_equal(vol[0].numpy(), arr[..., 0])


# ---------------------------------------------------------------- bad input


def _raises(path, fragment, **kw):
    with pytest.raises(VolumeLoadError) as ei:
        load_volume(path, **kw)
    assert fragment.lower() in str(ei.value).lower(), str(ei.value)
    return str(ei.value)


def test_nonexistent_path(tmp_path):
    msg = _raises(tmp_path / "nope.nii.gz", "no such file")
    assert "nope.nii.gz" in msg


def test_empty_folder(tmp_path):
    _raises(tmp_path, "empty folder")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    _raises(tmp_path, "no dicom image files")


def test_text_file_named_nii(tmp_path):
    p = tmp_path / "scan.nii"
    p.write_text("this is not a NIfTI image\n" * 20)
    msg = _raises(p, "not a readable nifti")
    assert "scan.nii" in msg


def test_truncated_nii_gz(tmp_path):
    p = tmp_path / "cut.nii.gz"
    blob = CT_SM.read_bytes()
    p.write_bytes(blob[: len(blob) // 2])
    msg = _raises(p, "truncated")
    assert "cut.nii.gz" in msg


def test_truncated_uncompressed_nii(tmp_path):
    p = tmp_path / "cut.nii"
    blob = gzip.decompress(CT_SM.read_bytes())
    p.write_bytes(blob[: len(blob) - 1000])
    _raises(p, "truncated")


def test_2d_nifti(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 9), np.float32), np.eye(4)), tmp_path / "flat.nii.gz")
    _raises(tmp_path / "flat.nii.gz", "2d image")


def test_4d_nifti_with_several_volumes(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.float32), np.eye(4)), tmp_path / "t.nii.gz")
    _raises(tmp_path / "t.nii.gz", "3 volumes")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels(tmp_path, bad):
    arr = np.zeros((4, 5, 6), np.float32)
    arr[1, 2, 3] = bad
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "nan.nii.gz")
    msg = _raises(tmp_path / "nan.nii.gz", "non-finite")
    assert "(1, 2, 3)" in msg


def test_single_dicom_file(tmp_path):
    _raises(DICOM_DIR / SORTED_FILES[0], "single dicom file")


def test_folder_with_single_slice(tmp_path):
    d = _copy_series(tmp_path / "one", SORTED_FILES[:1])
    _raises(d, "single slice")


def test_two_series_in_one_folder(tmp_path):
    new_uid = "1.2.826.0.1.3680043.8.498.12345"

    def edit(ds, name):
        if name in SORTED_FILES[10:]:
            ds.SeriesInstanceUID = new_uid
            ds.SeriesDescription = "second"

    d = _copy_series(tmp_path / "two", edit=edit)
    msg = _raises(d, "2 DICOM series")
    assert new_uid in msg and "second" in msg and "10 slice(s)" in msg and "series_uid=''" in msg
    _raises(d, "not found", series_uid="9.9.9")
    upper = load_volume(d, series_uid=new_uid)
    assert upper.shape == (1, 512, 512, 10) and upper.meta["SeriesInstanceUID"] == new_uid
    np.testing.assert_allclose(upper.affine.numpy()[2, 3], GT["ipp_z_sorted"][10])


def test_missing_slice_names_the_gap(tmp_path):
    gone = SORTED_FILES[7]
    d = _copy_series(tmp_path / "gap", [f for f in SORTED_FILES if f != gone])
    msg = _raises(d, "1 missing slice(s)")
    assert SORTED_FILES[6] in msg and SORTED_FILES[8] in msg and "4.000 mm" in msg


def test_uneven_spacing(tmp_path):
    def edit(ds, name):
        if name == SORTED_FILES[3]:
            x, y, z = ds.ImagePositionPatient
            ds.ImagePositionPatient = [x, y, float(z) + 0.5]

    d = _copy_series(tmp_path / "uneven", SORTED_FILES[:8], edit=edit)
    msg = _raises(d, "uneven slice spacing")
    assert SORTED_FILES[3] in msg


def test_duplicate_slice_positions(tmp_path):
    def edit(ds, name):
        if name == SORTED_FILES[3]:
            ds.ImagePositionPatient = pydicom.dcmread(DICOM_DIR / SORTED_FILES[2]).ImagePositionPatient

    d = _copy_series(tmp_path / "dup", SORTED_FILES[:6], edit=edit)
    _raises(d, "same position")


def test_inconsistent_orientation(tmp_path):
    def edit(ds, name):
        if name == SORTED_FILES[2]:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]

    d = _copy_series(tmp_path / "orient", SORTED_FILES[:5], edit=edit)
    msg = _raises(d, "different orientations")
    assert SORTED_FILES[2] in msg


def test_inconsistent_slice_size(tmp_path):
    def edit(ds, name):
        if name == SORTED_FILES[1]:
            ds.Rows = 256

    d = _copy_series(tmp_path / "size", SORTED_FILES[:4], edit=edit)
    _raises(d, "different sizes")


def test_non_ct_modality(tmp_path):
    def edit(ds, name):
        ds.Modality = "MR"

    d = _copy_series(tmp_path / "mr", SORTED_FILES[:3], edit=edit)
    msg = _raises(d, "modality 'MR'")
    assert "allow_non_ct=True" in msg
    vol = load_volume(d, allow_non_ct=True)
    assert vol.shape == (1, 512, 512, 3) and vol.meta["Modality"] == "MR"


def test_io_package_import_boundaries():
    """medcam3d.io must not import napari, yaml or the engine (checked statically, no subprocess)."""
    pkg = Path(__file__).parents[1] / "medcam3d" / "io"
    for f in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in ("napari", "yaml"), (f.name, n)
                assert not n.startswith("medcam3d.engine"), (f.name, n)


def test_degenerate_affine(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4))
    img.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=2)
    nib.save(img, tmp_path / "flat_affine.nii.gz")
    _raises(tmp_path / "flat_affine.nii.gz", "degenerate affine")

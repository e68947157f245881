"""save_nifti: round trip through nibabel, header contents, safe names, all-or-nothing writes."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medcam3d.errors import ExportError
from medcam3d.io import load_volume, save_nifti
from medcam3d.spatial.explanation import Explanation

DATA = Path(__file__).parent / "data" / "totalseg"
CT_SM = DATA / "example_ct_sm.nii.gz"
DICOM_DIR = DATA / "example_ct_dicom"


@pytest.fixture(scope="module")
def ct():
    return load_volume(CT_SM)


def make_expl(vol, names=("nodule", "mass"), seed=0, method="hirescam", layer="layer4"):
    rng = np.random.default_rng(seed)
    k = len(names)
    arr = np.zeros((k, *vol.shape[1:]), np.float32)
    arr[:, 10:40, 20:60, 5:20] = rng.random((k, 30, 40, 15), dtype=np.float32) * 3
    meta = {k: v for k, v in vol.meta.items() if k != "affine"}
    maps = MetaTensor(torch.from_numpy(arr), affine=vol.affine.clone(), meta=meta)
    return Explanation(
        maps=maps,
        logits=torch.linspace(-1, 2, k),
        probabilities=torch.sigmoid(torch.linspace(-1, 2, k)),
        class_idx=torch.arange(k),
        class_names=list(names),
        method=method,
        target_layer=layer,
        raw=torch.zeros(k, 2, 2, 2),
    )


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_default_storage_is_uint16_within_its_bound(ct, tmp_path):
    expl = make_expl(ct)
    paths = save_nifti(expl, tmp_path / "out")
    for i, p in enumerate(paths):
        img = nib.load(p)
        assert img.header.get_data_dtype() == np.uint16
        want = expl.maps[i].numpy()
        got = img.get_fdata(dtype=np.float32)
        # NIfTI-1 scl_slope: stored * slope; the bound of quantise_uint16 is max / 131070
        assert np.abs(got - want).max() <= want.max() / 131070 * 1.0001 + 1e-12
        assert got.max() == pytest.approx(want.max(), rel=1e-6) and (got[want == 0] == 0).all()


def test_round_trip_header_and_data(ct, tmp_path):
    expl = make_expl(ct)
    out = tmp_path / "out"
    paths = save_nifti(expl, out, storage="float32")
    assert [p.name for p in paths] == ["example_ct_sm_hirescam_nodule.nii.gz", "example_ct_sm_hirescam_mass.nii.gz"]
    assert files_under(tmp_path) == sorted(paths)  # nothing else, no temp files
    src = nib.load(CT_SM)
    for i, p in enumerate(paths):
        img = nib.load(p)
        hdr = img.header
        assert hdr.get_data_dtype() == np.float32
        data = np.asanyarray(img.dataobj)
        assert data.dtype == np.float32
        np.testing.assert_array_equal(data, expl.maps[i].numpy())
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
        # codes and matrices as in the source (qform_code 0, sform_code 2 there)
        assert int(hdr["qform_code"]) == int(src.header["qform_code"]) == 0
        assert int(hdr["sform_code"]) == int(src.header["sform_code"]) == 2
        np.testing.assert_allclose(hdr.get_sform(), src.affine, atol=1e-5)
        np.testing.assert_allclose(hdr.get_qform(), src.affine, atol=1e-4)
        assert float(hdr["cal_min"]) == data.min() and float(hdr["cal_max"]) == pytest.approx(data.max())
        name = expl.class_names[i]
        assert hdr["descrip"].item().decode() == f"medcam3d hirescam class={name} layer=layer4"
        ext = json.loads(hdr.extensions[0].get_content())
        assert ext["class"]["name"] == name and ext["method"] == "hirescam"
        assert ext["class"]["probability"] == pytest.approx(float(expl.probabilities[i]))
    # maps reloaded through load_volume sit exactly on the source grid
    back = load_volume(paths[0])
    np.testing.assert_allclose(back.affine.numpy(), ct.affine.numpy(), atol=1e-5)


def test_dicom_source_scanner_codes_and_round_trip(tmp_path):
    vol = load_volume(DICOM_DIR)
    expl = make_expl(vol, names=("liver_lesion",))
    (p,) = save_nifti(expl, tmp_path, stem="case01", storage="float32")
    assert p.name == "case01_hirescam_liver_lesion.nii.gz"
    img = nib.load(p)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    np.testing.assert_allclose(img.header.get_qform(), vol.affine.numpy(), atol=1e-4)
    np.testing.assert_allclose(img.header.get_sform(), vol.affine.numpy(), atol=1e-5)
    back = load_volume(p)
    np.testing.assert_allclose(back.affine.numpy(), vol.affine.numpy(), atol=1e-5)
    np.testing.assert_array_equal(back[0].numpy(), expl.maps[0].numpy())


def test_four_d(ct, tmp_path):
    expl = make_expl(ct, names=("a", "b", "c"))
    paths = save_nifti(expl, tmp_path, four_d=True, storage="float32")
    assert len(paths) == 4 and paths[-1].name == "example_ct_sm_hirescam_all-classes.nii.gz"
    img = nib.load(paths[-1])
    assert img.shape == (*ct.shape[1:], 3) and img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.moveaxis(expl.maps.numpy(), 0, -1))
    np.testing.assert_allclose(img.affine, nib.load(CT_SM).affine, atol=1e-5)
    ext = json.loads(img.header.extensions[0].get_content())
    assert [c["name"] for c in ext["classes"]] == ["a", "b", "c"] and ext["class_axis"] == 3


def test_names_are_sanitised_and_stay_in_out_dir(ct, tmp_path):
    names = ("../evil/name", "a b/c", "..", "nodule", "nodule", "ünï")
    out = tmp_path / "out"
    paths = save_nifti(make_expl(ct, names=names), out, stem="../../up")
    assert all(p.parent == out for p in paths)
    assert len({p.name for p in paths}) == len(names)
    for p in paths:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", p.name) and ".." not in p.name and not p.name.startswith(".")
    assert paths[0].name == "up_hirescam_evil_name.nii.gz"
    assert paths[2].name == "up_hirescam_class2.nii.gz"
    assert files_under(tmp_path) == sorted(paths)


def test_existing_file_without_overwrite_writes_nothing(ct, tmp_path):
    existing = tmp_path / "example_ct_sm_hirescam_mass.nii.gz"
    existing.write_bytes(b"keep me")
    with pytest.raises(ExportError, match="already exist"):
        save_nifti(make_expl(ct), tmp_path)
    assert files_under(tmp_path) == [existing] and existing.read_bytes() == b"keep me"
    paths = save_nifti(make_expl(ct), tmp_path, overwrite=True)
    assert nib.load(paths[1]).shape == ct.shape[1:]


def test_output_equal_to_source_path_is_refused(ct, tmp_path):
    src = tmp_path / "example_ct_sm_hirescam_nodule.nii.gz"
    shutil.copy(CT_SM, src)
    before = src.read_bytes()
    with pytest.raises(ExportError, match="input file"):
        save_nifti(make_expl(ct), tmp_path, overwrite=True, source_paths=[src])
    assert src.read_bytes() == before and files_under(tmp_path) == [src]
    link = tmp_path / "hardlink.nii.gz"
    os.link(src, link)  # same file under another name is refused too
    with pytest.raises(ExportError, match="input file"):
        save_nifti(make_expl(ct), tmp_path, overwrite=True, source_paths=[link])
    assert src.read_bytes() == before


def test_output_equal_to_volume_filename_is_refused(tmp_path):
    src = tmp_path / "medcam3d_hirescam_mass.nii.gz"
    shutil.copy(CT_SM, src)
    vol = load_volume(src)
    with pytest.raises(ExportError, match="input file"):
        save_nifti(make_expl(vol), tmp_path, stem="medcam3d", overwrite=True)
    assert src.read_bytes() == CT_SM.read_bytes() and files_under(tmp_path) == [src]


def test_out_dir_under_a_regular_file(ct, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="Cannot create output folder"):
        save_nifti(make_expl(ct), blocker / "out")
    with pytest.raises(ExportError, match="not a folder"):
        save_nifti(make_expl(ct), blocker)
    assert files_under(tmp_path) == [blocker]


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc")
def test_out_dir_not_creatable_in_proc(ct):
    with pytest.raises(ExportError):
        save_nifti(make_expl(ct), "/proc/medcam3d-test-out")


def test_failure_while_placing_leaves_nothing(ct, tmp_path, monkeypatch):
    import medcam3d.io.export as export

    real, calls = export._place, []

    def flaky(tmp, target, overwrite):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(tmp, target, overwrite)

    monkeypatch.setattr(export, "_place", flaky)
    with pytest.raises(ExportError, match="No space left"):
        save_nifti(make_expl(ct), tmp_path / "out")
    assert files_under(tmp_path) == []
    # with overwrite=True the files that were replaced before the failure come back unchanged
    old = [tmp_path / "example_ct_sm_hirescam_nodule.nii.gz", tmp_path / "example_ct_sm_hirescam_mass.nii.gz"]
    for p in old:
        p.write_bytes(b"old " + p.name.encode())
    calls.clear()
    with pytest.raises(ExportError, match="No space left"):
        save_nifti(make_expl(ct), tmp_path, overwrite=True)
    assert files_under(tmp_path) == sorted(old)
    assert [p.read_bytes() for p in old] == [b"old " + p.name.encode() for p in old]


def test_failure_while_writing_leaves_nothing(ct, tmp_path, monkeypatch):
    def broken_save(img, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    import medcam3d.io.export as export

    monkeypatch.setattr(export, "save_image", broken_save)  # every map file is written through it
    with pytest.raises(ExportError, match="No map file was left behind"):
        save_nifti(make_expl(ct), tmp_path)
    assert files_under(tmp_path) == []


def test_map_files_get_ordinary_file_permissions(ct, tmp_path):
    """Like the PNGs and the manifest (open() under the umask), not mkstemp's owner-only 0600."""
    mask = os.umask(0o022)
    os.umask(mask)
    paths = save_nifti(make_expl(ct), tmp_path / "out")
    want = 0o666 & ~mask
    assert {p.stat().st_mode & 0o777 for p in paths} == {want}


def test_bad_arguments(ct, tmp_path):
    with pytest.raises(ExportError, match="class name"):
        save_nifti(make_expl(ct), tmp_path, class_names=["only-one"])
    expl = make_expl(ct)
    expl.maps = torch.zeros(2, 4, 4, 4)  # a plain tensor has no affine
    with pytest.raises(ExportError, match="no affine"):
        save_nifti(expl, tmp_path)
    assert files_under(tmp_path) == []


def test_lps_space_meta_is_converted_to_ras(ct, tmp_path):
    expl = make_expl(ct, names=("x",))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ct.affine.numpy()
    expl.maps = MetaTensor(expl.maps.as_tensor(), affine=torch.as_tensor(lps), meta={"space": "LPS"})
    (p,) = save_nifti(expl, tmp_path)
    np.testing.assert_allclose(nib.load(p).affine, ct.affine.numpy(), atol=1e-5)


def test_save_volume_nifti_uncompressed_round_trip(ct, tmp_path):
    from medcam3d.io.export import save_volume_nifti

    p = save_volume_nifti(ct, tmp_path / "ct_copy.nii")
    with open(p, "rb") as fh:
        assert fh.read(2) != b"\x1f\x8b"  # really uncompressed, as the suffix says
    back = load_volume(p)
    np.testing.assert_array_equal(back.numpy(), ct.numpy())
    np.testing.assert_allclose(back.affine.numpy(), ct.affine.numpy(), atol=1e-5)
    with pytest.raises(ExportError, match="input file"):
        save_volume_nifti(ct, CT_SM, overwrite=True)
    assert files_under(tmp_path) == [p]


def test_default_stem_is_the_scan_file_name_and_a_nifti_path_is_a_file(ct, tmp_path):
    # two scans saved into one folder do not collide: each map is named after its scan
    (p,) = save_nifti(make_expl(ct, names=("nodule",)), tmp_path / "out")
    assert p.name == "example_ct_sm_hirescam_nodule.nii.gz"
    # a path ending in .nii.gz is the file to write, not a folder of that name
    (f,) = save_nifti(make_expl(ct, names=("nodule",)), tmp_path / "o2" / "map.nii.gz")
    assert f == tmp_path / "o2" / "map.nii.gz" and f.is_file()
    assert nib.load(f).shape == ct.shape[1:]
    with pytest.raises(ExportError, match="names one NIfTI file but the explanation holds 2 map"):
        save_nifti(make_expl(ct), tmp_path / "o3" / "map.nii.gz")
    assert not (tmp_path / "o3").exists()

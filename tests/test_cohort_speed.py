"""The cohort speed pieces (issue 13): stage timings in the manifest, streamed explanations written
class by class (identical files to the held maps), and uint16 storage read back by two independent
readers (nibabel, SimpleITK) within its documented error."""

from __future__ import annotations


import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers_models import config_dict, read_manifest as _manifest, write_config, write_scan
from spatial_models import CHAIN, BlobModel
from test_spatial_world import _write_case

import medcam3d
from medcam3d.cli.main import main
from medcam3d.cli.manifest import STAGE_COLUMNS
from medcam3d.errors import ExportError
from medcam3d.io.export import quantise_uint16


def test_manifest_rows_carry_stage_seconds_and_bytes(tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg", output={"montage": True})
    scans = [write_scan(tmp_path / "in" / f"scan{i}.nii.gz", seed=i) for i in range(2)]
    out = tmp_path / "out"
    assert main(["explain", "--config", str(cfg), "--input", *map(str, scans), "--output", str(out)]) == 0
    rows = _manifest(out)
    assert len(rows) == 2
    for row in rows:
        stages = {c: float(row[c]) for c in STAGE_COLUMNS}
        assert all(v >= 0 for v in stages.values())
        assert all(stages[c] > 0 for c in ("seconds_load", "seconds_engine", "seconds_inverse",
                                           "seconds_write", "seconds_montage"))
        # the stages (load aside) make up the method's seconds
        assert sum(v for c, v in stages.items() if c != "seconds_load") == pytest.approx(
            float(row["seconds"]), abs=0.01)
        files = [out / f for f in row["outputs"].split(";")]
        assert int(row["bytes_written"]) == sum(f.stat().st_size for f in files)
    printed = capsys.readouterr().out
    assert "time per stage over 2 case(s): load" in printed and "MB written" in printed


def test_streamed_explanation_writes_the_same_files_as_held_maps(tmp_path):
    path, affine, shape = _write_case(tmp_path, "LPS")
    vol = medcam3d.load_volume(path)
    held = medcam3d.explain_volume(BlobModel(), vol, CHAIN, target_layer="act", class_names=["blob", "anti"])
    streamed = medcam3d.explain_volume(BlobModel(), vol, CHAIN, target_layer="act",
                                       class_names=["blob", "anti"], stream=True)
    assert streamed.maps is None and streamed.grid is vol
    seen = []
    a = medcam3d.save_nifti(held, tmp_path / "held", stem="c")
    b = medcam3d.save_nifti(streamed, tmp_path / "streamed", stem="c", threads=2,
                            on_map=lambda k, m: seen.append((k, m.shape)))
    assert seen == [(0, shape), (1, shape)]
    for pa, pb in zip(a, b):
        ia, ib = nib.load(str(pa)), nib.load(str(pb))
        np.testing.assert_array_equal(np.asarray(ia.dataobj), np.asarray(ib.dataobj))
        np.testing.assert_array_equal(ia.affine, ib.affine)
        assert ia.header["descrip"] == ib.header["descrip"]


def test_streamed_maps_come_in_nifti_order_and_are_written_without_reordering(tmp_path):
    """Scan-grid maps are laid out as NIfTI stores them (first axis fastest) so nibabel writes them
    with no transposing copy; values and the peak are those of the C-ordered held maps."""
    from medcam3d.metrics.peak import first_max_index

    path, affine, shape = _write_case(tmp_path, "oblique-12deg")
    vol = medcam3d.load_volume(path)
    held = medcam3d.explain_volume(BlobModel(), vol, CHAIN, target_layer="act", class_names=["blob", "anti"])
    streamed = medcam3d.explain_volume(BlobModel(), vol, CHAIN, target_layer="act",
                                       class_names=["blob", "anti"], stream=True)
    for k, m in enumerate(streamed.iter_maps()):
        assert tuple(m.shape) == shape and m.permute(2, 1, 0).is_contiguous()
        a = m.numpy()
        assert a.flags.f_contiguous and np.array_equal(a, held.maps[k].numpy())
        want = tuple(int(i) for i in np.unravel_index(int(np.argmax(held.maps[k].numpy())), shape))
        assert first_max_index(a) == want


def test_uint16_storage_is_within_its_documented_error_in_nibabel_and_simpleitk(tmp_path):
    path, affine, shape = _write_case(tmp_path, "oblique-12deg")
    vol = medcam3d.load_volume(path)
    expl = medcam3d.explain_volume(BlobModel(), vol, CHAIN, target_layer="act", class_names=["blob", "anti"])
    exact = expl.maps.numpy()
    files = medcam3d.save_nifti(expl, tmp_path / "u16", stem="c", storage="uint16")
    ref = medcam3d.save_nifti(expl, tmp_path / "f32", stem="c", storage="float32")
    assert sum(p.stat().st_size for p in files) < sum(p.stat().st_size for p in ref)
    for k, f in enumerate(files):
        img = nib.load(str(f))
        assert img.get_data_dtype() == np.uint16
        by_nib = img.get_fdata()
        by_itk = sitk.GetArrayFromImage(sitk.ReadImage(str(f), sitk.sitkFloat64)).transpose(2, 1, 0)
        tol = exact[k].max() / 131070 * (1 + 1e-6) if exact[k].max() > 0 else 0.0
        assert np.abs(by_nib - exact[k]).max() <= tol
        np.testing.assert_allclose(by_itk, by_nib, rtol=1e-6, atol=1e-12)
        assert by_nib.max() == pytest.approx(float(exact[k].max()), rel=1e-6)
        # zeros stay exactly zero (values below half a quantisation step may round to 0: the
        # BlobModel's tails reach 1e-25 of the maximum, within ``tol`` checked above)
        assert (by_nib[exact[k] == 0] == 0).all()
        np.testing.assert_allclose(img.affine, nib.load(str(ref[k])).affine)


def test_streamed_four_d_uint16_file_holds_every_class_in_its_voxel(tmp_path):
    """The 4D file of a streamed explanation (a stack of Fortran-ordered scan-grid maps: neither C
    nor Fortran order) in the default uint16: each class equals the held float32 maps within half
    the shared scl_slope, in nibabel and SimpleITK (regression: values used to land in wrong voxels)."""
    path, affine, shape = _write_case(tmp_path, "oblique-12deg")
    vol = medcam3d.load_volume(path)
    kw = dict(target_layer="act", class_names=["blob", "anti"])
    want = medcam3d.explain_volume(BlobModel(), vol, CHAIN, **kw).maps.numpy()  # (K, X, Y, Z)
    streamed = medcam3d.explain_volume(BlobModel(), vol, CHAIN, stream=True, **kw)
    packed = medcam3d.save_nifti(streamed, tmp_path / "u16", stem="c", four_d=True)[-1]
    img = nib.load(str(packed))
    assert img.get_data_dtype() == np.uint16 and img.shape == (*shape, 2)
    bound = want.max() / 131070 * (1 + 1e-6)
    by_nib = np.moveaxis(np.asarray(img.dataobj), -1, 0)
    assert np.abs(by_nib - want).max() <= bound
    by_itk = sitk.GetArrayFromImage(sitk.ReadImage(str(packed), sitk.sitkFloat64))  # (K, Z, Y, X)
    np.testing.assert_allclose(by_itk.transpose(0, 3, 2, 1), by_nib, rtol=1e-6, atol=bound * 1e-3)


def test_quantise_uint16_keeps_every_value_in_place_for_any_memory_layout():
    """C, Fortran, flipped, strided and permuted-contiguous (np.stack of Fortran maps) inputs: the
    stored value of every element is within half a step of that element."""
    rng = np.random.default_rng(3)
    b = rng.random((4, 5, 6, 3)).astype(np.float32)
    layouts = [b, np.asfortranarray(b), b[::-1, :, ::2], np.ascontiguousarray(b.transpose(2, 3, 1, 0)).transpose(3, 2, 0, 1),
               np.stack([np.asfortranarray(b[..., k]) for k in range(3)], axis=-1)]
    for a in layouts:
        q, slope = quantise_uint16(a)
        assert q.shape == a.shape
        assert np.abs(q * np.float64(slope) - a).max() <= a.max() / 131070 * (1 + 1e-6)


def test_uint16_refuses_negative_maps_and_bad_storage_names(tmp_path):
    with pytest.raises(ExportError, match="non-negative"):
        quantise_uint16(np.array([-1.0, 2.0], np.float32))
    stored, slope = quantise_uint16(np.zeros((2, 2, 2), np.float32))
    assert slope == 1.0 and not stored.any()
    path, _, _ = _write_case(tmp_path, "RAS")
    expl = medcam3d.explain_volume(BlobModel(), medcam3d.load_volume(path), CHAIN, target_layer="act")
    with pytest.raises(ExportError, match="storage must be one of float32, uint16"):
        medcam3d.save_nifti(expl, tmp_path / "x", storage="float16")
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").iterdir())


def test_config_storage_key_is_validated(tmp_path):
    from medcam3d.config import load_run_config
    from medcam3d.errors import ConfigError

    cfg = write_config(tmp_path, output={"storage": "uint16", "montage": False})
    assert load_run_config(cfg).output.storage == "uint16"
    bad = write_config(tmp_path, name="bad.yaml", output={"storage": "int8"})
    with pytest.raises(ConfigError, match=r"output\.storage: expected one of float32, uint16"):
        load_run_config(bad)
    assert config_dict()  # the helper's defaults stay valid


def test_help_imports_neither_torch_nor_monai():
    """``medcam3d --help`` and ``import medcam3d`` stay light (lazy imports; measured 0.4 s vs 8.5 s)."""
    import subprocess
    import sys

    code = ("import sys, contextlib, io\n"
            "import medcam3d\n"
            "from medcam3d.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['--help']) == 0 and main(['explain', '--help']) == 0\n"
            "heavy = [m for m in ('torch', 'monai', 'nibabel', 'napari') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert medcam3d.HiResCAM.__name__ == 'HiResCAM'  # still there, on first use\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_batch_size_flag_is_gone(capsys):
    """The flag that did nothing is refused (usage error, exit 2), not silently accepted."""
    assert main(["explain", "--config", "c.yaml", "--input", "a", "--output", "o", "--batch-size", "4"]) == 2
    assert "unrecognized arguments: --batch-size" in capsys.readouterr().err


def _peak_ras(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.array(np.unravel_index(int(np.argmax(data)), data.shape), float)
    return affine[:3, :3] @ ijk + affine[:3, 3]


@pytest.mark.parametrize("name", ["LPS", "oblique-12deg"])
def test_maps_on_a_coarser_grid_overlay_in_nibabel_and_simpleitk(tmp_path, name):
    from medcam3d.spatial.composed import coarser_grid
    from test_spatial_world import SPHERE

    path, affine, shape = _write_case(tmp_path, name)
    vol = medcam3d.load_volume(path)
    expl = medcam3d.explain_volume(BlobModel(), vol, CHAIN, target_layer="act",
                                   class_names=["blob", "anti"], stream=True)
    grid = coarser_grid(vol, 2.0)
    # voxels of 0.8 and 1.1 mm become 2 mm; the 3 mm axis is kept; same field of view
    assert grid.shape[1:] == (32, 33, 24)
    coarse = medcam3d.save_nifti(expl.on_grid(grid), tmp_path / "coarse", stem="c")
    full = medcam3d.save_nifti(expl, tmp_path / "full", stem="c")
    assert coarse[0].stat().st_size < full[0].stat().st_size
    img = nib.load(str(coarse[0]))
    data = np.asarray(img.dataobj, dtype=np.float64)
    spacing = np.linalg.norm(img.affine[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, [2.0, 2.0, 3.0], atol=1e-4)
    # nibabel: the peak lands on the planted sphere within one coarse voxel diagonal
    assert np.linalg.norm(_peak_ras(data, img.affine) - SPHERE) <= float(np.linalg.norm(spacing))
    # and the map's centre of mass agrees with the full-resolution map's within 0.2 mm
    ref = nib.load(str(full[0]))
    rdata = np.asarray(ref.dataobj, dtype=np.float64)

    def com(d, a):
        ijk = np.stack(np.meshgrid(*[np.arange(s) for s in d.shape], indexing="ij"), -1).reshape(-1, 3)
        return a[:3, :3] @ (ijk.T @ d.reshape(-1) / d.sum()) + a[:3, 3]

    assert np.linalg.norm(com(data, img.affine) - com(rdata, ref.affine)) <= 0.2
    # SimpleITK (LPS) places the same voxel at the same point
    itk = sitk.ReadImage(str(coarse[0]))
    arr = sitk.GetArrayFromImage(itk).transpose(2, 1, 0)
    np.testing.assert_allclose(arr, data, rtol=1e-6)
    peak = np.unravel_index(int(np.argmax(arr)), arr.shape)
    lps = np.array(itk.TransformIndexToPhysicalPoint(tuple(int(i) for i in peak)))
    np.testing.assert_allclose(lps * [-1, -1, 1], _peak_ras(data, img.affine), atol=1e-3)


def test_cli_writes_coarse_uint16_maps_and_still_scores_on_the_scan_grid(tmp_path):
    cfg = write_config(tmp_path / "cfg", output={"montage": True, "storage": "uint16", "spacing_mm": 6.0})
    scan = write_scan(tmp_path / "in" / "scan0.nii.gz", seed=0)
    out = tmp_path / "out"
    assert main(["explain", "--config", str(cfg), "--input", str(scan), "--output", str(out), "--quiet"]) == 0
    (row,) = _manifest(out)
    src = nib.load(str(scan))
    files = [out / f for f in row["outputs"].split(";")]
    assert files[-1].suffix == ".png" and files[-1].exists()
    for f in files[:-1]:
        img = nib.load(str(f))
        assert img.get_data_dtype() == np.uint16
        spacing = np.linalg.norm(img.affine[:3, :3], axis=0)
        src_spacing = np.linalg.norm(src.affine[:3, :3], axis=0)
        np.testing.assert_allclose(spacing, np.maximum(src_spacing, 6.0), rtol=1e-5)
        # the same field of view: first voxel's outer corner is the scan's
        np.testing.assert_allclose(img.affine @ [-0.5, -0.5, -0.5, 1], src.affine @ [-0.5, -0.5, -0.5, 1],
                                   atol=1e-3)
    assert row["peak_mm"]  # scored from the scan-grid maps

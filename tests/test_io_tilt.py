"""Gantry-tilted (sheared) scans: maps on the scan's own grid are right in world space but ITK refuses
the grid, so medcam3d also writes orthogonal resliced copies of maps and CT that SimpleITK opens and
that put a planted object at its true world position (within half a voxel)."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from toy_evidence_models import IntensityModel

import medcam3d
from medcam3d.io.export import save_volume_nifti
from medcam3d.io.reslice import is_sheared, orthogonal_grid, reslice_orthogonal, shear_degrees

SHAPE = (24, 20, 12)
TILT = 20.0  # degrees
RADIUS = 3.5  # mm
LPS = np.array([-1.0, -1.0, 1.0])


def _tilted_affine() -> np.ndarray:
    a = np.eye(4)
    # slice k is shifted in y by k * 2.5 * tan(tilt): the slice step is not along the slice normal (z)
    a[:3, :3] = [[0.9, 0, 0], [0, 0.9, 2.5 * math.tan(math.radians(TILT))], [0, 0, 2.5]]
    a[:3, 3] = [-10.0, 5.0, 3.0]
    return a


def _planted(affine: np.ndarray):
    """CT (-1000 HU, 500 HU in a ball) and the exact world centroid (RAS mm) of the ball's voxels."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    centre = affine[:3, :3] @ np.array([15.0, 8.0, 6.0]) + affine[:3, 3]
    inside = np.linalg.norm(world - centre, axis=1) <= RADIUS
    ct = np.where(inside, 500.0, -1000.0).astype(np.float32).reshape(SHAPE)
    return ct, world[inside].mean(axis=0)


def _itk_weighted_centroid(path, background: float) -> np.ndarray:
    """World (RAS mm) centroid of (value - background) as SimpleITK places the file."""
    img = sitk.ReadImage(str(path))
    w = np.clip(sitk.GetArrayFromImage(img).astype(np.float64) - background, 0, None)  # (z, y, x)
    zyx = np.argwhere(w > 0)
    c = (zyx * w[w > 0][:, None]).sum(axis=0) / w.sum()
    return LPS * np.array(img.TransformContinuousIndexToPhysicalPoint([float(v) for v in c[::-1]]))


def test_orthogonal_grid_keeps_slice_plane_and_covers_the_scan():
    a = _tilted_affine()
    assert is_sheared(a) and shear_degrees(a) == pytest.approx(TILT, abs=1e-6)
    g, shape = orthogonal_grid(a, SHAPE)
    np.testing.assert_allclose(g[:3, :3], np.diag([0.9, 0.9, 2.5]), atol=1e-9)  # in-plane axes, normal step
    assert not is_sheared(g)
    # every source voxel centre falls inside the new grid's voxel boxes
    ijk = np.stack(np.meshgrid(*[[0, n - 1] for n in SHAPE], indexing="ij"), -1).reshape(-1, 3)
    idx = np.linalg.solve(g[:3, :3], (ijk @ a[:3, :3].T + a[:3, 3] - g[:3, 3]).T).T
    assert (idx >= -0.5).all() and (idx <= np.array(shape) - 0.5).all()


@pytest.mark.parametrize("pixdim", [(1.0, 1.0, 1.0), (0.9, 0.9, 2.5)], ids=["pixdim-unset", "pixdim-slice-spacing"])
def test_tilted_scan_maps_and_ct_open_in_simpleitk_at_the_true_position(tmp_path, pixdim):
    affine = _tilted_affine()
    ct, truth = _planted(affine)
    img = nib.Nifti1Image(ct, None)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(np.eye(4), code=0)  # an unused qform: MONAI's reader used to put it in the sform
    img.header.set_zooms(pixdim)
    src = tmp_path / "tilted.nii.gz"
    nib.save(img, str(src))
    with pytest.raises(RuntimeError, match="orthonormal"):
        sitk.ReadImage(str(src))  # the failing input: ITK refuses the sheared grid

    vol = medcam3d.load_volume(src)
    np.testing.assert_allclose(vol.affine.numpy(), affine, atol=1e-5)  # the sform, as the file says
    expl = medcam3d.explain_volume(IntensityModel(), vol, None, target_layer="act", class_names=["ball"])
    with pytest.warns(UserWarning, match="sheared by 20.00 degrees"):
        paths = medcam3d.save_nifti(expl, tmp_path / "out", stem="case")
    assert [p.name for p in paths] == ["case_hirescam_ball.nii.gz", "case_hirescam_ball_resliced.nii.gz"]
    # the map on the scan's own grid is right in world space (nibabel)
    on_grid = nib.load(str(paths[0]))
    m = np.asarray(on_grid.dataobj, dtype=np.float64)
    ijk = np.argwhere(m > 0)
    c = (ijk * m[m > 0][:, None]).sum(0) / m.sum()
    np.testing.assert_allclose(on_grid.affine[:3, :3] @ c + on_grid.affine[:3, 3], truth, atol=1e-4)

    ct_resliced = save_volume_nifti(reslice_orthogonal(vol, fill=-1024.0), tmp_path / "out" / "ct_resliced.nii.gz")
    half = 0.5 * 0.9
    for path, background in ((paths[1], 0.0), (ct_resliced, -1000.0)):
        err = float(np.linalg.norm(_itk_weighted_centroid(path, background) - truth))
        assert err <= half, f"{path.name}: {err:.3f} mm from the true position"
        # nibabel agrees with ITK on the resliced (orthogonal) files
        r = nib.load(str(path))
        assert not is_sheared(r.affine)


# ------------------------------------------------------------------ a tilted DICOM series, end to end


def _tilted_dicom(folder, tilt_deg=15.0, n=10, size=64):
    """Real series headers (first n slices), pixels replaced by a -1000 HU field with a bright
    block, cropped to size x size, and every slice shifted along y by k * step * tan(tilt).

    Returns the world (RAS mm) centroid of the block computed from the DICOM tags alone.
    """
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian
    from test_io_dicom_series import DICOM_DIR, SORTED

    folder.mkdir(parents=True)
    shift = 2.0 * math.tan(math.radians(tilt_deg))
    points = []
    for k, name in enumerate(SORTED[:n]):
        ds = pydicom.dcmread(DICOM_DIR / name)
        slope, inter = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        arr = np.full((size, size), round((-1000 - inter) / slope), np.uint16)
        if 3 <= k < 7:
            arr[20:26, 30:38] = round((1500 - inter) / slope)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + k * shift, z]
        ds.Rows, ds.Columns = size, size
        ds.PixelData = arr.tobytes()
        ds["PixelData"].VR = "OW"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(folder / name, enforce_file_format=True)
        if 3 <= k < 7:
            iop = np.array([float(v) for v in ds.ImageOrientationPatient])
            ps = [float(v) for v in ds.PixelSpacing]  # [row spacing, column spacing]
            for r in range(20, 26):
                for c in range(30, 38):
                    points.append(np.array([x, y + k * shift, z]) + c * ps[1] * iop[:3] + r * ps[0] * iop[3:])
    return LPS * np.mean(points, axis=0)


def test_tilted_dicom_series_through_the_command_line(tmp_path, capsys):
    import csv

    import yaml

    from medcam3d.cli.main import main

    series = tmp_path / "tilted"
    truth = _tilted_dicom(series)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"_target_": "toy_evidence_models.IntensityModel", "checkpoint": None},
        "preprocess": [], "methods": ["hirescam"], "target_layer": "act", "class_names": ["block"],
        "output": {"montage": False}, "device": "cpu",
    }))
    out = tmp_path / "out"
    assert main(["explain", "--config", str(cfg), "--input", str(series), "--output", str(out),
                 "--allow-random-weights"]) == 0
    err = capsys.readouterr().err
    assert "sheared by 15.00 degrees (gantry tilt)" in err and "tilted_ct_resliced.nii.gz" in err
    case = out / "tilted"
    on_grid, resliced_map, resliced_ct = (case / "tilted_hirescam_block.nii.gz",
                                          case / "tilted_hirescam_block_resliced.nii.gz",
                                          case / "tilted_ct_resliced.nii.gz")
    with pytest.raises(RuntimeError, match="orthonormal"):
        sitk.ReadImage(str(on_grid))  # what ITK does with the scan's own (sheared) grid
    img = nib.load(str(on_grid))  # ... while nibabel places it right
    m = np.asarray(img.dataobj, dtype=np.float64)
    c = (np.argwhere(m > 0) * m[m > 0][:, None]).sum(0) / m.sum()
    np.testing.assert_allclose(img.affine[:3, :3] @ c + img.affine[:3, 3], truth, atol=1e-3)
    half = 0.5 * 0.976562
    for path, background in ((resliced_map, 0.0), (resliced_ct, -1000.0)):
        err_mm = float(np.linalg.norm(_itk_weighted_centroid(path, background) - truth))
        assert err_mm <= half, f"{path.name}: {err_mm:.3f} mm from the block's true position"
    with open(out / "manifest.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert "gantry tilt" in row["notes"]
    assert row["outside_scan_fraction"] == "0.0"


def test_single_file_target_gets_its_resliced_copy_beside_it(tmp_path):
    affine = _tilted_affine()
    ct, _ = _planted(affine)
    img = nib.Nifti1Image(ct, None)
    img.header.set_sform(affine, code=1)
    src = tmp_path / "tilted.nii.gz"
    nib.save(img, str(src))
    expl = medcam3d.explain_volume(IntensityModel(), medcam3d.load_volume(src), None, target_layer="act",
                                   class_names=["ball"])
    with pytest.warns(UserWarning, match="gantry tilt"):
        paths = medcam3d.save_nifti(expl, tmp_path / "maps" / "ball.nii.gz")
    assert [p.name for p in paths] == ["ball.nii.gz", "ball_resliced.nii.gz"]
    assert all(p.parent == tmp_path / "maps" for p in paths)
    sitk.ReadImage(str(paths[1]))  # opens

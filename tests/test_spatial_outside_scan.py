"""Evidence outside the scan is measured and reported, never dropped silently.

A 16-voxel scan axis is padded to 32 by ResizeWithPadOrCrop: model-grid indices 0-7 and 24-31 along
that axis are padding, 8-23 are the scan (MONAI pads symmetrically). SlabModel puts each class's map
on a chosen slab of model indices, so the fraction of mass in padding is known by construction.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from toy_evidence_models import SlabModel

import medcam3d
from medcam3d.spatial import model_input, outside_scan_fraction, scan_coverage

AFFINE = np.array([[-2.0, 0, 0, 40.0], [0, 1.5, 0, -30.0], [0, 0, 3.0, -100.0], [0, 0, 0, 1]])


def _scan(shape=(16, 12, 10)) -> MetaTensor:
    return MetaTensor(torch.full((1, *shape), 50.0), affine=torch.as_tensor(AFFINE))


# slab on model axis 0 -> expected fraction of its mass in padding (8 padded voxels before the scan)
SLABS = {"padding": ([0, 6], 1.0), "scan": ([10, 20], 0.0), "half": ([4, 12], 0.5), "far side": ([22, 30], 0.75)}


@pytest.mark.parametrize("mode", ["constant", "edge"])
def test_fraction_of_map_mass_in_padding_is_known_by_construction(mode):
    # "edge" padding copies scan values into the padding: coverage must come from geometry, not values
    pre = [{"name": "ResizeWithPadOrCrop", "spatial_size": [32, 12, 10], "mode": mode}]
    names = list(SLABS)
    model = SlabModel([SLABS[n][0] for n in names])
    expl = medcam3d.explain_volume(model, _scan(), pre, target_layer="act", class_names=names)
    expected = torch.tensor([SLABS[n][1] for n in names])
    torch.testing.assert_close(expl.outside_scan_fraction, expected, atol=1e-6, rtol=0)
    # the NIfTI-bound maps on the scan's grid stay as they are: the padding slab leaves nothing there
    assert float(expl.maps[0].sum()) == 0.0 and float(expl.maps[1].sum()) > 0


def test_resampled_grid_beyond_the_volume():
    # Spacing to 4 mm, then padded to 12 voxels along axis 0: which model voxels lie on the scan is
    # checked against the scan's world extent along x (an independent count, not the module's formula)
    vol = _scan((8, 12, 10))
    pre = [{"name": "Spacing", "pixdim": [4.0, 1.5, 3.0]}, {"name": "ResizeWithPadOrCrop", "spatial_size": [12, 12, 10]}]
    x = model_input(vol, pre)
    cov = scan_coverage(x, vol)
    # the scan's voxels along axis 0 (2 mm, running -x from x = 40) cover x in [40 - 2*7.5, 40 + 2*0.5]
    xa = torch.as_tensor(x.affine, dtype=torch.float64)
    world_x = xa[0, 0] * torch.arange(12, dtype=torch.float64) + xa[0, 3]
    lo, hi = 40.0 - 2.0 * 7.5, 40.0 + 2.0 * 0.5
    expected = (world_x >= lo - 1e-6) & (world_x <= hi + 1e-6)
    assert torch.equal(cov[:, 0, 0], expected)
    assert cov.all(dim=(1, 2)).equal(expected)  # axes 1 and 2 are not padded
    assert 0 < int(expected.sum()) < 12


def test_map_without_positive_mass_has_fraction_zero():
    vol = _scan()
    x = model_input(vol, None)
    frac = outside_scan_fraction(torch.zeros(2, *x.shape[1:]), x, vol)
    assert frac.tolist() == [0.0, 0.0]


def test_cli_prints_and_manifest_records_the_fraction(tmp_path, capsys):
    import nibabel as nib
    import yaml

    from medcam3d.cli.main import main

    scan = tmp_path / "in" / "padded.nii.gz"
    scan.parent.mkdir()
    hu = np.random.default_rng(0).normal(-300, 200, size=(20, 18, 10)).clip(-1024, 1500)  # CT-like values
    img = nib.Nifti1Image(hu.astype(np.int16), AFFINE)
    img.set_qform(AFFINE, code=1)
    img.set_sform(AFFINE, code=1)
    nib.save(img, str(scan))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"_target_": "toy_evidence_models.SlabModel", "kwargs": {"slabs": [[0, 4], [12, 20]]}, "checkpoint": None},
        "preprocess": [{"name": "ResizeWithPadOrCrop", "spatial_size": [32, 18, 10]}],
        "methods": ["hirescam"], "target_layer": "act", "class_names": ["pad", "inside"],
        "output": {"montage": False}, "device": "cpu",
    }))
    out = tmp_path / "out"
    assert main(["explain", "--config", str(cfg), "--input", str(scan), "--output", str(out),
                 "--allow-random-weights"]) == 0
    err = capsys.readouterr().err
    assert "100% of the positive map mass of 'pad' lies outside the scan" in err
    assert "'inside'" not in err.split("lies outside")[-1]  # only the noticeable class is reported
    with open(out / "manifest.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert [float(v) for v in row["outside_scan_fraction"].split(";")] == [1.0, 0.0]

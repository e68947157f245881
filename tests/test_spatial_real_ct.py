"""Real CT (TotalSegmentator example, 122x101x30, 3 mm, RAS): a model whose score uses a fixed box of
the model grid gives maps that, back on the scan's grid, are non-zero only inside that box's world
position, through a chain that reorients to LPS, resamples, windows and crops/pads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from spatial_models import RegionModel, world_grid

import medcam3d

CT = Path(__file__).parent / "data" / "totalseg" / "example_ct_sm.nii.gz"
MODEL_SHAPE = (80, 80, 24)
BOX = (slice(20, 50), slice(25, 55), slice(6, 18))
CHAIN = [
    {"name": "Orientation", "axcodes": "LPS"},
    {"name": "Spacing", "pixdim": [4.0, 4.0, 4.0]},
    {"name": "ScaleIntensityRange", "a_min": -100, "a_max": 200, "b_min": 0.0, "b_max": 1.0, "clip": True},
    {"name": "ResizeWithPadOrCrop", "spatial_size": list(MODEL_SHAPE)},
]


def _inside(world: np.ndarray, model_affine: np.ndarray, margin: float) -> np.ndarray:
    """Voxels whose world position falls in BOX (model voxel units), grown by ``margin`` voxels."""
    ijk = (world - model_affine[:3, 3]) @ np.linalg.inv(model_affine[:3, :3]).T
    ok = np.ones(world.shape[:-1], dtype=bool)
    for axis, s in enumerate(BOX):
        ok &= (ijk[..., axis] >= s.start - 0.5 - margin) & (ijk[..., axis] <= s.stop - 0.5 + margin)
    return ok


@pytest.mark.skipif(not CT.exists(), reason="tests/data/totalseg/example_ct_sm.nii.gz is not present")
def test_real_ct_maps_sit_on_the_scan_grid_inside_the_used_region():
    vol = medcam3d.load_volume(CT)
    expl = medcam3d.explain_volume(RegionModel(MODEL_SHAPE, BOX), vol, CHAIN, target_layer="act")
    assert expl.extra["model_input_shape"] == (1, *MODEL_SHAPE)
    assert expl.maps.shape == (2, *vol.shape[1:])
    assert torch.equal(expl.maps.affine, vol.affine)

    maps = expl.maps.numpy()
    model_affine = expl.extra["model_affine"].numpy()
    assert np.sign(np.diag(model_affine)[:3]).tolist() == [-1.0, -1.0, 1.0]  # the model saw LPS
    world = world_grid(vol.affine.numpy(), tuple(vol.shape[1:]))
    outside = ~_inside(world, model_affine, margin=1.0)  # linear interpolation reaches one voxel
    core = _inside(world, model_affine, margin=-1.0)
    assert outside.sum() > 0 and core.sum() > 1000
    assert float(np.abs(maps[:, outside]).max()) == 0.0
    body = core & (vol[0].numpy() > 0)  # soft tissue, well inside the window
    assert body.sum() > 500
    assert float((maps[0][body] > 0).mean()) > 0.95
    # class 1 has half the weight of class 0 on the same evidence: half the map, everywhere
    np.testing.assert_allclose(maps[1], 0.5 * maps[0], rtol=1e-5, atol=1e-12)

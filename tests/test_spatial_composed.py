"""The one-resampling inverse (medcam3d.spatial.composed) against MONAI's step-by-step
``Compose.inverse`` (kept as ``maps_to_volume_monai``), in world mm: same peak voxel, centres of mass
within 0.2 mm, values equal within float round-off away from the field-of-view edge; and the
fallback to MONAI's inverse for chains it cannot compose exactly."""

from __future__ import annotations

import monai.transforms as mt
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from spatial_models import CHAIN, BlobModel, make_affine
from test_spatial_world import CASES, SPHERE, _write_case

import medcam3d
from medcam3d.errors import InputError
from medcam3d.spatial import build_preprocessing, model_input
from medcam3d.spatial.composed import composed_mapping
from medcam3d.spatial.inverse import iter_maps_to_volume, maps_to_volume, maps_to_volume_monai


def _centre_mm(m: np.ndarray, affine: np.ndarray) -> np.ndarray:
    m = m.astype(np.float64)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in m.shape], indexing="ij"), -1).reshape(-1, 3)
    return affine[:3, :3] @ (ijk.T @ m.reshape(-1) / m.sum()) + affine[:3, 3]


def _smooth_random(shape: tuple[int, ...], k: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, k, 5, 4, 5, generator=g)
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear")[0]


@pytest.mark.parametrize("name", list(CASES))
def test_composed_inverse_equals_monai_inverse_in_world_mm(tmp_path, name):
    path, affine, shape = _write_case(tmp_path, name)
    vol = medcam3d.load_volume(path)
    compose = build_preprocessing(CHAIN)
    x = model_input(vol, compose)
    assert composed_mapping(x, compose, vol) is not None  # the fast path really runs here
    planted = medcam3d.explain_volume(BlobModel(), vol, compose, target_layer="act").extra["model_maps"]
    for maps in (planted, _smooth_random(tuple(x.shape[1:]))):
        new = maps_to_volume(maps, x, compose, vol)
        ref = maps_to_volume_monai(maps, x, compose, vol)
        assert new.shape == ref.shape == (maps.shape[0], *shape) and new.dtype == torch.float32
        assert torch.equal(new.affine, ref.affine)
        for k in range(maps.shape[0]):
            a, b = new[k].numpy(), ref[k].numpy()
            if b.max() == 0:
                assert a.max() == 0
                continue
            assert np.unravel_index(a.argmax(), shape) == np.unravel_index(b.argmax(), shape)
            assert np.linalg.norm(_centre_mm(a, affine) - _centre_mm(b, affine)) <= 0.2
            # interior (one voxel in from every face): float round-off only
            inner = (slice(1, -1),) * 3
            np.testing.assert_allclose(a[inner], b[inner], rtol=0, atol=1e-5 * float(b.max()))
    # and the planted object is where it was planted
    peak_map = maps_to_volume(planted, x, compose, vol)[0].numpy()
    assert np.linalg.norm(_centre_mm(peak_map, affine) - SPHERE) <= 0.5


def test_streaming_yields_one_class_at_a_time_on_the_scan_grid(tmp_path):
    path, affine, shape = _write_case(tmp_path, "LPS")
    vol = medcam3d.load_volume(path)
    compose = build_preprocessing(CHAIN)
    x = model_input(vol, compose)
    maps = _smooth_random(tuple(x.shape[1:]), k=3, seed=1)
    it = iter_maps_to_volume(maps, x, compose, vol)
    first = next(it)
    assert first.shape == shape and first.dtype == torch.float32
    full = maps_to_volume(maps, x, compose, vol)
    torch.testing.assert_close(first, full[0].as_tensor(), rtol=0, atol=0)
    assert len([first, *it]) == 3


@pytest.mark.parametrize(
    "chain",
    [
        [mt.Orientation("RAS"), mt.Resize(spatial_size=(20, 14, 10))],  # interpolate-based inverse
        [mt.Orientation("RAS"), mt.Rotate(angle=(0.0, 0.0, 0.3), keep_size=True)],  # not axis-aligned
        [mt.Orientation("RAS"), mt.Spacing(pixdim=2.0), mt.Rotate90(k=1)],  # outside COMPOSABLE
    ],
    ids=["Resize", "Rotate", "Rotate90"],
)
def test_other_chains_fall_back_to_monai_inverse(chain):
    aff = make_affine(np.diag([-0.9, 1.2, 2.5]), np.array([3.0, -4.0, 10.0]), (30, 24, 12))
    vol = MetaTensor(torch.rand(1, 30, 24, 12), affine=torch.as_tensor(aff))
    compose = build_preprocessing(chain)
    x = model_input(vol, compose)
    assert composed_mapping(x, compose, vol) is None
    maps = _smooth_random(tuple(x.shape[1:]))
    new = maps_to_volume(maps, x, compose, vol)
    ref = maps_to_volume_monai(maps, x, compose, vol)
    torch.testing.assert_close(new.as_tensor(), ref.as_tensor(), rtol=0, atol=0)


def test_a_record_from_another_compose_is_refused_not_composed():
    aff = make_affine(np.diag([1.0, 1.0, 2.0]), np.zeros(3), (20, 20, 10))
    vol = MetaTensor(torch.rand(1, 20, 20, 10), affine=torch.as_tensor(aff))
    compose = build_preprocessing([mt.Orientation("RAS"), mt.Spacing(pixdim=2.0)])
    other = build_preprocessing([mt.Orientation("RAS"), mt.Spacing(pixdim=2.0)])
    x = model_input(vol, compose)
    assert composed_mapping(x, other, vol) is None
    with pytest.raises(InputError, match="could not invert the preprocessing"):
        maps_to_volume(torch.ones(1, *x.shape[1:]), x, other, vol)

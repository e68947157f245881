"""explain_volume / maps_to_volume: identity when the grid does not change, linear interpolation of
maps, exact grid placement, and bad input turned into documented errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from spatial_models import BlobModel, make_affine, peak_world, sphere_volume, voxel_diagonal

import medcam3d
from medcam3d import ClassIndexError, ConfigError, InputError, VolumeLoadError, explain_volume
from medcam3d.spatial import maps_to_volume, model_input
from medcam3d.spatial.inverse import on_grid

WINDOW = [{"name": "ScaleIntensityRange", "a_min": -1000, "a_max": 400, "b_min": 0, "b_max": 1, "clip": True}]
CENTRE = np.array([1.0, 2.0, 3.0])


class TinyNet(torch.nn.Module):
    """Random conv features at half resolution -> GAP -> 3 outputs (a non-trivial, upsampled map)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 4, 3, stride=2, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
        self.act = torch.nn.ReLU()
        self.fc = torch.nn.Linear(4, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(3, 4, generator=g))
            self.conv.bias.copy_(torch.randn(4, generator=g))
            self.fc.bias.copy_(torch.randn(3, generator=g))  # every weight fixed: instances agree

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3, 4)))


def _volume(shape=(20, 16, 10), spacing=(-0.9, 1.3, 2.5)) -> MetaTensor:
    affine = make_affine(np.diag(spacing), CENTRE, shape)
    arr = sphere_volume(affine, shape, CENTRE + [3.0, -2.0, 2.0], radius=6.0)
    return MetaTensor(torch.from_numpy(arr)[None], affine=torch.as_tensor(affine))


def test_identity_geometry_maps_equal_the_engine_maps_exactly():
    vol = _volume()
    model = TinyNet()
    expl = explain_volume(model, vol, WINDOW, class_names=["a", "b", "c"])
    x = model_input(vol, WINDOW)
    res = medcam3d.HiResCAM(model)(x.as_tensor()[None], class_idx="all")
    assert torch.equal(expl.maps.as_tensor(), res.maps[0])
    assert float(res.maps[0].max()) > 0  # not a trivially empty comparison
    assert torch.equal(expl.maps.affine, vol.affine)
    torch.testing.assert_close(expl.raw, res.raw[0])
    torch.testing.assert_close(expl.logits, res.logits[0])
    assert expl.class_names == ["a", "b", "c"] and expl.class_idx.tolist() == [0, 1, 2]
    assert expl.target_layer == res.target_layer and expl.method == "hirescam"
    torch.testing.assert_close(expl.probabilities, torch.sigmoid(res.outputs[0]))


def test_softmax_names_subset_and_gradcam():
    vol = _volume()
    expl = explain_volume(
        TinyNet(),
        vol,
        WINDOW,
        method="gradcam",
        class_idx=[2, 0],
        class_names=["a", "b", "c"],
        activation="softmax",
    )
    assert expl.method == "gradcam" and expl.class_names == ["c", "a"] and len(expl) == 2
    out = expl.extra["outputs"]
    torch.testing.assert_close(expl.probabilities, torch.softmax(out, 0)[[2, 0]])
    assert expl.maps.shape == (2, *vol.shape[1:]) and expl.raw.shape[0] == 2
    top = explain_volume(TinyNet(), vol, WINDOW, class_idx=None)
    assert top.class_idx.tolist() == [int(out.argmax())] and top.class_names == [f"class_{int(out.argmax())}"]


def test_maps_are_interpolated_linearly_on_the_way_back():
    """A ramp map through Spacing(mode='nearest') and Resize (mode 'area') must come back as a ramp:
    strictly increasing inside, not the stair steps the image's own modes would give."""
    vol = _volume(shape=(24, 12, 12), spacing=(1.0, 1.0, 1.0))
    for chain in (
        [mt.Spacing(pixdim=(2.0, 2.0, 2.0), mode="nearest")],
        [mt.Resize(spatial_size=(12, 6, 6))],
    ):
        compose = medcam3d.build_preprocessing(chain)
        x = model_input(vol, compose)
        ramp = torch.arange(x.shape[1], dtype=torch.float32)[:, None, None].expand(*x.shape[1:])[None]
        back = maps_to_volume(ramp.clone(), x, compose, vol)
        profile = back[0, 2:-2, 6, 6]
        assert bool((profile.diff() > 0).all()), (type(chain[0]).__name__, profile)
        assert torch.equal(back.affine, vol.affine)


def test_on_grid_places_values_by_world_position():
    """The fallback resampler (used when an inverse misses the scan grid) is right in world mm."""
    src_aff = make_affine(np.diag([2.0, 2.0, 2.0]), CENTRE, (16, 16, 16))
    dst_aff = make_affine(np.diag([-0.7, 1.3, 2.9]), CENTRE + [0.35, -0.2, 0.6], (30, 20, 12))
    target = CENTRE + [4.0, -3.0, 5.0]
    blob = sphere_volume(src_aff, (16, 16, 16), target, radius=4.0, fg=1.0, bg=0.0)
    src = MetaTensor(torch.from_numpy(blob)[None].repeat(2, 1, 1, 1), affine=torch.as_tensor(src_aff))
    out = on_grid(src, torch.as_tensor(dst_aff), (30, 20, 12))
    assert out.shape == (2, 30, 20, 12)
    np.testing.assert_allclose(out.affine.numpy(), dst_aff)
    err = np.linalg.norm(peak_world(out[0].numpy(), dst_aff) - target)
    assert err <= voxel_diagonal(dst_aff)


def test_maps_to_volume_rejects_foreign_inputs():
    vol = _volume()
    compose = medcam3d.build_preprocessing([mt.Orientation("RAS"), mt.Spacing(pixdim=2.0)])
    x = model_input(vol, compose)
    other = medcam3d.build_preprocessing([mt.Orientation("RAS"), mt.Spacing(pixdim=2.0)])
    with pytest.raises(InputError, match="could not invert the preprocessing"):
        maps_to_volume(torch.ones(1, *x.shape[1:]), x, other, vol)
    with pytest.raises(InputError, match=r"maps have shape \(1, 3, 3, 3\); expected \(K, "):
        maps_to_volume(torch.ones(1, 3, 3, 3), x, compose, vol)


def test_bad_inputs_raise_documented_errors(tmp_path):
    vol = _volume()
    model = BlobModel()
    cases = [
        (torch.zeros(1, 8, 8, 8), {}, InputError, "volume must be a monai.data.MetaTensor"),
        (np.zeros((1, 8, 8, 8), np.float32), {}, InputError, "A bare array has no world coordinates"),
        (MetaTensor(torch.zeros(8, 8, 8)), {}, InputError, r"got \(8, 8, 8\)\. Add the channel axis"),
        (MetaTensor(torch.zeros(2, 8, 8, 8)), {}, InputError, r"shape \(1, X, Y, Z\).*got \(2, 8, 8, 8\)"),
        (
            MetaTensor(torch.zeros(1, 8, 8, 8), affine=torch.zeros(4, 4)),
            {},
            InputError,
            "finite, invertible 4x4",
        ),
        (vol, {"class_names": ["only-one"]}, InputError, "class_names has 1 name.* the model has 2 output"),
        (vol, {"class_names": "ab"}, InputError, "class_names must be a list"),
        (vol, {"activation": "relu"}, InputError, "activation must be one of sigmoid, softmax"),
        (vol, {"method": "cam++"}, InputError, "unknown method 'cam\\+\\+'"),
        (vol, {"class_idx": 5}, ClassIndexError, "class index 5 is out of range"),
        (
            vol,
            {"preprocess": [{"name": "Spacing", "pixdim": "abc"}]},
            ConfigError,
            r"preprocess\[0\]\.pixdim",
        ),
        (
            vol,
            {"preprocess": [lambda v: v[:, 1:]]},
            ConfigError,
            r"preprocess\[0\] \(function\) changed the grid",
        ),
        (tmp_path / "missing.nii.gz", {}, VolumeLoadError, "No such file or folder"),
        (vol, {"device": "nonsense"}, InputError, "device 'nonsense' is not a torch device"),
    ]
    before = vol.clone()
    for volume, kwargs, exc, pattern in cases:
        kwargs = {"preprocess": WINDOW, **kwargs}
        with pytest.raises(exc, match=pattern):
            explain_volume(model, volume, **kwargs)
    assert torch.equal(vol.as_tensor(), before.as_tensor()) and len(vol.applied_operations) == 0
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere

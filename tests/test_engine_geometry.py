"""Where the map sits: each feature cell is placed on its receptive-field centre, measured per model.

Expected values are independent of the code: the receptive-field arithmetic of strided layers
(Araujo et al., Distill 2019: after a layer of kernel k, stride t, padding p the centre of cell i is
o + s * i with o += s * ((k - 1) / 2 - p) and s *= t), torch's own ``F.interpolate`` for the anchor
convention, and objects planted at known input voxels (and world mm) in real MONAI networks.
"""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks import nets
from spatial_models import make_affine, sphere_volume
from torch import nn

import medcam3d
from medcam3d import FeatureGeometry, FeatureGeometryError
from medcam3d.engine import measure_geometry, place_maps
from medcam3d.engine.targets import resolve_target


def by_formula(layers: list[tuple[int, int, int]], rank: int = 3) -> tuple[float, float]:
    """(offset, stride) of a chain of (kernel, stride, padding) layers, by hand."""
    offset, stride = 0.0, 1.0
    for k, t, p in layers:
        offset += stride * ((k - 1) / 2 - p)
        stride *= t
    return offset, stride


def uniform_(model: nn.Module) -> nn.Module:
    """Uniform positive weights (1 / fan-in), zero biases: a symmetric blob detector. BN keeps its
    fresh statistics (mean 0, var 1, weight 1, bias 0), so eval mode is a near-identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                m.weight.fill_(1.0 / (m.weight.shape[1] * m.weight[0, 0].numel()))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.fill_(1.0 / m.weight.shape[1])
                m.bias.zero_()
    return model.eval()


def cube_input(shape: tuple[int, ...], centre: tuple[int, ...]) -> torch.Tensor:
    x = torch.zeros(1, 1, *shape)
    x[(0, 0, *[slice(c - 1, c + 2) for c in centre])] = 1.0
    return x


def centre_of_mass(v: torch.Tensor) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in v.shape], indexing="ij")
    w = v.double()
    return torch.stack([(w * g).sum() / w.sum() for g in grids])


def peak(v: torch.Tensor) -> torch.Tensor:
    return torch.tensor(torch.unravel_index(v.argmax(), v.shape), dtype=torch.float64)


class Head(nn.Module):
    """body -> global average -> linear, with a hook to transform the input before the body."""

    def __init__(self, body: nn.Module, channels: int, transform=None) -> None:
        super().__init__()
        self.body = body
        self.fc = nn.Linear(channels, 2)
        self.transform = transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform is not None:
            x = self.transform(x)
        a = self.body(x)
        return self.fc(a.flatten(2).mean(2))


# ----------------------------------------------------------------------------- (a) analytic geometry
STACKS = {
    "two k3 s2 p1 convs": ([nn.Conv3d(1, 3, 3, 2, 1), nn.ReLU(), nn.Conv3d(3, 3, 3, 2, 1), nn.ReLU()],
                           [(3, 2, 1), (3, 2, 1)]),
    "avgpool k2 s2": ([nn.Conv3d(1, 3, 1), nn.AvgPool3d(2, 2)], [(1, 1, 0), (2, 2, 0)]),
    "conv k3 s2 p1 + avgpool k2 s2": ([nn.Conv3d(1, 3, 3, 2, 1), nn.ReLU(), nn.AvgPool3d(2)],
                                      [(3, 2, 1), (2, 2, 0)]),
    "resnet stem k7 s2 p3 + maxpool k3 s2 p1": (
        [nn.Conv3d(1, 4, 7, 2, 3), nn.BatchNorm3d(4), nn.ReLU(), nn.MaxPool3d(3, 2, 1)], [(7, 2, 3), (3, 2, 1)]),
    "even kernel k4 s2 p1": ([nn.Conv3d(1, 2, 4, 2, 1), nn.ReLU()], [(4, 2, 1)]),
    "valid convs k3 p0": ([nn.Conv3d(1, 2, 3), nn.ReLU(), nn.Conv3d(2, 2, 3), nn.ReLU()], [(3, 1, 0), (3, 1, 0)]),
}


@pytest.mark.parametrize("name", list(STACKS))
def test_measured_geometry_matches_the_receptive_field_formula(name):
    layers, spec = STACKS[name]
    model = Head(nn.Sequential(*layers), layers[0].out_channels)
    geom = measure_geometry(model, resolve_target(model, "body"), torch.zeros(1, 1, 32, 16, 24))
    offset, stride = by_formula(spec)
    assert geom.input_axis == (0, 1, 2)
    np.testing.assert_allclose(geom.stride, [stride] * 3, atol=1e-6)
    np.testing.assert_allclose(geom.offset, [offset] * 3, atol=1e-6)
    affine = geom.affine
    assert affine.shape == (4, 4) and affine.dtype == torch.float64
    np.testing.assert_allclose(affine.numpy(), np.array(
        [[stride, 0, 0, offset], [0, stride, 0, offset], [0, 0, stride, offset], [0, 0, 0, 1]]), atol=1e-6)


def test_2d_geometry():
    model = Head(nn.Sequential(nn.Conv2d(1, 2, 3, 2, 1), nn.ReLU(), nn.AvgPool2d(2)), 2)
    geom = measure_geometry(model, resolve_target(model, "body"), torch.zeros(1, 1, 16, 24))
    assert geom.input_axis == (0, 1)
    np.testing.assert_allclose(geom.stride, [4, 4], atol=1e-6)
    np.testing.assert_allclose(geom.offset, [1, 1], atol=1e-6)  # 0 + 2 * (0.5 - 0)


def test_odd_input_sizes_are_measured_on_a_larger_probe():
    # 26 and 13 are not divisible by the stride: the first probe has a seam, the padded ones agree
    model = Head(nn.Sequential(nn.Conv3d(1, 2, 3, 2, 1), nn.ReLU(), nn.Conv3d(2, 2, 3, 2, 1)), 2)
    geom = measure_geometry(model, resolve_target(model, "body"), torch.zeros(1, 1, 40, 26, 13))
    np.testing.assert_allclose(geom.stride, [4, 4, 4], atol=1e-6)
    np.testing.assert_allclose(geom.offset, [0, 0, 0], atol=1e-6)


# ----------------------------------------------------------------------------- placing maps
def test_anchor_geometry_reproduces_torch_interpolate():
    # the old convention, from torch itself: place_maps with the anchor geometry = trilinear
    # interpolate(align_corners=False) (an independent implementation of the same formula)
    raw = torch.randn(2, 3, 4, 5, 3)
    size = (16, 20, 9)
    ours = place_maps(raw, FeatureGeometry.anchor(raw.shape[2:], size), size)
    ref = F.interpolate(raw.relu(), size=size, mode="trilinear", align_corners=False)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_identity_geometry_is_relu_of_raw():
    raw = torch.randn(1, 2, 6, 5, 4)
    torch.testing.assert_close(place_maps(raw, FeatureGeometry.identity(3), (6, 5, 4)), raw.relu())


def test_permuted_flipped_geometry_places_each_cell_on_its_centre():
    # feature axis 0 follows input axis 2 (stride 2), axis 1 follows input axis 0 flipped (stride -3)
    geom = FeatureGeometry(input_axis=(2, 0, 1), stride=(2.0, -3.0, 1.0), offset=(1.0, 10.0, 0.0))
    raw = torch.rand(1, 1, 4, 3, 5) + 0.1
    out = place_maps(raw, geom, (12, 5, 9))
    for i in range(4):
        for j in range(3):
            for k in range(5):
                v = (10 - 3 * j, k, 1 + 2 * i)
                assert float(out[(0, 0, *v)]) == pytest.approx(float(raw[0, 0, i, j, k]))


def test_declared_geometry_must_be_a_permutation():
    with pytest.raises(medcam3d.InputError, match="permutation"):
        FeatureGeometry(input_axis=(0, 0, 1), stride=(1, 1, 1), offset=(0, 0, 0))
    with pytest.raises(medcam3d.InputError, match="non-zero"):
        FeatureGeometry(input_axis=(0, 1, 2), stride=(1, 0, 1), offset=(0, 0, 0))


# ----------------------------------------------------------------------------- (c) axis-reordering models
def _stem() -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(1, 4, 3, stride=(1, 2, 2), padding=1), nn.ReLU(),
                         nn.Conv3d(4, 4, 3, stride=2, padding=1), nn.ReLU())


def test_permuting_model_is_placed_on_the_planted_object_in_input_axes():
    # forward(x) = head(body(x.permute(0, 1, 4, 2, 3))): the feature map is (Z', X', Y')
    model = uniform_(Head(_stem(), 4, transform=lambda x: x.permute(0, 1, 4, 2, 3)))
    shape, cube = (32, 24, 40), (21, 9, 26)
    x = cube_input(shape, cube)
    res = medcam3d.HiResCAM(model, "body")(x, 0)
    assert tuple(res.raw.shape[2:]) == (20, 8, 6)  # Z/2, X/4, Y/4
    geom = res.geometry
    assert geom.source == "measured" and geom.input_axis == (2, 0, 1)
    np.testing.assert_allclose(geom.stride, [2, 4, 4], atol=1e-6)
    np.testing.assert_allclose(geom.offset, [0, 0, 0], atol=1e-6)
    assert res.maps.shape == (1, 1, *shape)
    err = float((centre_of_mass(res.maps[0, 0]) - torch.tensor(cube, dtype=torch.float64)).norm())
    assert err <= 2.0, err
    # the old placement stretched (Z', X', Y') onto (X, Y, Z): far off
    old = F.interpolate(res.raw.relu(), size=shape, mode="trilinear", align_corners=False)
    assert float((centre_of_mass(old[0, 0]) - torch.tensor(cube, dtype=torch.float64)).norm()) > 5


def test_flipping_model_gets_a_negative_stride():
    model = uniform_(Head(_stem(), 4, transform=lambda x: x.flip(3)))
    shape, cube = (16, 24, 20), (7, 5, 12)
    res = medcam3d.HiResCAM(model, "body")(cube_input(shape, cube), 0)
    np.testing.assert_allclose(res.geometry.stride, [1 * 2, -4, 4], atol=1e-6)
    np.testing.assert_allclose(res.geometry.offset, [0, 23, 0], atol=1e-6)  # cell 0 at input index 23
    err = float((centre_of_mass(res.maps[0, 0]) - torch.tensor(cube, dtype=torch.float64)).norm())
    assert err <= 2.0, err


def _shear(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.roll(x[..., z], z, dims=3) for z in range(x.shape[-1])], -1)


def test_non_axis_aligned_model_is_refused_and_declaring_the_geometry_works(tmp_path):
    model = Head(_stem(), 4, transform=_shear)
    x = torch.rand(1, 1, 16, 24, 20)
    res = medcam3d.HiResCAM(model, "body")(x, "all")
    assert res.geometry is None and res.raw.shape == (1, 2, 8, 6, 5)  # raw and logits stay usable
    with pytest.raises(FeatureGeometryError, match="not axis-aligned.*feature_geometry=") as info:
        res.maps
    assert isinstance(info.value, medcam3d.TargetLayerError)
    declared = FeatureGeometry(input_axis=(0, 1, 2), stride=(2, 4, 4), offset=(0, 0, 0))
    res2 = medcam3d.HiResCAM(model, "body", feature_geometry=declared)(x, "all")
    assert res2.geometry is declared and res2.maps.shape == (1, 2, 16, 24, 20)
    # through explain_volume: refused with the same message, nothing else to write
    vol = medcam3d.load_volume(_nifti(tmp_path, np.random.default_rng(0).normal(0, 100, (16, 24, 20))))
    with pytest.raises(FeatureGeometryError, match="not axis-aligned"):
        medcam3d.explain_volume(model, vol, target_layer="body")
    ok = medcam3d.explain_volume(model, vol, target_layer="body", feature_geometry=declared)
    assert ok.maps.shape == (2, 16, 24, 20)


def test_functional_max_pool_is_refused():
    model = Head(_stem(), 4, transform=lambda x: F.max_pool3d(x, 3, 2, 1))
    res = medcam3d.GradCAM(model, "body")(torch.rand(1, 1, 16, 16, 16), 0)
    with pytest.raises(FeatureGeometryError, match="do not respond linearly"):
        res.maps


def _nifti(tmp_path, data: np.ndarray, affine: np.ndarray | None = None):
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4) if affine is None else affine), str(path))
    return path


# ----------------------------------------------------------------------------- (b) MONAI networks
def _monai_case(model: nn.Module, layer: str, shape, cube, offset, stride):
    model = uniform_(model)
    x = cube_input(shape, cube)
    res = medcam3d.HiResCAM(model, layer)(x, 0)
    np.testing.assert_allclose(res.geometry.stride, [stride] * 3, atol=1e-6)
    np.testing.assert_allclose(res.geometry.offset, [offset] * 3, atol=1e-6)
    truth = torch.tensor(cube, dtype=torch.float64)
    err = float((peak(res.maps[0, 0]) - truth).norm())
    old = F.interpolate(res.raw.relu(), size=shape, mode="trilinear", align_corners=False)
    old_err = float((peak(old[0, 0]) - truth).norm())
    return err, old_err


@pytest.mark.slow
def test_resnet18_layer4_planted_cube():
    # stem k7 s1 p3, maxpool k3 s2 p1, then three k3 s2 p1 stages: centre 16 i (formula)
    offset, stride = by_formula([(7, 1, 3), (3, 2, 1), (3, 2, 1), (3, 2, 1), (3, 2, 1)])
    assert (offset, stride) == (0.0, 16.0)
    # the cube sits on the centre of cell (1, 2, 3) (not the middle of the volume; not cell 0, whose
    # edge-replicated plateau would make the argmax ambiguous)
    err, old_err = _monai_case(nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=2),
                               "layer4", (48, 48, 64), (16, 32, 48), offset, stride)
    assert err <= 2.0, err
    assert old_err > 10, old_err  # the align_corners=False placement: 7.5 voxels per axis off


def _gap_after(model: nn.Module, layer: str, channels: int) -> nn.Module:
    """A MONAI ResNet whose stages after ``layer`` are removed: GAP + FC follows it directly, so the
    gradient at the layer is uniform and HiResCAM's map is the activation itself (with layer4 still in
    the head, its strided convolutions weight odd and even cells differently: a faithful map whose peak
    need not be the cell nearest the object)."""
    names = ["layer1", "layer2", "layer3", "layer4"]
    for name in names[names.index(layer) + 1 :]:
        setattr(model, name, nn.Identity())
    model.fc = nn.Linear(channels, 2)
    return model


@pytest.mark.slow
def test_resnet18_layer3_planted_cube():
    offset, stride = by_formula([(7, 1, 3), (3, 2, 1), (3, 2, 1), (3, 2, 1)])
    model = _gap_after(nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=2), "layer3", 256)
    err, old_err = _monai_case(model, "layer3", (32, 40, 48), (8, 24, 40), offset, stride)
    assert err <= 2.0, err
    assert old_err > 5, old_err


@pytest.mark.slow
def test_densenet121_planted_cube():
    # conv0 k7 s2 p3, pool0 max k3 s2 p1, three transitions with avgpool k2 s2: centre 32 i + 14
    offset, stride = by_formula([(7, 2, 3), (3, 2, 1), (2, 2, 0), (2, 2, 0), (2, 2, 0)])
    assert (offset, stride) == (14.0, 32.0)
    err, old_err = _monai_case(nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2),
                               "class_layers.relu", (64, 64, 64), (46, 46, 46), offset, stride)
    assert err <= 2.0, err


@pytest.mark.slow
def test_world_mm_planted_sphere_through_explain_volume_on_a_monai_resnet(tmp_path):
    # anisotropic LPS scan, resampled to 2 mm and padded/cropped to 48^3; ResNet10 layer2 has strided
    # 3x3 convolutions (centre 4 i by the formula, where align_corners=False puts 4 i + 1.5)
    spacing, centre = np.array([0.9, 1.2, 2.5]), np.array([3.0, -12.0, 25.0])
    shape = (96, 72, 36)
    affine = make_affine(np.diag(spacing * [-1, -1, 1]), centre, shape)
    sphere = centre + np.array([-11.0, 14.0, -9.0])
    data = sphere_volume(affine, shape, sphere, radius=4.0, fg=400.0, bg=-1000.0)
    vol = medcam3d.load_volume(_nifti(tmp_path, data, affine))
    model = uniform_(_gap_after(nets.resnet10(spatial_dims=3, n_input_channels=1, num_classes=2), "layer2", 128))
    chain = [
        {"name": "Orientation", "axcodes": "RAS"},
        {"name": "Spacing", "pixdim": [2.0, 2.0, 2.0], "mode": "bilinear"},
        {"name": "ScaleIntensityRange", "a_min": -1000, "a_max": 400, "b_min": 0.0, "b_max": 1.0, "clip": True},
        {"name": "ResizeWithPadOrCrop", "spatial_size": [48, 48, 48]},
    ]
    expl = medcam3d.explain_volume(model, vol, chain, target_layer="layer2", class_idx=0)
    m = expl.maps[0].numpy().astype(np.float64)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    com = affine[:3, :3] @ (ijk.T @ m.reshape(-1) / m.sum()) + affine[:3, 3]
    assert np.linalg.norm(com - sphere) <= 2 * 2.0, (com, sphere)  # within two 2 mm model voxels


@pytest.mark.parametrize("k,s,p,op", [(2, 2, 0, 0), (3, 2, 1, 1), (4, 2, 1, 0)])
def test_probe_transposed_convolution_is_the_periodic_one(k, s, p, op):
    # oracle: torch's own conv_transpose3d on the input tiled 3x, middle period (shifted by the padding)
    from medcam3d.engine.geometry import _probe_copy

    probe, _ = _probe_copy(nn.Sequential(nn.ConvTranspose3d(1, 2, k, s, p, op)), torch.float64)
    x = torch.rand(1, 1, 6, 5, 4, dtype=torch.float64)
    w = torch.full((1, 1, k, k, k), 1.0 / k**3, dtype=torch.float64)
    full = F.conv_transpose3d(x.repeat(1, 1, 3, 3, 3), w, None, s, 0)
    n = [d * s for d in x.shape[2:]]
    ref = full[(0, 0, *[slice(m + p, 2 * m + p) for m in n])]
    out = probe(x)
    assert out.shape == (1, 2, *n)
    torch.testing.assert_close(out[0, 0], ref)
    torch.testing.assert_close(out[0, 1], ref)

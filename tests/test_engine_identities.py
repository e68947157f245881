"""The paper's identities: completeness for a linear head, equality with CAM for a GAP head."""

from __future__ import annotations

import pytest
import torch

import medcam3d
from engine_models import FlattenHead, GapHead


@pytest.fixture
def flatten_model():
    torch.manual_seed(0)
    return FlattenHead(spatial=(4, 5, 3), n_classes=3)


def test_hirescam_sums_to_logit_minus_bias_for_flatten_fc(flatten_model):
    x = torch.randn(2, 1, 4, 5, 3)
    res = medcam3d.HiResCAM(flatten_model, "features")(x, "all")
    map_sum = res.raw.double().sum(dim=(2, 3, 4))
    expected = (res.logits.double() - flatten_model.fc.bias.detach().double())
    assert res.raw.shape == (2, 3, 4, 5, 3)
    assert torch.allclose(map_sum, expected, rtol=1e-5, atol=1e-6)


def test_hirescam_raw_is_weights_times_activation(flatten_model):
    """For y = W.flatten(A) + b, dy_k/dA = W_k, so HiResCAM raw = sum_c W_k[c] * A[c] exactly."""
    x = torch.randn(1, 1, 4, 5, 3)
    res = medcam3d.HiResCAM(flatten_model, "features")(x, [0, 2])
    a = flatten_model.features(x).detach()
    for j, k in enumerate([0, 2]):
        w = flatten_model.fc.weight.detach()[k].reshape(a.shape[1:])
        assert torch.allclose(res.raw[0, j], (w * a[0]).sum(0), atol=1e-6)


def test_gradcam_breaks_completeness_for_flatten_fc(flatten_model):
    x = torch.randn(2, 1, 4, 5, 3)
    hires = medcam3d.completeness_gap(medcam3d.HiResCAM(flatten_model, "features"), x, "all")
    grad = medcam3d.completeness_gap(medcam3d.GradCAM(flatten_model, "features"), x, "all")
    assert hires.holds(rtol=1e-4)
    assert float(hires.relative_gap.max()) < 1e-4
    assert not grad.holds(rtol=1e-2)
    assert float(grad.relative_gap.max()) > 0.05


def test_completeness_score_at_zero_is_the_bias(flatten_model):
    x = torch.randn(2, 1, 4, 5, 3)
    c = medcam3d.completeness_gap(medcam3d.HiResCAM(flatten_model, "features"), x, [1])
    assert torch.allclose(c.score_at_zero, flatten_model.fc.bias.detach()[1].expand(2, 1))


def test_gradcam_highlights_locations_with_zero_weight():
    """Zero the FC weights of half the volume: HiResCAM is exactly 0 there, Grad-CAM is not."""
    torch.manual_seed(1)
    model = FlattenHead(spatial=(4, 4, 4), n_classes=2)
    with torch.no_grad():
        w = model.fc.weight.view(2, 4, 4, 4, 4)
        w[:, :, 2:] = 0.0  # depth half 2: positions the score ignores
        w[:, :, :2] = w[:, :, :2].abs()
    x = torch.rand(1, 1, 4, 4, 4) + 0.5
    hires = medcam3d.HiResCAM(model, "features")(x, 0)
    grad = medcam3d.GradCAM(model, "features")(x, 0)
    assert torch.count_nonzero(hires.raw[0, 0, 2:]) == 0
    assert float(grad.raw[0, 0, 2:].abs().max()) > 1e-3


@pytest.mark.parametrize("dims,shape", [(3, (6, 5, 4)), (2, (7, 9))])
def test_gap_head_hirescam_equals_gradcam_equals_cam_over_positions(dims, shape):
    torch.manual_seed(2)
    model = GapHead(dims=dims, n_classes=3)
    x = torch.randn(2, 1, *shape)
    hires = medcam3d.HiResCAM(model, "features")(x, "all")
    grad = medcam3d.GradCAM(model, "features")(x, "all")
    a = model.features(x).detach()
    cam = torch.einsum("kc,bc...->bk...", model.fc.weight.detach(), a)
    positions = a[0, 0].numel()
    assert torch.allclose(hires.raw, grad.raw, atol=1e-6)
    assert torch.allclose(hires.raw, cam / positions, atol=1e-6)


def test_maps_are_relu_then_trilinear_of_raw():
    torch.manual_seed(3)
    model = GapHead(n_classes=2)
    pooled = torch.nn.Sequential(torch.nn.MaxPool3d(2))
    x = torch.randn(1, 1, 8, 8, 6)

    class Down(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pool, self.inner = pooled, model

        def forward(self, x):
            return self.inner(self.pool(x))

    res = medcam3d.HiResCAM(Down(), "inner.features")(x, "all")
    assert res.raw.shape == (1, 2, 4, 4, 3)
    expected = torch.nn.functional.interpolate(
        res.raw.clamp_min(0), size=(8, 8, 6), mode="trilinear", align_corners=False
    )
    assert res.maps.dtype == torch.float32
    assert res.maps.shape == (1, 2, 8, 8, 6)
    # kernel = stride: the measured receptive-field centres (2 i + 0.5) are where interpolate's
    # align_corners=False convention puts the cells, so the two placements agree (to float round-off)
    assert res.geometry.stride == pytest.approx((2, 2, 2)) and res.geometry.offset == pytest.approx((0.5,) * 3)
    torch.testing.assert_close(res.maps, expected, rtol=1e-6, atol=1e-7)
    assert float(res.maps.min()) >= 0

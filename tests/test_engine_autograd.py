"""Raw maps equal an independent autograd computation, class by class, on real MONAI networks."""

from __future__ import annotations

import pytest
import torch
from monai.networks import nets

import medcam3d
from engine_models import reference_maps


def _densenet3d():
    return nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=4), "class_layers.relu", (32, 32, 32)


def _resnet18():
    return nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=4), "layer4", (32, 32, 32)


def _resnet18_layer3():
    return nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=4), "layer3", (32, 32, 32)


def _seresnet50():
    return nets.SEResNet50(spatial_dims=3, in_channels=1, num_classes=4), "layer4", (32, 32, 32)


def _densenet2d():
    return nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=4), "class_layers.relu", (64, 64)


def _densenet2d_inner():
    return nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=4), "features.transition2", (64, 64)


CASES = {
    "densenet121_3d": _densenet3d,
    "resnet18_3d": _resnet18,
    "resnet18_3d_layer3": _resnet18_layer3,
    "seresnet50_3d": _seresnet50,
    "densenet121_2d": _densenet2d,
    "densenet121_2d_transition2": _densenet2d_inner,
}


@pytest.mark.parametrize("case", list(CASES))
def test_raw_equals_independent_autograd_for_every_class(case):
    torch.manual_seed(0)
    model, layer_name, shape = CASES[case]()
    model.eval()
    x = torch.randn(2, 1, *shape)
    layer = dict(model.named_modules())[layer_name]
    ref_hires, ref_grad, ref_out = reference_maps(model, layer, x, [0, 1, 2, 3])

    for cls, ref in ((medcam3d.HiResCAM, ref_hires), (medcam3d.GradCAM, ref_grad)):
        res = cls(model, layer_name)(x, "all")
        assert res.raw.dtype == torch.float32
        assert res.raw.shape == ref.shape
        scale = float(ref.abs().max())
        assert scale > 0
        assert torch.allclose(res.raw.double(), ref, atol=1e-4 * scale, rtol=1e-4), case
        assert torch.allclose(res.logits, ref_out.float(), atol=1e-5)
        assert torch.equal(res.class_idx, torch.arange(4).expand(2, 4))
        assert res.batched_backward


def test_default_target_layers_for_monai_networks():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, 32, 32)
    expected = {
        "DenseNet121": (nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2), "class_layers.relu"),
        "DenseNet169": (nets.DenseNet169(spatial_dims=3, in_channels=1, out_channels=2), "class_layers.relu"),
        "ResNet10": (nets.resnet10(spatial_dims=3, n_input_channels=1, num_classes=2), "layer4"),
        "SEResNet50": (nets.SEResNet50(spatial_dims=3, in_channels=1, num_classes=2), "layer4"),
        "EfficientNetBN": (
            nets.EfficientNetBN("efficientnet-b0", spatial_dims=3, in_channels=1, num_classes=2, pretrained=False),
            "_avg_pooling:input",
        ),
        "Classifier": (nets.Classifier(in_shape=(1, 32, 32, 32), classes=2, channels=(4, 8), strides=(2, 2)), "net"),
    }
    for name, (model, layer) in expected.items():
        res = medcam3d.HiResCAM(model)(x, "all")
        assert res.target_layer == layer, name
        assert res.maps.shape == (1, 2, 32, 32, 32)
        assert medcam3d.completeness_gap(medcam3d.HiResCAM(model), x, "all").holds(rtol=1e-3), name


def test_default_for_unknown_cnn_is_last_spatial_layer():
    model = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(4, 6, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool3d(1),  # emits (B, C, 1, 1, 1): not a usable map
        torch.nn.Flatten(),
        torch.nn.Linear(6, 3),
    )
    res = medcam3d.HiResCAM(model)(torch.randn(2, 1, 8, 8, 8), "all")
    assert res.target_layer == "3"
    assert res.raw.shape == (2, 3, 4, 4, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_autocast_accumulates_in_float32():
    torch.manual_seed(0)
    model = nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=4).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    cpu = medcam3d.HiResCAM(model, "layer4")(x, "all")
    gpu_model = model.cuda()
    gpu = medcam3d.HiResCAM(gpu_model, "layer4")(x.cuda(), "all")
    assert torch.allclose(gpu.raw.cpu(), cpu.raw, atol=1e-3 * float(cpu.raw.abs().max()))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        amp = medcam3d.HiResCAM(gpu_model, "layer4")(x.cuda(), "all")
    assert amp.raw.dtype == torch.float32 and amp.maps.dtype == torch.float32
    corr = torch.corrcoef(torch.stack([amp.raw.flatten().cpu(), cpu.raw.flatten()]))[0, 1]
    assert corr > 0.98

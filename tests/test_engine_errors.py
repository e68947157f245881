"""Bad input becomes one clear error of a documented type."""

from __future__ import annotations

import pytest
import torch
from monai.networks import nets

import medcam3d
from medcam3d.errors import ClassIndexError, InputError, Medcam3dError, TargetLayerError


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return nets.resnet10(spatial_dims=3, n_input_channels=1, num_classes=3)


X = torch.randn(1, 1, 32, 32, 32)


def test_error_types_are_documented_subclasses():
    assert issubclass(InputError, ValueError) and issubclass(InputError, Medcam3dError)
    assert issubclass(TargetLayerError, ValueError) and issubclass(TargetLayerError, Medcam3dError)
    assert issubclass(ClassIndexError, IndexError) and issubclass(ClassIndexError, Medcam3dError)


@pytest.mark.parametrize(
    "x,fragment",
    [
        (torch.randn(32, 32, 32), "x[None, None]"),
        (torch.randn(1, 1, 2, 2, 2, 2), "2 or 3 spatial dims"),
        (torch.randn(1, 1, 16), "2 or 3 spatial dims"),
        (torch.zeros(1, 1, 8, 8, 8, dtype=torch.int16), "floating-point"),
        (torch.full((1, 1, 8, 8, 8), float("nan")), "NaN"),
        ([[1.0]], "torch.Tensor"),
    ],
)
def test_bad_input_tensor(resnet, x, fragment):
    with pytest.raises(InputError, match=None) as info:
        medcam3d.HiResCAM(resnet, "layer4")(x)
    assert fragment in str(info.value)


def test_unknown_layer_name_fails_at_construction_with_hints(resnet):
    with pytest.raises(TargetLayerError) as info:
        medcam3d.HiResCAM(resnet, "layer5")
    message = str(info.value)
    assert "'layer5'" in message and "named_modules" in message


def test_module_not_in_model(resnet):
    with pytest.raises(TargetLayerError, match="not part of"):
        medcam3d.HiResCAM(resnet, torch.nn.Conv3d(1, 1, 1))


@pytest.mark.parametrize("bad,exc,fragment", [
    (3, ClassIndexError, "3 output(s), valid indices are 0..2"),
    ([0, 5], ClassIndexError, "class index 5 is out of range"),
    (-1, ClassIndexError, "out of range"),
    (True, InputError, "not True"),
    ("some", InputError, "'all' or None"),
    ([], InputError, "non-empty"),
    ([0.5], InputError, "integers"),
])
def test_bad_class_index(resnet, bad, exc, fragment):
    with pytest.raises(exc) as info:
        medcam3d.HiResCAM(resnet, "layer4")(X, bad)
    assert fragment in str(info.value)


def test_layer_without_spatial_map(resnet):
    with pytest.raises(TargetLayerError) as info:
        medcam3d.HiResCAM(resnet, "fc")(X)
    assert "emits a tensor of shape (1, 3), not a (B, C, *spatial) map" in str(info.value)


def test_flatten_layer_of_densenet_is_refused():
    model = nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2)
    with pytest.raises(TargetLayerError, match="before global pooling"):
        medcam3d.HiResCAM(model, "class_layers.flatten")(X)


def test_module_running_twice_is_refused():
    model = nets.EfficientNetBN("efficientnet-b0", spatial_dims=3, in_channels=1, num_classes=2, pretrained=False)
    with pytest.raises(TargetLayerError, match="more than once"):
        medcam3d.HiResCAM(model, "_swish")(X)


class TinyViT(torch.nn.Module):
    """Patch embedding (the only spatial map) followed by a transformer encoder: not a CNN."""

    def __init__(self):
        super().__init__()
        self.patch = torch.nn.Conv3d(1, 32, kernel_size=8, stride=8)
        self.encoder = torch.nn.TransformerEncoder(
            torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=256, batch_first=True),
            num_layers=3,
        )
        self.head = torch.nn.Linear(32, 2)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.encoder(tokens).mean(dim=1))


def test_vit_has_no_usable_default_layer():
    with pytest.raises(TargetLayerError, match="transformer"):
        medcam3d.HiResCAM(TinyViT())(X)


def test_mlp_has_no_spatial_layer():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 2))
    with pytest.raises(TargetLayerError, match="no layer that emits"):
        medcam3d.HiResCAM(model)(torch.randn(1, 1, 8, 8, 8))


def test_model_returning_a_tuple(resnet):
    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = resnet

        def forward(self, x):
            return self.net(x), None

    with pytest.raises(InputError, match="returned a tuple"):
        medcam3d.HiResCAM(Pair(), "net.layer4")(X)


def test_unknown_method_name(resnet):
    with pytest.raises(InputError, match="hirescam, gradcam"):
        medcam3d.make_cam("scorecam", resnet)

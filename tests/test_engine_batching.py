"""All classes from one pass equal the per-class loop; batches with different argmax per sample."""

from __future__ import annotations

import pytest
import torch
from monai.networks import nets

import medcam3d
from engine_models import FlattenHead


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=5).eval()


@pytest.mark.parametrize("method", [medcam3d.HiResCAM, medcam3d.GradCAM])
@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_all_classes_equal_per_class_loop(resnet, method, layer):
    x = torch.randn(2, 1, 32, 32, 32)
    cam = method(resnet, layer)
    together = cam(x, "all")
    for k in range(5):
        single = cam(x, k)
        assert torch.allclose(together.raw[:, k], single.raw[:, 0], atol=1e-5, rtol=1e-4)
        assert torch.allclose(together.maps[:, k], single.maps[:, 0], atol=1e-5, rtol=1e-4)
        assert torch.equal(single.class_idx, torch.full((2, 1), k))


def test_chunked_backward_equals_single_batch(resnet):
    x = torch.randn(1, 1, 32, 32, 32)
    full = medcam3d.HiResCAM(resnet, "layer3")(x, "all")
    chunked = medcam3d.HiResCAM(resnet, "layer3", max_classes_per_backward=2)(x, "all")
    assert torch.allclose(full.raw, chunked.raw, atol=1e-6)


def test_loop_fallback_when_batched_vjp_is_unsupported(resnet, monkeypatch):
    x = torch.randn(1, 1, 32, 32, 32)
    expected = medcam3d.HiResCAM(resnet, "layer4")(x, [0, 3])
    real_grad = torch.autograd.grad

    def no_vmap(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("Batching rule not implemented for aten::something")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    got = medcam3d.HiResCAM(resnet, "layer4")(x, [0, 3])
    assert not got.batched_backward
    assert torch.allclose(got.raw, expected.raw, atol=1e-6)


def test_one_forward_and_one_backward_for_all_classes(resnet):
    """Count forward calls of the model and autograd.grad calls for K=5."""
    x = torch.randn(1, 1, 32, 32, 32)
    calls = {"forward": 0}
    handle = resnet.register_forward_pre_hook(lambda m, i: calls.__setitem__("forward", calls["forward"] + 1))
    grads = []
    real_grad = torch.autograd.grad

    def counting(*args, **kwargs):
        grads.append(kwargs.get("is_grads_batched", False))
        return real_grad(*args, **kwargs)

    try:
        torch.autograd.grad = counting
        medcam3d.HiResCAM(resnet, "layer4")(x, "all")
    finally:
        torch.autograd.grad = real_grad
        handle.remove()
    assert calls["forward"] == 1
    assert grads == [True]


def test_batch_with_different_argmax_per_sample():
    torch.manual_seed(0)
    model = FlattenHead(spatial=(4, 4, 4), n_classes=3)
    # Make the classes read disjoint regions so a bright region decides the argmax.
    with torch.no_grad():
        model.features[0].weight.zero_()
        model.features[0].weight[:, :, 1, 1, 1] = 1.0
        model.features[0].bias.zero_()
        w = torch.zeros(3, 4, 4, 4, 4)
        w[0, :, 0] = 1.0
        w[1, :, 1] = 1.0
        w[2, :, 3] = 1.0
        model.fc.weight.copy_(w.flatten(1))
        model.fc.bias.zero_()
    x = torch.zeros(3, 1, 4, 4, 4)
    x[0, 0, 0] = 1.0  # class 0
    x[1, 0, 3] = 1.0  # class 2
    x[2, 0, 1] = 1.0  # class 1
    cam = medcam3d.HiResCAM(model, "features")
    res = cam(x, None)
    assert res.class_idx.tolist() == [[0], [2], [1]]
    for b, k in enumerate([0, 2, 1]):
        single = cam(x[b : b + 1], k)
        assert torch.allclose(res.raw[b, 0], single.raw[0, 0], atol=1e-6)
        assert torch.allclose(res.logits[b, 0], res.outputs[b].max())
    # Per-sample class lists as a (B, K) nested sequence
    per_sample = cam(x, [[0, 1], [2, 0], [1, 2]])
    assert per_sample.class_idx.tolist() == [[0, 1], [2, 0], [1, 2]]
    assert torch.allclose(per_sample.raw[1, 0], single_raw(cam, x[1:2], 2), atol=1e-6)


def single_raw(cam, x, k):
    return cam(x, k).raw[0, 0]

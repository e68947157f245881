"""The explainer leaves no trace on the model: parameters, grads, hooks, flags, modes, memory."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from monai.networks import nets

import medcam3d
from medcam3d.errors import ClassIndexError


def _snapshot(model: torch.nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {
            n: (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(getattr(m, "_backward_pre_hooks", {})),
            )
            for n, m in model.named_modules()
        },
    }


def _assert_same(before: dict, after: dict) -> None:
    for key in ("requires_grad", "training", "hooks"):
        assert before[key] == after[key], key
    for key in ("params", "buffers"):
        for name, value in before[key].items():
            assert torch.equal(value, after[key][name]), f"{key} {name}"
    for name, g in before["grads"].items():
        if g is None:
            assert after["grads"][name] is None, name
        else:
            assert torch.equal(g, after["grads"][name]), name


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=3)
    m.train()  # BatchNorm in train mode would update running stats if we forgot eval()
    m.layer1.eval()  # a mixed state must come back mixed
    m.conv1.weight.requires_grad_(False)  # a frozen parameter must stay frozen
    m.fc.weight.grad = torch.full_like(m.fc.weight, 0.5)  # existing grads must stay untouched
    return m


def test_state_unchanged_after_success(model):
    before = _snapshot(model)
    res = medcam3d.HiResCAM(model, "layer4")(torch.randn(2, 1, 32, 32, 32), "all")
    assert res.raw.shape == (2, 3, 2, 2, 2)
    _assert_same(before, _snapshot(model))


def test_state_unchanged_after_exception_in_selection(model):
    before = _snapshot(model)
    with pytest.raises(ClassIndexError):
        medcam3d.GradCAM(model, "layer4")(torch.randn(1, 1, 32, 32, 32), [0, 7])
    _assert_same(before, _snapshot(model))


def test_state_unchanged_after_exception_inside_forward(model):
    class Boom(Exception):
        pass

    def explode(_m, _i, _o):
        raise Boom("fails after the target layer")

    handle = model.fc.register_forward_hook(explode)
    before = _snapshot(model)
    with pytest.raises(Boom):
        medcam3d.HiResCAM(model, "layer4")(torch.randn(1, 1, 32, 32, 32), "all")
    _assert_same(before, _snapshot(model))
    handle.remove()


def test_never_populates_parameter_grads():
    torch.manual_seed(0)
    model = nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2)
    medcam3d.HiResCAM(model)(torch.randn(1, 1, 32, 32, 32), "all")
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_works_under_no_grad_and_inference_mode():
    torch.manual_seed(0)
    model = nets.resnet10(spatial_dims=3, n_input_channels=1, num_classes=2)
    x = torch.randn(1, 1, 32, 32, 32)
    ref = medcam3d.HiResCAM(model)(x, "all").raw
    with torch.no_grad():
        assert torch.allclose(medcam3d.HiResCAM(model)(x, "all").raw, ref)
    with torch.inference_mode():
        got = medcam3d.HiResCAM(model)(x.clone(), "all").raw
    assert torch.allclose(got, ref)


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on some module proxies warns
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_repeated_calls_do_not_grow_memory():
    torch.manual_seed(0)
    model = nets.resnet10(spatial_dims=3, n_input_channels=1, num_classes=3)
    cam = medcam3d.HiResCAM(model, "layer4")
    x = torch.randn(1, 1, 16, 16, 16)
    for _ in range(5):
        cam(x, "all").maps
    baseline = _live_tensors()
    for _ in range(100):
        res = cam(x, "all")
        res.maps
    del res
    assert _live_tensors() <= baseline + 2


def test_bfloat16_autocast_accumulates_in_float32():
    torch.manual_seed(0)
    model = nets.resnet10(spatial_dims=3, n_input_channels=1, num_classes=3).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    ref = medcam3d.HiResCAM(model, "layer3")(x, "all")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = medcam3d.HiResCAM(model, "layer3")(x, "all")
    assert amp.raw.dtype == torch.float32 and amp.maps.dtype == torch.float32
    assert amp.logits.dtype == torch.float32
    corr = torch.corrcoef(torch.stack([amp.raw.flatten(), ref.raw.flatten()]))[0, 1]
    assert corr > 0.95

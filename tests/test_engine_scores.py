"""Explanation targets (scores), extra forward inputs, half precision, compiled models and the OOM path,
each against plain autograd on the full graph."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

import medcam3d
from medcam3d.engine import OutputKey, RegionScore, Similarity, completeness_gap
from engine_models import GapHead


def _oracle_hires(model, layer, x, score_of_output, k, *args, **kwargs):
    """sum_c dS_k/dA * A with plain autograd on the full graph (parameters untouched)."""
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        out = model(x, *args, **kwargs)
    finally:
        handle.remove()
    s = score_of_output(out)[:, k].sum()
    (g,) = torch.autograd.grad(s, store["a"])
    return (g * store["a"]).sum(1).detach()


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = GapHead(dims=3)

    def forward(self, x):
        a = self.net.features(x)
        return a.mean(), self.net.fc(a.flatten(2).mean(2))


class DictOut(TupleOut):
    def forward(self, x):
        a = self.net.features(x)
        return {"aux": a, "logits": self.net.fc(a.flatten(2).mean(2))}


@pytest.mark.parametrize("model,key", [(TupleOut(), 1), (DictOut(), "logits")])
def test_output_key_explains_one_entry(model, key):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 6, 6, 6)
    res = medcam3d.HiResCAM(model, "net.features")(x, 2, score=OutputKey(key))
    expected = _oracle_hires(model, model.net.features, x, lambda o: o[key], 2)
    torch.testing.assert_close(res.raw[:, 0], expected, rtol=1e-4, atol=1e-6)


def test_output_key_names_available_entries():
    with pytest.raises(medcam3d.InputError, match="available"):
        medcam3d.HiResCAM(DictOut(), "net.features")(torch.randn(1, 1, 6, 6, 6), score=OutputKey("nope"))


def test_tuple_output_without_score_says_what_to_do():
    with pytest.raises(medcam3d.InputError, match="OutputKey"):
        medcam3d.HiResCAM(TupleOut(), "net.features")(torch.randn(1, 1, 6, 6, 6))


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0).eval()


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_region_score_on_monai_unet_matches_autograd(unet, reduce):
    x = torch.randn(1, 1, 16, 16, 16)
    mask = torch.zeros(16, 16, 16, dtype=torch.bool)
    mask[4:9, 5:11, 6:10] = True
    layer = "model.1.submodule"

    def by_hand(out):
        inside = out[:, :, mask]  # (B, C, n)
        return inside.mean(2) if reduce == "mean" else inside.sum(2)

    res = medcam3d.HiResCAM(unet, layer)(x, 1, score=RegionScore(mask, reduce=reduce))
    expected = _oracle_hires(unet, unet.model[1].submodule, x, by_hand, 1)
    torch.testing.assert_close(res.raw[:, 0], expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.logits[:, 0], by_hand(unet(x))[:, 1].detach(), rtol=1e-5, atol=1e-6)


def test_region_box_equals_mask_and_completeness_at_final_conv_input(unet):
    x = torch.randn(1, 1, 16, 16, 16)
    mask = torch.zeros(16, 16, 16, dtype=torch.bool)
    mask[2:7, 3:9, 4:12] = True
    by_box = medcam3d.HiResCAM(unet, "model.2.conv:input")(x, 0, score=RegionScore(box=[(2, 7), (3, 9), (4, 12)]))
    by_mask = medcam3d.HiResCAM(unet, "model.2.conv:input")(x, 0, score=RegionScore(mask))
    torch.testing.assert_close(by_box.raw, by_mask.raw)
    # The final (transposed) convolution is linear in its input, and the region mean is linear in
    # the logits, so the signed map sums to S(A) - S(0).
    c = completeness_gap(medcam3d.HiResCAM(unet, "model.2.conv:input"), x, 0, score=RegionScore(mask))
    assert c.holds()


def test_region_score_refuses_empty_and_misplaced_regions(unet):
    with pytest.raises(medcam3d.InputError, match="empty"):
        RegionScore(torch.zeros(4, 4, 4))
    with pytest.raises(medcam3d.InputError, match="output grid"):
        medcam3d.HiResCAM(unet, "model.1.submodule")(torch.randn(1, 1, 16, 16, 16), 0, score=RegionScore(torch.ones(8, 8, 8)))


class Encoder(nn.Module):
    """conv -> ReLU -> [features] -> GAP -> Linear: an embedding with no head."""

    def __init__(self, bias: bool):
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(1, 5, 3, padding=1), nn.ReLU())
        self.proj = nn.Linear(5, 4, bias=bias)

    def forward(self, x):
        return self.proj(self.features(x).flatten(2).mean(2))


@pytest.mark.parametrize("kind", ["cosine", "dot"])
def test_similarity_matches_autograd(kind):
    torch.manual_seed(1)
    enc = Encoder(bias=True).eval()
    x = torch.randn(2, 1, 6, 6, 6)
    ref = torch.randn(2, 4)
    sim = Similarity(ref, kind=kind)

    def by_hand(e):
        if kind == "dot":
            return e @ ref.T
        return (e @ ref.T) / e.norm(dim=1, keepdim=True) / ref.norm(dim=1)[None]

    res = medcam3d.HiResCAM(enc, "features")(x, "all", score=sim)
    for k in range(2):
        expected = _oracle_hires(enc, enc.features, x, by_hand, k)
        torch.testing.assert_close(res.raw[:, k], expected, rtol=1e-4, atol=1e-6)


def test_cosine_map_sum_is_minus_gradient_dot_bias():
    """Euler: cos is 0-homogeneous in e = W A + b, so sum(raw) = <dS/de, e - b> = -<dS/de, b>."""
    torch.manual_seed(2)
    x = torch.randn(2, 1, 6, 6, 6)
    ref = torch.randn(4)
    free = Encoder(bias=False).eval()
    res = medcam3d.HiResCAM(free, "features")(x, 0, score=Similarity(ref))
    assert res.raw.sum(dim=(2, 3, 4)).abs().max() < 1e-5 * res.raw.abs().sum()
    biased = Encoder(bias=True).eval()
    res = medcam3d.HiResCAM(biased, "features")(x, 0, score=Similarity(ref))
    e = biased(x).detach().requires_grad_(True)
    s = Similarity(ref)(e)[:, 0].sum()
    (ds_de,) = torch.autograd.grad(s, e)
    expected = -(ds_de * biased.proj.bias.detach()).sum(1)
    torch.testing.assert_close(res.raw.sum(dim=(2, 3, 4))[:, 0], expected, rtol=1e-4, atol=1e-6)


class Clinical(nn.Module):
    """forward(x, clinical, *, scale): image features and clinical variables meet in the head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4 + 2, 3)

    def forward(self, x, clinical, *, scale=1.0):
        pooled = self.features(x).flatten(2).mean(2)
        return self.fc(torch.cat([pooled * scale, clinical], dim=1))


def test_extra_forward_inputs_pass_through_to_the_model():
    torch.manual_seed(3)
    model = Clinical().eval()
    x = torch.randn(2, 1, 6, 6, 6)
    clinical = torch.randn(2, 2)
    res = medcam3d.HiResCAM(model)(x, "all", forward_args=(clinical,), forward_kwargs={"scale": 2.0})
    assert res.target_layer == "features"  # the default layer was probed with the extra inputs
    for k in range(3):
        expected = _oracle_hires(model, model.features, x, lambda o: o, k, clinical, scale=2.0)
        torch.testing.assert_close(res.raw[:, k], expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.outputs, model(x, clinical, scale=2.0).detach())


def test_missing_extra_input_is_the_models_own_error():
    with pytest.raises(TypeError, match="clinical"):
        medcam3d.HiResCAM(Clinical(), "features")(torch.randn(1, 1, 6, 6, 6))


def test_bf16_autocast_on_cpu_keeps_completeness_at_bf16_tolerance():
    torch.manual_seed(4)
    model = GapHead(dims=3).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    exact = medcam3d.HiResCAM(model, "features")(x, "all")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = completeness_gap(medcam3d.HiResCAM(model, "features"), x, "all")
        res = medcam3d.HiResCAM(model, "features")(x, "all")
    assert c.dtype == torch.bfloat16 and res.activation_dtype == torch.bfloat16
    assert c.holds()  # default tolerance follows the dtype (3e-2 for bfloat16)
    assert res.raw.dtype == torch.float32
    assert float((res.raw - exact.raw).abs().max()) < 0.05 * float(exact.raw.abs().max())


def test_compiled_model_is_explained_through_its_original_module():
    torch.manual_seed(5)
    model = GapHead(dims=3).eval()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(1, 1, 8, 8, 8)
    cam = medcam3d.HiResCAM(compiled)  # default layer: the probe runs on the original module
    assert cam.module is model
    res = cam(x, "all")
    expected = medcam3d.HiResCAM(model, "features")(x, "all")
    assert res.target_layer == "features"
    torch.testing.assert_close(res.raw, expected.raw)


def test_out_of_memory_in_batched_backward_is_raised_not_swallowed(monkeypatch):
    model = GapHead(dims=3).eval()
    real_grad = torch.autograd.grad

    def oom(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        medcam3d.HiResCAM(model, "features")(torch.randn(1, 1, 6, 6, 6), "all")

"""Every CAM method equals its published formula, written out plainly here from autograd gradients,
on a 3D and a 2D net; several methods share one forward and one backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import medcam3d
from medcam3d.engine import METHODS, BaseCAM, MultiCAM


class TwoStage(nn.Module):
    """conv -> ReLU -> [features] -> strided conv -> ReLU -> GAP -> FC: a head NON-linear in A, so
    the methods give different maps."""

    def __init__(self, dims: int, n_classes: int = 3) -> None:
        super().__init__()
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.features = nn.Sequential(conv(1, 4, 3, padding=1), nn.ReLU())
        self.mid = nn.Sequential(conv(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.mid(self.features(x)).flatten(2).mean(2))


SHAPES = {3: (2, 1, 8, 8, 8), 2: (2, 1, 12, 12)}


def _oracle_grads(model: nn.Module, x: torch.Tensor, classes: list[int]):
    """A (B, C, *s) and dS_k/dA for each k, float64 numpy, from plain autograd on the full graph."""
    store = {}
    handle = model.features.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        out = model(x)
    finally:
        handle.remove()
    a = store["a"]
    grads = [torch.autograd.grad(out[:, k].sum(), a, retain_graph=True)[0] for k in classes]
    return a.detach().double().numpy(), [g.double().numpy() for g in grads]


def _relu(v):
    return np.maximum(v, 0)


def _formula(method: str, a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The published formulas, per sample b and channel c, spelled out."""
    batch, chans = a.shape[:2]
    out = np.zeros((batch, *a.shape[2:]))
    for b in range(batch):
        for c in range(chans):
            A, G = a[b, c], g[b, c]
            if method == "gradcampp":  # Chattopadhay et al. eq. (19) with exp(S) cancelled
                num = G**2
                den = 2 * G**2 + A.sum() * G**3
                alpha = np.where(den != 0, num / np.where(den != 0, den, 1), 0)
                out[b] += (alpha * _relu(G)).sum() * A
            elif method == "xgradcam":  # Fu et al.: w = sum(A * G) / sum(A)
                out[b] += ((A * G).sum() / A.sum() if A.sum() != 0 else 0.0) * A
            elif method == "layercam":  # Jiang et al.: relu(G) * A
                out[b] += _relu(G) * A
            elif method == "gradcam_elementwise":  # ReLU before the channel sum
                out[b] += _relu(G * A)
            elif method == "hirescam":
                out[b] += G * A
            elif method == "gradcam":
                out[b] += G.mean() * A
    return out


@pytest.fixture(params=[3, 2], ids=["3d", "2d"])
def net_and_x(request):
    torch.manual_seed(request.param)
    model = TwoStage(request.param).eval()
    return model, torch.randn(*SHAPES[request.param])


@pytest.mark.parametrize(
    "method", ["gradcampp", "xgradcam", "layercam", "gradcam_elementwise", "hirescam", "gradcam"]
)
def test_gradient_methods_match_published_formula(net_and_x, method):
    model, x = net_and_x
    classes = [0, 2]
    a, grads = _oracle_grads(model, x, classes)
    res = medcam3d.make_cam(method, model, "features")(x, classes)
    for j, g in enumerate(grads):
        expected = _formula(method, a, g)
        np.testing.assert_allclose(res.raw[:, j].double().numpy(), expected, rtol=1e-4, atol=1e-6)
    assert res.method == method


def test_eigencam_is_projection_on_first_principal_direction(net_and_x):
    model, x = net_and_x
    a, _ = _oracle_grads(model, x, [0])
    res = medcam3d.EigenCAM(model, "features")(x, [0, 1])
    for b in range(x.shape[0]):
        o = a[b].reshape(a.shape[1], -1).T  # positions x channels
        _, vecs = np.linalg.eigh(o.T @ o)  # eigenvectors of O^T O = right-singular vectors of O
        m = o @ vecs[:, -1]
        m = m if m.sum() >= 0 else -m  # documented sign convention: non-negative sum
        for k in range(2):  # class-agnostic: same map for each class
            np.testing.assert_allclose(res.raw[b, k].reshape(-1).double().numpy(), m, rtol=1e-4, atol=1e-5)
    assert float(res.raw.sum()) >= 0


def test_gradient_x_input_at_the_input(net_and_x):
    model, x = net_and_x
    xr = x.clone().requires_grad_(True)
    out = model(xr)
    (g,) = torch.autograd.grad(out[:, 1].sum(), xr)
    expected = (g * x).sum(1)
    res = medcam3d.GradientXInput(model)(x, 1)
    assert res.target_layer == "<input>"
    assert res.raw.shape == (x.shape[0], 1, *x.shape[2:])
    torch.testing.assert_close(res.raw[:, 0], expected, rtol=1e-4, atol=1e-6)


def test_every_method_from_one_forward_and_one_backward(net_and_x, monkeypatch):
    model, x = net_and_x
    names = list(METHODS)
    alone = {m: medcam3d.make_cam(m, model, "features")(x, "all") for m in names}
    calls = {"forward": 0, "grad": 0}
    handle = model.register_forward_pre_hook(lambda m, i: calls.__setitem__("forward", calls["forward"] + 1))
    real_grad = torch.autograd.grad

    def counting(*args, **kwargs):
        calls["grad"] += 1
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    try:
        together = MultiCAM(model, names, "features")(x, "all")
    finally:
        handle.remove()
    assert calls == {"forward": 1, "grad": 1}
    assert list(together) == names
    for m in names:
        assert together[m].batched_backward
        torch.testing.assert_close(together[m].raw, alone[m].raw, rtol=1e-5, atol=1e-6)


def test_default_pair_shares_the_probe_and_the_pass(net_and_x):
    model, x = net_and_x
    multi = MultiCAM(model, ["hirescam", "gradcam"])  # default layer: probed once for both
    res = multi(x, "all")
    assert res["hirescam"].target_layer == res["gradcam"].target_layer
    assert multi.cams[0]._probed is multi.cams[1]._probed


def test_basecam_is_abstract():
    with pytest.raises(TypeError):
        BaseCAM(TwoStage(3))  # type: ignore[abstract]


@pytest.mark.parametrize("spelling", ["Grad-CAM++", "gradcam_plus_plus", "LayerCAM", "x-gradcam", "Eigen-CAM"])
def test_method_spellings(spelling):
    assert medcam3d.make_cam(spelling, TwoStage(3), "features").method in METHODS


def test_multicam_refuses_duplicates_and_unknown():
    with pytest.raises(medcam3d.InputError, match="twice"):
        MultiCAM(TwoStage(3), ["hirescam", "HiResCAM"])
    with pytest.raises(medcam3d.InputError, match="unknown method"):
        MultiCAM(TwoStage(3), ["hirescam", "scorecam"])

"""Small hand-built models with known heads, for the engine tests."""

from __future__ import annotations

import torch
from torch import nn


class FlattenHead(nn.Module):
    """conv -> ReLU -> [features] -> flatten -> FC: a head linear in the activation, with spatial weights."""

    def __init__(self, in_ch: int = 1, ch: int = 4, spatial: tuple[int, ...] = (4, 4, 4), n_classes: int = 3):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(spatial)]
        self.features = nn.Sequential(conv(in_ch, ch, 3, padding=1), nn.ReLU())
        self.flatten = nn.Flatten(1)
        n = ch
        for s in spatial:
            n *= s
        self.fc = nn.Linear(n, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.features(x)))


class GapHead(nn.Module):
    """conv -> ReLU -> [features] -> global average pool -> FC (the CAM architecture)."""

    def __init__(self, in_ch: int = 1, ch: int = 5, n_classes: int = 3, dims: int = 3):
        super().__init__()
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.features = nn.Sequential(conv(in_ch, ch, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(ch, n_classes)
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x)
        return self.fc(a.flatten(2).mean(dim=2))


def reference_maps(model: nn.Module, layer: nn.Module, x: torch.Tensor, classes: list[int]):
    """Independent HiResCAM / Grad-CAM raw maps with plain autograd on the full graph.

    For each class k: A = layer output (captured normally, parameters left as they are),
    g = d sum_b y[b, k] / dA. Returns (hires, gradcam) of shape (B, K, *spatial) in float64.
    """
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        model.eval()
        x = x.clone().requires_grad_(True)
        out = model(x)
    finally:
        handle.remove()
    a = store["a"]
    hires, grad = [], []
    for k in classes:
        (g,) = torch.autograd.grad(out[:, k].sum(), a, retain_graph=True)
        g64, a64 = g.double(), a.detach().double()
        hires.append((g64 * a64).sum(1))
        w = g64.mean(dim=tuple(range(2, g.ndim)), keepdim=True)
        grad.append((w * a64).sum(1))
    return torch.stack(hires, 1), torch.stack(grad, 1), out.detach()

"""Toy models whose evidence lies where we put it, so the truth about a map is known by construction.

``IntensityModel``: score = mean(ReLU(x)), so the HiResCAM map is ReLU(x) / N: exactly the scan's
positive voxels (a planted bright object on a negative background).

``SlabModel``: every voxel's feature is 1 (a 1x1x1 convolution with weight 0 and bias 1, then ReLU),
and output k is the mean feature inside slab k, a range of indices along model axis 0. The HiResCAM
map of output k is therefore positive exactly on slab k and zero elsewhere, whatever the input
values, so where its mass lies (padding or scan) is known from the preprocessing alone.
"""

from __future__ import annotations

import torch
from torch import nn


class SlabModel(nn.Module):
    def __init__(self, slabs: list[list[int]] | None = None) -> None:
        super().__init__()
        self.slabs = [tuple(s) for s in (slabs or [[0, 4], [12, 20]])]
        self.feat = nn.Conv3d(1, 1, 1)
        with torch.no_grad():
            self.feat.weight.zero_()
            self.feat.bias.fill_(1.0)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.feat(x))
        return torch.stack([a[:, 0, lo:hi].mean(dim=(1, 2, 3)) for lo, hi in self.slabs], dim=1)


class IntensityModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Conv3d(1, 1, 1, bias=False)
        with torch.no_grad():
            self.feat.weight.fill_(1.0)
        self.act = nn.ReLU()
        self.head = nn.Linear(1, 1)
        with torch.no_grad():
            self.head.weight.fill_(1.0)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.feat(x)).mean(dim=(2, 3, 4)).reshape(x.shape[0], 1))

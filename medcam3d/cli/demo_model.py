"""A fixed-weight "bright blob" detector: the stand-in demo model until a trained one is bundled.

It is NOT trained. Its layer ``features`` compares, at every voxel, the mean of a 1-voxel ball
(centre) with the mean of the shell 2-3 voxels away (surround) and fires where the centre is
clearly brighter than a dark surround: ``relu(centre - surround - threshold) * relu(dark - surround)``,
i.e. a small dense blob in aerated lung (a nodule), not large uniform tissue or the chest wall.
The head sums the feature map and applies one linear unit, so its HiResCAM map is exactly
``scale * feature``: it must sit on the planted lesion.
"""

from __future__ import annotations

import torch
from torch import nn


def _centre_surround_kernels(size: int = 7) -> torch.Tensor:
    """(2, 1, size, size, size): normalised centre ball (r <= 1) and surround shell (2 <= r <= 3)."""
    c = (size - 1) / 2
    ax = torch.arange(size, dtype=torch.float32) - c
    d = torch.sqrt(ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2)
    centre = (d <= 1.0).float()
    shell = ((d >= 2.0) & (d <= 3.0)).float()
    return torch.stack([centre / centre.sum(), shell / shell.sum()])[:, None]


class CentreSurround(nn.Module):
    """(B, 1, *s) -> (B, 1, *s) blob response (>= 0)."""

    def __init__(self, threshold: float = 0.3, dark: float = 0.4) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, kernel_size=7, padding=3, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(_centre_surround_kernels())
        self.threshold = threshold
        self.dark = dark

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        centre, surround = y[:, :1], y[:, 1:]
        return torch.relu(centre - surround - self.threshold) * torch.relu(self.dark - surround)


class BrightBlobDetector(nn.Module):
    """(B, 1, X, Y, Z) CT scaled to [0, 1] (-1000..400 HU) -> (B, 1) "nodule" logit.

    logit = scale * sum(features) + bias; the defaults give about -2 without a blob and > 0 with
    one on the synthetic chest CT at its default 5 x 5 x 6 mm grid.
    """

    def __init__(self, threshold: float = 0.3, dark: float = 0.4, scale: float = 20.0, bias: float = -2.0) -> None:
        super().__init__()
        self.features = CentreSurround(threshold, dark)
        self.fc = nn.Linear(1, 1)
        with torch.no_grad():
            self.fc.weight.fill_(scale)
            self.fc.bias.fill_(bias)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(2).sum(-1))

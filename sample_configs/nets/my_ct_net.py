"""A researcher's own 3D CT network, as ``sample_configs/own_model.yaml`` loads it by file path.

An encoder (three conv blocks, stride 2 each) with a linear-probe head on globally pooled features,
and a reconstruction decoder that was used only during pre-training (it never runs in ``forward``,
so a checkpoint without its weights still explains the classifier exactly).
"""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=False)
    )


class MyCTNet(nn.Module):
    """(B, 1, X, Y, Z) CT in [0, 1] -> (B, num_classes) logits. Target layer: ``encoder.2``."""

    def __init__(self, num_classes: int = 3, width: int = 16) -> None:
        super().__init__()
        self.encoder = nn.Sequential(_block(1, width), _block(width, 2 * width), _block(2 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Linear(4 * width, num_classes)
        self.decoder = nn.ConvTranspose3d(4 * width, 1, 8, stride=8)  # pre-training only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.encoder(x)).flatten(1))


def build_my_ct_net(num_classes: int = 3) -> MyCTNet:
    """A factory function (``_target_: nets/my_ct_net.py:build_my_ct_net`` with ``factory: true``)."""
    return MyCTNet(num_classes=num_classes)

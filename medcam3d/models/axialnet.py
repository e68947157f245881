"""An AxialNet-style 3D CT classifier: a 2D CNN on every axial slice, a per-slice FC head, mean over slices.

The architecture of Draelos & Carin's CT work ("AxialNet", in *Use HiResCAM instead of Grad-CAM for
faithful explanations of convolutional neural networks*, 2020/2021, and the RAD-ChestCT papers):

1. a 2D CNN runs on each axial "slice" (the volume's last axis, z in RAS index order), giving
   per-slice feature maps (C, h, w). As in the original AxialNet, which fed groups of three adjacent
   CT slices to an ImageNet CNN as the three colour channels, ``slab`` adjacent slices form one
   slice-image (``slab`` input channels), so the model has Z = (input slices) / slab slices;
2. they are stacked back into one volume of features ``A`` of shape (B, C, h, w, Z) — module
   :attr:`AxialNet.features`, the default target layer (:data:`AXIAL_TARGET_LAYER`);
3. a fully connected layer is applied to each slice's feature map as a convolution whose kernel is
   the whole slice feature map (Conv3d, kernel (h, w, 1)): one score per class and slice,
   ``s_kz = sum_{c,i,j} W[k,c,i,j] A[c,i,j,z] + b_k``;
4. the class score is the mean over the Z slices: ``y_k = (1/Z) sum_z s_kz``.

So ``y_k`` is linear in ``A`` with a weight per position (c, i, j), shared by all slices:
``dy_k/dA[c,i,j,z] = W[k,c,i,j] / Z``. HiResCAM's signed map ``sum_c A * dy/dA`` is therefore the
model's exact per-location contribution to ``y_k - b_k`` (it sums to it, per slice and in total),
while Grad-CAM's channel weights average ``W`` over the positions and put evidence on locations whose
weight is zero or negative (the paper's Section 3 argument).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: Default target layer of :class:`AxialNet`: the per-slice features stacked to (B, C, h, w, Z).
AXIAL_TARGET_LAYER = "features"


class SliceStack(nn.Module):
    """(B*Z, C, h, w) per-slice features -> (B, C, h, w, Z): the slices back in their volume order.

    A module of its own so that hooks (and explainers) see the features as one 3D map on the input's
    (x, y, z) axes: in-plane cells of the 2D CNN's stride, one cell per slab of ``slab`` input slices
    (slab s covers input slices s*slab .. s*slab + slab - 1, so its centre is where a resize with
    align_corners=False puts feature index s).
    """

    def forward(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        bz, c, h, w = x.shape
        return x.reshape(bz // depth, depth, c, h, w).permute(0, 2, 3, 4, 1)


class AxialNet(nn.Module):
    """AxialNet-style classifier for (B, 1, X, Y, Z) volumes (z = axial slice axis) -> (B, classes) logits.

    Args:
        slice_shape: (X, Y) voxels of one axial slice; fixed, because the per-slice FC has a weight per
            in-plane feature position.
        classes: number of outputs.
        channels: output channels of the 2D conv blocks (MONAI ``Convolution``, 3x3, batch norm, ReLU).
        strides: in-plane stride of each block; their product must divide X and Y.
        slab: adjacent input slices per slice-image (given to the 2D CNN as channels); must divide Z.

    Submodules: ``slice_cnn`` (2D, applied to every slice), ``features`` (:class:`SliceStack`, output
    (B, C, h, w, Z)), ``slice_fc`` (Conv3d, kernel (h, w, 1)).
    """

    def __init__(self, slice_shape: Sequence[int] = (64, 64), classes: int = 3, in_channels: int = 1,
                 channels: Sequence[int] = (16, 32, 32, 48), strides: Sequence[int] = (2, 2, 1, 1),
                 slab: int = 1) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution

        if len(channels) != len(strides) or not channels:
            raise ValueError("channels and strides must have the same, non-zero length")
        stride = 1
        for s in strides:
            stride *= int(s)
        if any(int(n) % stride for n in slice_shape):
            raise ValueError(f"slice_shape {tuple(slice_shape)} is not divisible by the total stride {stride}")
        if int(slab) < 1:
            raise ValueError(f"slab must be a positive integer, got {slab!r}")
        self.slab = int(slab)
        self.slice_shape = tuple(int(n) for n in slice_shape)
        self.feature_shape = tuple(n // stride for n in self.slice_shape)
        blocks, c_in = [], in_channels * self.slab
        for c_out, s in zip(channels, strides):
            blocks.append(Convolution(2, c_in, c_out, strides=int(s), kernel_size=3, act="RELU", norm="BATCH"))
            c_in = c_out
        self.slice_cnn = nn.Sequential(*blocks)
        self.features = SliceStack()
        self.slice_fc = nn.Conv3d(c_in, classes, kernel_size=(*self.feature_shape, 1))

    def slice_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, classes, Z) per-slice scores s_kz (their mean over z is the output; Z = input slices / slab)."""
        b, c, nx, ny, nz = x.shape
        if (nx, ny) != self.slice_shape:
            raise ValueError(f"AxialNet expects axial slices of {self.slice_shape} voxels, got {(nx, ny)}")
        if nz % self.slab:
            raise ValueError(f"AxialNet groups {self.slab} slices per slab; {nz} slices do not divide")
        z = nz // self.slab
        # (B, C, X, Y, Z*slab) -> (B*Z, C*slab, X, Y): slab s holds input slices s*slab .. s*slab+slab-1
        slices = x.reshape(b, c, nx, ny, z, self.slab).permute(0, 4, 1, 5, 2, 3).reshape(b * z, c * self.slab, nx, ny)
        feats = self.features(self.slice_cnn(slices), z)
        return self.slice_fc(feats).flatten(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.slice_scores(x).mean(dim=2)

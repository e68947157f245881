"""Shared pieces for the spatial tests (no tests here): a fixed-weight "bright blob" model, planted
spheres at known world positions, and world-coordinate helpers."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# Orientation RAS -> 2 mm iso -> CT window -> a fixed size that pads axis 0 and crops axis 1.
CHAIN = [
    {"name": "Orientation", "axcodes": "RAS"},
    {"name": "Spacing", "pixdim": [2.0, 2.0, 2.0], "mode": "bilinear"},
    {"name": "ScaleIntensityRange", "a_min": -1000, "a_max": 400, "b_min": 0.0, "b_max": 1.0, "clip": True},
    {"name": "ResizeWithPadOrCrop", "spatial_size": [40, 26, 36]},
]


class BlobModel(nn.Module):
    """Score = mean of ReLU(gaussian_smooth(x) - threshold): a detector of bright compact objects.

    Output 0 is that score; output 1 is its negative (its HiResCAM map is ReLU(-act) = 0 everywhere),
    so K = 2. Fixed weights: the map's peak is where the smoothed brightness peaks, i.e. the centre of
    a planted sphere.
    """

    def __init__(self, threshold: float = 0.8, sigma: float = 1.5, size: int = 7) -> None:
        super().__init__()
        self.smooth = nn.Conv3d(1, 1, size, padding=size // 2, bias=False)
        r = torch.arange(size, dtype=torch.float32) - size // 2
        g = torch.exp(-(r**2) / (2 * sigma**2))
        k = g[:, None, None] * g[None, :, None] * g[None, None, :]
        with torch.no_grad():
            self.smooth.weight.copy_(k / k.sum())
        self.threshold = threshold
        self.act = nn.ReLU()
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.smooth(x) - self.threshold)
        return self.head(a.mean(dim=(2, 3, 4)).reshape(x.shape[0], 1))


class RegionModel(nn.Module):
    """Score = mean of ReLU(x) inside a fixed box of the MODEL grid: the HiResCAM map is non-zero
    only inside that box, a region whose world position is known from the model grid's affine."""

    def __init__(self, shape: tuple[int, int, int], box: tuple[slice, slice, slice]) -> None:
        super().__init__()
        self.feat = nn.Conv3d(1, 1, 1, bias=False)
        with torch.no_grad():
            self.feat.weight.fill_(1.0)
        self.act = nn.ReLU()
        mask = torch.zeros(1, 1, *shape)
        mask[(0, 0, *box)] = 1.0
        self.register_buffer("mask", mask)
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0], [0.5]]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.feat(x)) * self.mask
        return self.head(a.mean(dim=(2, 3, 4)).reshape(x.shape[0], 1))


def world_grid(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(X, Y, Z, 3) world (mm) coordinates of every voxel centre."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def sphere_volume(
    affine: np.ndarray,
    shape: tuple[int, int, int],
    centre: np.ndarray,
    radius: float = 8.0,
    fg: float = 400.0,
    bg: float = -100.0,
) -> np.ndarray:
    """float32 HU array: ``fg`` inside a sphere of ``radius`` mm around world ``centre``, ``bg`` elsewhere."""
    d = np.linalg.norm(world_grid(affine, shape) - centre, axis=-1)
    return np.where(d <= radius, fg, bg).astype(np.float32)


def peak_world(volume_map: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World (mm) position of the argmax voxel of a 3D map."""
    ijk = np.array(np.unravel_index(int(np.argmax(volume_map)), volume_map.shape), dtype=np.float64)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def voxel_diagonal(affine: np.ndarray) -> float:
    """Length (mm) of one voxel's diagonal."""
    return float(np.linalg.norm(np.linalg.norm(affine[:3, :3], axis=0)))


def make_affine(columns: np.ndarray, centre_world: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Affine with voxel-axis direction*spacing ``columns`` (3x3, one column per voxel axis) whose
    volume centre lies at ``centre_world``."""
    a = np.eye(4)
    a[:3, :3] = columns
    mid = (np.array(shape, dtype=np.float64) - 1) / 2
    a[:3, 3] = centre_world - columns @ mid
    return a

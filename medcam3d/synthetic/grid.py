"""The voxel grid of a synthetic scan: shape, spacing, affine and broadcastable mm coordinates.

Anatomy is described in millimetres relative to the volume centre (RAS: +x towards the patient's
right, +y anterior, +z superior), so the same seed gives the same body at any resolution of the
same field of view. Coordinates are kept as broadcastable 1D arrays ((nx,1,1), (1,ny,1), (1,1,nz))
so 2D cross-sections and 1D profiles cost almost nothing and only true 3D shapes touch every voxel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medcam3d.errors import InputError

DEFAULT_SHAPE: tuple[int, int, int] = (64, 64, 48)
#: Field of view (mm) used to derive the spacing when none is given: (5, 5, 6) mm at the default shape.
DEFAULT_FOV_MM: tuple[float, float, float] = (320.0, 320.0, 288.0)
#: World (scanner) position, in mm, of the volume centre; makes the affine's origin non-zero.
WORLD_CENTRE_MM: tuple[float, float, float] = (0.0, -20.0, -180.0)


@dataclass(frozen=True)
class Grid:
    """A RAS voxel grid; ``x``, ``y``, ``z`` are voxel-centre coordinates in mm from the centre."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    x: np.ndarray  # (nx, 1, 1) float32
    y: np.ndarray  # (1, ny, 1) float32
    z: np.ndarray  # (1, 1, nz) float32

    @property
    def affine(self) -> np.ndarray:
        """4x4 voxel-index → world-mm matrix (RAS+, diagonal, anisotropic, origin not zero)."""
        aff = np.eye(4)
        for ax in range(3):
            aff[ax, ax] = self.spacing[ax]
            aff[ax, 3] = WORLD_CENTRE_MM[ax] - 0.5 * (self.shape[ax] - 1) * self.spacing[ax]
        return aff


def make_grid(shape: tuple[int, int, int], spacing: tuple[float, float, float] | None) -> Grid:
    """Validate ``shape``/``spacing`` and build the grid (spacing defaults to DEFAULT_FOV_MM / shape)."""
    try:
        shp = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise InputError(f"shape must be three integers, got {shape!r}") from None
    if len(shp) != 3 or any(s < 8 for s in shp) or any(s != v for s, v in zip(shp, shape)):
        raise InputError(f"shape must be three integers >= 8 (x, y, z), got {shape!r}")
    if spacing is None:
        spc = tuple(f / n for f, n in zip(DEFAULT_FOV_MM, shp))
    else:
        try:
            spc = tuple(float(s) for s in spacing)
        except (TypeError, ValueError):
            raise InputError(f"spacing must be three positive numbers (mm), got {spacing!r}") from None
        if len(spc) != 3 or not all(math.isfinite(s) and s > 0 for s in spc):
            raise InputError(f"spacing must be three positive numbers (mm), got {spacing!r}")
    axes = []
    for ax in range(3):
        c = ((np.arange(shp[ax], dtype=np.float32) - 0.5 * (shp[ax] - 1)) * np.float32(spc[ax]))
        view = [1, 1, 1]
        view[ax] = shp[ax]
        axes.append(c.reshape(view))
    return Grid(shape=shp, spacing=spc, x=axes[0], y=axes[1], z=axes[2])  # type: ignore[arg-type]

"""Voxel grids ↔ napari world space: which affine a layer gets, and how to get the scan back.

napari's world axes are the layer's array axes, in order; we make them RAS millimetres (world axes
0, 1, 2 = x, y, z with +x = patient's Right, +y = Anterior, +z = Superior). A layer's
``affine`` is the scan's voxel → RAS matrix, so anisotropic voxels keep their physical size and every
layer of one scan (CT, maps, masks) agrees in world space.

napari slices in 2D along world axes and needs the displayed block of the affine to be invertible:
an affine that swaps axes (a sagittal or coronal acquisition) crashes its 2D slicing. So for display
the array axes are permuted (a view, no copy, no resampling) until data axis i is the one closest to
world axis i; flips (negative spacing, e.g. LPS-stored DICOM) and the permutation stay exact, only
an oblique tilt (gantry/oblique scans) is shown with napari's "non-orthogonal slicing" limitation.
The permutation is stored in the layer metadata so a map can be written back on the source grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def display_permutation(affine: np.ndarray) -> tuple[int, ...]:
    """``perm`` such that array axis ``perm[i]`` is the one closest to world axis ``i``.

    Uses nibabel's ``io_orientation`` (the same rule as ``as_closest_canonical``), so a tilted scan
    still gets a unique assignment.
    """
    from nibabel.orientations import io_orientation

    ornt = io_orientation(np.asarray(affine, dtype=np.float64))
    world_of_data = [int(w) for w in ornt[:, 0]]
    return tuple(int(i) for i in np.argsort(world_of_data))


def permuted_affine(affine: np.ndarray, perm: tuple[int, ...]) -> np.ndarray:
    """Affine of the array ``np.transpose(data, perm)``: same world point for every voxel."""
    n = len(perm)
    p = np.zeros((n + 1, n + 1))
    for new, old in enumerate(perm):
        p[old, new] = 1.0
    p[n, n] = 1.0
    return np.asarray(affine, dtype=np.float64) @ p


def inverse_permutation(perm: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation that undoes ``np.transpose(., perm)``."""
    return tuple(int(i) for i in np.argsort(perm))


def display_grid(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """``(display_data, display_affine, perm)`` for a 3D array and its voxel → RAS affine."""
    perm = display_permutation(affine)
    return np.transpose(data, perm), permuted_affine(affine, perm), perm


def layer_world_affine(layer: Any) -> np.ndarray:
    """The full data → world matrix of a napari layer (its ``affine`` after scale/translate/rotate/shear).

    napari applies ``scale``/``translate``/``rotate``/``shear`` first (``data2physical``), then
    ``affine``; a plain layer made by hand or by another plugin is read back the same way.
    """
    from napari.utils.transforms import Affine

    physical = Affine(
        scale=layer.scale, translate=layer.translate, rotate=layer.rotate, shear=layer.shear
    ).affine_matrix
    return np.asarray(layer.affine.affine_matrix, dtype=np.float64) @ physical

"""Viewer building blocks without a display: lazy imports, display geometry, CT windows, limits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medcam3d.errors import InputError
from medcam3d.viewer.geometry import display_grid, display_permutation, inverse_permutation, permuted_affine
from medcam3d.viewer.layers import shared_limits
from medcam3d.viewer.windows import auto_window, lung_share, resolve_window

DATA = Path(__file__).parent / "data" / "totalseg"


def test_import_does_not_load_napari_or_qt():
    code = (
        "import sys, medcam3d, medcam3d.viewer\n"
        "assert callable(medcam3d.view) and medcam3d.view is medcam3d.viewer.view\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('napari', 'qtpy', 'PyQt6', 'PyQt5', 'vispy', 'magicgui')]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _permuted_affine() -> np.ndarray:
    """Data axis 0 → world z (−4 mm), axis 1 → world x (2 mm), axis 2 → world y (−3 mm): a flipped sagittal-like grid."""
    a = np.zeros((4, 4))
    a[2, 0], a[0, 1], a[1, 2] = -4.0, 2.0, -3.0
    a[:3, 3] = [-10.0, 25.0, 60.0]
    a[3, 3] = 1.0
    return a


def test_display_grid_keeps_every_voxel_at_its_world_position():
    aff = _permuted_affine()
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    shown, shown_aff, perm = display_grid(data, aff)
    assert perm == (1, 2, 0)
    assert shown.shape == (6, 7, 5)
    # the displayed affine is diagonal (no axis swap left for napari's 2D slicing), flips kept
    assert np.allclose(shown_aff[:3, :3], np.diag([2.0, -3.0, -4.0]))
    rng = np.random.default_rng(0)
    for _ in range(20):
        old = tuple(int(rng.integers(s)) for s in data.shape)
        new = tuple(old[p] for p in perm)
        assert shown[new] == data[old]
        assert np.allclose(shown_aff @ np.array([*new, 1.0]), aff @ np.array([*old, 1.0]))
    back = np.transpose(shown, inverse_permutation(perm))
    assert np.array_equal(back, data)


def test_display_grid_leaves_ras_and_flipped_grids_alone():
    for aff in (np.diag([3.0, 3.0, 3.0, 1.0]), np.diag([-0.98, -0.98, 2.0, 1.0])):
        assert display_permutation(aff) == (0, 1, 2)
        assert np.array_equal(permuted_affine(aff, (0, 1, 2)), aff)


def test_named_windows_are_level_plus_minus_half_width():
    assert resolve_window("lung").limits == (-1350.0, 150.0)  # W1500 / L-600
    assert resolve_window("mediastinum").limits == (-135.0, 215.0)  # W350 / L40
    assert resolve_window("bone").limits == (-500.0, 1300.0)  # W1800 / L400
    assert resolve_window("abdomen").limits == (-160.0, 240.0)  # W400 / L40
    assert resolve_window("bone").limits == (-500.0, 1300.0)  # W1800 / L400
    assert resolve_window((40, 350)).limits == (-135.0, 215.0)  # (level, width)
    assert resolve_window({"level": -600, "width": 1500}).limits == (-1350.0, 150.0)


@pytest.mark.parametrize(
    "window, message",
    [
        ("lungs-ish", "is not a CT window preset"),
        ((40, 0), "width must be a finite number > 0"),
        ((40,), "neither a preset name nor a (level, width) pair"),
        (3.5, "neither a preset name nor a (level, width) pair"),
    ],
)
def test_bad_window_is_an_input_error(window, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_window(window)


def test_auto_window_lung_for_chest_abdomen_for_abdomen():
    from medcam3d.io import load_volume
    from medcam3d.synthetic import make_chest_ct

    chest = make_chest_ct(3, shape=(48, 48, 24))
    assert lung_share(chest.volume) > 0.15
    assert auto_window(chest.volume).name == "lung"
    abdomen = load_volume(DATA / "example_ct_sm.nii.gz").numpy()[0]
    assert lung_share(abdomen) < 0.08
    assert auto_window(abdomen).name == "abdomen"


def test_shared_limits_hand_computed():
    maps = np.zeros((2, 4, 4, 4), np.float32)
    maps[0, 1, 1, 1] = 2.5
    maps[1, 2, 2, 2] = 10.0
    assert shared_limits(maps, 0.2) == (2.0, 10.0)
    assert shared_limits(np.zeros((1, 2, 2, 2)), 0.3) == (0.3, 1.0)  # all zero: nothing shows

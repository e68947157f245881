"""Pixels: the heat colour is drawn where the planted region is in world space, and nowhere else.

A bright region (and a map peaking on it) is planted at a world point right-anterior of the centre.
In the axial radiological view it must appear in the screen's top-left quadrant (anterior up,
patient's right on the left), at the pixel the camera maps that world point to, for a RAS grid, a
flipped grid and an axis-swapped grid alike; the other quadrants must show no heat colour.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("qtpy")

import torch  # noqa: E402
from monai.data import MetaTensor  # noqa: E402

import medcam3d  # noqa: E402
from medcam3d.spatial import Explanation  # noqa: E402

pytestmark = pytest.mark.napari

PEAK_MM = np.array([22.0, 18.0, 8.0])  # right (+x), anterior (+y), a bit superior
RADIUS_MM = 7.0


def _grid(kind: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affines covering the same world box x∈[-40,40], y∈[-45,45], z∈[-40,40] mm."""
    if kind == "ras":
        return np.array([[2.0, 0, 0, -40], [0, 3, 0, -45], [0, 0, 4, -40], [0, 0, 0, 1]]), (41, 31, 21)
    if kind == "flipped":  # x and z stored backwards (like LPS-ordered data), anisotropic
        return np.array([[-2.0, 0, 0, 40], [0, 3, 0, -45], [0, 0, -4, 40], [0, 0, 0, 1]]), (41, 31, 21)
    # swapped: array axes (z, x, y), y stored backwards
    return np.array([[0, 2.0, 0, -40], [0, 0, -3, 45], [4, 0, 0, -40], [0, 0, 0, 1]]), (21, 41, 31)


def _case(kind: str):
    aff, shape = _grid(kind)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    world = (idx @ aff[:3, :3].T + aff[:3, 3]).reshape(*shape, 3)
    dist = np.linalg.norm(world - PEAK_MM, axis=-1)
    ct = np.where(dist < RADIUS_MM, 300.0, -800.0).astype(np.float32)  # a dense nodule in lung
    heat = np.exp(-(dist**2) / (2 * RADIUS_MM**2)).astype(np.float32)[None]
    vol = MetaTensor(torch.from_numpy(ct)[None], affine=torch.as_tensor(aff), meta={"space": "RAS"})
    maps = MetaTensor(torch.from_numpy(heat), affine=torch.as_tensor(aff), meta={"space": "RAS"})
    expl = Explanation(
        maps=maps, logits=torch.tensor([2.0]), probabilities=torch.tensor([0.88]), class_idx=torch.tensor([0]),
        class_names=["nodule"], method="hirescam", target_layer="features", raw=torch.empty(0),
    )  # fmt: skip
    return vol, expl


def _heat_mask(img: np.ndarray) -> np.ndarray:
    """Pixels with inferno's warm colours (red clearly above blue); the grey CT has R == G == B."""
    r, b = img[..., 0].astype(int), img[..., 2].astype(int)
    return (r - b > 60) & (r > 100)


def _screen_position(viewer, world: np.ndarray, shape: tuple[int, int]) -> tuple[float, float]:
    """Canvas (row, col) of a world point in the 2D axial view (rows = world y going up, cols = x going left)."""
    cam = viewer.scene.camera
    c_y, c_x = cam.center[-2], cam.center[-1]
    h, w = shape
    return h / 2 - (world[1] - c_y) * cam.zoom, w / 2 - (world[0] - c_x) * cam.zoom


def _show(viewer, kind: str):
    from qtpy.QtWidgets import QApplication

    viewer.layers.clear()
    vol, expl = _case(kind)
    medcam3d.view(vol, expl, viewer=viewer, window="lung", threshold=0.2)
    QApplication.processEvents()
    viewer.reset_view()
    viewer.dims.set_point(2, PEAK_MM[2])
    return viewer


def test_heat_is_drawn_on_the_planted_region_for_any_grid(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1100, 800)
    for kind in ("ras", "flipped", "swapped"):
        _show(viewer, kind)
        img = viewer.screenshot(canvas_only=True, flash=False)
        h, w = img.shape[:2]
        heat = _heat_mask(img)
        assert heat.sum() > 50, kind
        rows, cols = np.nonzero(heat)
        # radiological: right-anterior lands top-left, and only there
        assert rows.max() < h / 2 and cols.max() < w / 2, (kind, rows.mean(), cols.mean(), h, w)
        r0, c0 = _screen_position(viewer, PEAK_MM, (h, w))
        assert abs(rows.mean() - r0) < 4 and abs(cols.mean() - c0) < 4, (kind, rows.mean(), cols.mean(), r0, c0)
        # the CT's bright region is at the same pixel (CT and map agree in world space)
        viewer.layers["nodule (hirescam)"].visible = False
        ct = viewer.screenshot(canvas_only=True, flash=False)
        assert ct[int(r0), int(c0), :3].min() > 200 and not _heat_mask(ct).any(), kind
        # a far-away world point (left-posterior) shows lung grey, not heat
        r1, c1 = _screen_position(viewer, PEAK_MM * [-1, -1, 1], (h, w))
        assert ct[int(r1), int(c1), :3].max() < 120 and not heat[int(r1), int(c1)], kind


def test_3d_rendering_shows_the_heat_in_the_same_quadrant(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1100, 800)
    _show(viewer, "flipped")
    viewer.dims.ndisplay = 3
    viewer.reset_view()
    img = viewer.screenshot(canvas_only=True, flash=False)
    h, w = img.shape[:2]
    rows, cols = np.nonzero(_heat_mask(img))
    assert len(rows) > 50
    assert np.median(rows) < h / 2 and np.median(cols) < w / 2

"""What the fast montage draws is what the slices hold: the map's peak where it is and at its value
after area averaging, mask outlines identical to the whole slice's contour, the peak of a plateau
and the spacing of any axis order as in RAS, labels that never run into each other.

Independent truths: voxel positions in mm from the affine (hand-built), the rendered PNG's pixels,
matplotlib's own contour of the whole displayed slice, block means computed with reshape.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from monai.data import MetaTensor

from medcam3d.report.downsample import block_mean, block_mean_keep_peak
from medcam3d.report.montage import map_panel, montage_figure, save_montage, to_ras

WINDOW = (-1350.0, 150.0)


def _expl(maps: torch.Tensor, aff: np.ndarray, names: list[str]) -> SimpleNamespace:
    return SimpleNamespace(maps=MetaTensor(maps, affine=torch.as_tensor(aff)), class_names=names,
                           probabilities=torch.full((len(names),), 0.5), method="hirescam", target_layer="l4")


def test_block_mean_is_the_area_average_and_keeps_the_peak():
    rng = np.random.default_rng(0)
    a = rng.random((10, 14)).astype(np.float32)
    a[7, 4] = 3.0  # the peak
    m = block_mean(a, 3, 4)
    assert m.shape == (4, 4)
    np.testing.assert_allclose(m[:3, :3], a[:9, :12].reshape(3, 3, 3, 4).mean(axis=(1, 3)), rtol=1e-6)
    np.testing.assert_allclose(m[3, 3], a[9:, 12:].mean(), rtol=1e-6)  # partial corner block: its voxels
    np.testing.assert_allclose(m[3, :3], a[9:, :12].reshape(1, 3, 4).mean(axis=(0, 2)), rtol=1e-6)
    k = block_mean_keep_peak(a, 3, 4, (7, 4))
    assert k.max() == 3.0 and np.unravel_index(np.argmax(k), k.shape) == (7 // 3, 4 // 4)
    np.testing.assert_array_equal(np.delete(k.ravel(), 2 * 4 + 1), np.delete(m.ravel(), 2 * 4 + 1))
    np.testing.assert_array_equal(block_mean(a, 1, 1), a)


def _panel_pixels(fig, ax) -> np.ndarray:
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float)
    bb = ax.get_window_extent()
    h = img.shape[0]
    return img, (bb.x0, bb.x1, h - bb.y1, h - bb.y0)


def test_thin_slab_axial_panel_shows_the_single_voxel_peak_where_it_is_at_full_value():
    # a 20-slice series: its axial panel is ~150 px for 512 voxels, so it is drawn from 3 x 3 blocks
    shape, sp = (512, 512, 20), (0.9766, 0.9766, 2.0)
    aff = np.diag([*sp, 1.0])  # RAS, so display column = R..L reversed on screen (radiological)
    vol = MetaTensor(torch.full((1, *shape), -800.0), affine=torch.as_tensor(aff))
    maps = torch.full((1, *shape), 0.2)
    peak = (301, 123, 9)
    maps[0, peak[0], peak[1], peak[2]] = 1.0
    fig = montage_figure(vol, _expl(maps, aff, ["nodule"]), WINDOW)
    ax = [a for a in fig.subfigs[0].axes if "axial" in a.get_xlabel()][0]
    overlay = ax.get_images()[1]
    arr = np.asarray(overlay.get_array())
    assert arr.shape[1] < 512 / 2  # area-averaged, not the full slice
    assert arr.max() == pytest.approx(1.0)  # the peak's value survives the averaging
    # where it is drawn (mm in the panel's coordinates) holds the peak voxel's centre (mm)
    r, c = np.unravel_index(int(np.argmax(arr)), arr.shape)
    x0, x1, y0, y1 = overlay.get_extent()
    bw, bh = (x1 - x0) / arr.shape[1], (y1 - y0) / arr.shape[0]
    x_mm, y_mm = (peak[0] + 0.5) * sp[0], (peak[1] + 0.5) * sp[1]
    assert c * bw <= x_mm <= (c + 1) * bw and r * bh <= y_mm <= (r + 1) * bh
    # and the PNG's pixels: the brightest overlay pixel is the peak's, radiological (R on the left)
    img, (px0, px1, py0, py1) = _panel_pixels(fig, ax)
    inner = img[int(py0) + 2:int(py1) - 2, int(px0) + 2:int(px1) - 2]  # inside the frame
    hot = np.unravel_index(int(np.argmax(inner[..., 0] + inner[..., 1])), inner.shape[:2])
    w_mm, h_mm = shape[0] * sp[0], shape[1] * sp[1]
    want_col = px0 + (1 - x_mm / w_mm) * (px1 - px0)  # x axis inverted: R (index 0) at the right end
    want_row = py0 + (1 - y_mm / h_mm) * (py1 - py0)  # image rows grow downwards, A up
    assert abs(int(px0) + 2 + hot[1] - want_col) <= 2 and abs(int(py0) + 2 + hot[0] - want_row) <= 2


def _segments(ax) -> dict[str, np.ndarray]:
    out = {}
    for cs in ax.collections:
        if not hasattr(cs, "get_paths"):
            continue
        verts = [p.vertices for p in cs.get_paths() if len(p.vertices)]
        if verts:
            style = "dashed" if cs.get_linestyle()[0][1] is not None else "solid"
            out[style] = np.unique(np.round(np.concatenate(verts), 6), axis=0)
    return out


@pytest.mark.parametrize("shape,spacing", [((64, 64, 48), (5.0, 5.0, 6.0)), ((512, 512, 20), (0.9766, 0.9766, 2.0))])
def test_mask_outlines_equal_the_contour_of_the_whole_displayed_slice(shape, spacing):
    from matplotlib.figure import Figure

    aff = np.diag([*spacing, 1.0])
    vol = MetaTensor(torch.full((1, *shape), -800.0), affine=torch.as_tensor(aff))
    maps = torch.zeros((1, *shape))
    c = [s // 2 for s in shape]
    maps[0, c[0], c[1], c[2]] = 1.0
    rng = np.random.default_rng(1)
    mask = np.zeros(shape, bool)
    # an irregular lesion crossing the peak's slices, plus one at the volume's edge, off the slices
    lo = [max(0, x - 6) for x in c]
    mask[lo[0]:c[0] + 6, lo[1]:c[1] + 6, lo[2]:c[2] + 3] = rng.random((c[0] + 6 - lo[0], c[1] + 6 - lo[1],
                                                                       c[2] + 3 - lo[2])) > 0.4
    mask[0:3, 0:4, 0:2] = True
    fig = montage_figure(vol, _expl(maps, aff, ["nodule"]), WINDOW, mask=mask)
    (ras,), sp = to_ras([mask], aff)
    for ax in [a for a in fig.subfigs[0].axes if a.get_images()]:
        name = ax.get_xlabel().split("(")[1].split()[0]
        axis = {"axial": 2, "coronal": 1, "sagittal": 0}[name]
        h, v = [a for a in range(3) if a != axis]
        x0, x1, y0, y1 = ax.get_images()[0].get_extent()
        # the displayed crop, from the panel's own limits (mm) back to voxel ranges
        w_mm, h_mm = max(ax.get_xlim()), max(ax.get_ylim())
        n_h, n_v = int(round(w_mm / sp[h])), int(round(h_mm / sp[v]))
        idx = int(ax.get_xlabel().split("(")[1].split()[1].rstrip(",)"))
        sl = np.take(ras, idx, axis=axis).T
        proj = ras.any(axis=axis).T
        crop_h = _crop_start(ras.shape[h], n_h, c[h])
        crop_v = _crop_start(ras.shape[v], n_v, c[v])
        want_src = sl if sl[crop_v:crop_v + n_v, crop_h:crop_h + n_h].any() else proj
        want_img = want_src[crop_v:crop_v + n_v, crop_h:crop_h + n_h].astype(float)
        ref = Figure().add_subplot().contour(want_img, levels=[0.5], origin="lower", extent=(0, w_mm, 0, h_mm))
        ref_v = np.unique(np.round(np.concatenate([p.vertices for p in ref.get_paths() if len(p.vertices)]), 6),
                          axis=0)
        got = _segments(ax)
        assert len(got) == 1, (name, got.keys())
        np.testing.assert_allclose(next(iter(got.values())), ref_v, atol=1e-6, err_msg=name)


def _crop_start(n: int, keep: int, centre: int) -> int:
    return int(np.clip(centre - keep // 2, 0, n - keep))


def test_plateau_peak_is_the_first_in_ras_order_whatever_the_storage_order():
    # stored L->R, P->A (LPS): the first maximum in storage order is the LAST one in RAS order
    shape = (20, 18, 10)
    aff = np.diag([-2.0, -2.0, 3.0, 1.0])
    m = np.zeros(shape, np.float32)
    m[4:9, 5:7, 3:5] = 2.0  # a plateau of equal maxima
    pn = map_panel(m, aff)
    # RAS index of stored (i, j, k) = (19 - i, 17 - j, k): the plateau's lowest R is 19 - 8 = 11
    assert pn.peak == (11, 17 - 6, 3)
    assert pn.vmax == 2.0


def test_spacing_follows_the_axes_for_any_storage_order():
    # a sagittal acquisition stored (A, S, R): axis 0 along A (0.5 mm), 1 along S (0.7 mm), 2 along R (2 mm)
    aff = np.zeros((4, 4))
    aff[1, 0], aff[2, 1], aff[0, 2], aff[3, 3] = 0.5, 0.7, 2.0, 1.0
    a = np.zeros((30, 40, 50), np.float32)
    (ras,), sp = to_ras([a], aff)
    assert ras.shape == (50, 30, 40)
    np.testing.assert_allclose(sp, [2.0, 0.5, 0.7])  # R, A, S
    m = torch.zeros((1, 30, 40, 50))
    m[0, 10, 20, 25] = 1.0
    vol = MetaTensor(torch.zeros((1, 30, 40, 50)), affine=torch.as_tensor(aff))
    fig = montage_figure(vol, _expl(m, aff, ["x"]), WINDOW)
    axial = [ax for ax in fig.subfigs[0].axes if "axial" in ax.get_xlabel()][0]
    # the axial panel spans 50 x 2 mm (R) by 30 x 0.5 mm (A): 100 x 15 mm, cropped to 2.5 : 1
    assert max(axial.get_ylim()) == pytest.approx(15.0)
    assert max(axial.get_xlim()) == pytest.approx(37.5, abs=2.0)


def test_long_labels_of_a_thin_slab_row_stay_apart_and_inside_the_figure(tmp_path):
    shape, sp = (512, 512, 20), (0.9766, 0.9766, 2.0)
    aff = np.diag([*sp, 1.0])
    vol = MetaTensor(torch.full((1, *shape), -800.0), affine=torch.as_tensor(aff))
    maps = torch.zeros((1, *shape))
    maps[0, 256, 256, 10] = 1.0
    mask = np.zeros(shape, bool)
    mask[240:250, 240:250, 2] = True  # off every slice through the peak: "mask projected" everywhere
    fig = montage_figure(vol, _expl(maps, aff, ["nodule"]), WINDOW, title="case", mask=mask)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    labels = [ax.xaxis.label.get_window_extent(r) for ax in fig.subfigs[0].axes if ax.get_images()]
    assert all("mask projected" in ax.get_xlabel() for ax in fig.subfigs[0].axes if ax.get_images())
    for i, a in enumerate(labels):
        assert a.x0 >= 0 and a.x1 <= fig.bbox.width and a.y0 >= 0
        for b in labels[i + 1:]:
            assert a.x1 <= b.x0 or b.x1 <= a.x0
    png = save_montage(vol, _expl(maps, aff, ["nodule"]), tmp_path / "m.png", WINDOW, mask=mask)
    from PIL import Image

    img = np.asarray(Image.open(png))
    assert img.shape[1] == 1080  # 12 in at 90 dpi
    cyan = np.all(np.abs(img[..., :3].astype(int) - np.array(to_rgb("#00e5ff")) * 255) < 60, axis=-1)
    assert cyan.sum() > 20  # the dashed outline is drawn

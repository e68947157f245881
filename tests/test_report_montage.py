"""Montage layout: titles never overlap panels, thin slabs stay readable, masks are outlined.

Geometry is checked on the rendered figure (matplotlib window extents in pixels), for the shapes
users meet: a 64^3 demo-like scan, a 512x512x48 chest CT (0.57 x 0.57 x 5 mm) and a 20-slice DICOM
series (0.98 x 0.98 x 2 mm).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medcam3d.report.montage import MASK_COLOUR, montage_figure, save_montage

SHAPES = {
    "demo": ((64, 64, 48), (5.0, 5.0, 6.0)),
    "chest": ((512, 512, 48), (0.5703, 0.5703, 5.0)),
    "dicom20": ((512, 512, 20), (0.9766, 0.9766, 2.0)),
}


def _case(shape, spacing, k=2, empty=None):
    aff = np.diag([*spacing, 1.0])
    vol = MetaTensor(torch.full((1, *shape), -800.0), affine=torch.as_tensor(aff))
    maps = torch.zeros((k, *shape))
    c = [s // 2 for s in shape]
    for i in range(k):
        if i != empty:
            maps[i, c[0] - 20:c[0] + 20, c[1] - 20:c[1] + 20, max(c[2] - 3, 0):c[2] + 3] = 1.0 + i
            maps[i, c[0], c[1], c[2]] = 5.0 + i  # the peak
    expl = SimpleNamespace(maps=MetaTensor(maps, affine=torch.as_tensor(aff)),
                           probabilities=torch.tensor([0.9, 0.2][:k]), class_names=["nodule", "mass"][:k],
                           method="hirescam", target_layer="layer4")
    mask = np.zeros(shape, np.uint8)
    mask[c[0] - 5:c[0] + 5, c[1] - 5:c[1] + 5, c[2] + 2] = 1  # one slice, 2 above the peak
    return vol, expl, mask


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("name", list(SHAPES))
def test_titles_never_overlap_panels_and_panels_are_readable(name):
    shape, spacing = SHAPES[name]
    vol, expl, mask = _case(shape, spacing)
    fig = montage_figure(vol, expl, title=f"{name} - hirescam", mask=mask)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    axes = [ax for sf in fig.subfigs for ax in sf.axes if ax.get_images()]
    assert len(axes) == 6
    titles = [sf._suptitle for sf in fig.subfigs] + [fig._suptitle]
    for t in titles:
        tb = t.get_window_extent(r)
        for ax in axes:
            assert not _overlap(tb, ax.get_window_extent(r)), (t.get_text(), ax.get_xlabel())
    for ax in axes:  # every panel at least 150 px tall at 90 dpi, and inside the figure
        bb = ax.get_window_extent(r)
        assert bb.height >= 150, (ax.get_xlabel(), bb.height)
        assert bb.x0 >= 0 and bb.x1 <= fig.bbox.width + 1 and bb.y0 >= 0
    for sf in fig.subfigs:  # panels of one row do not overlap each other
        bbs = [ax.get_window_extent(r) for ax in sf.axes if ax.get_images()]
        assert not any(_overlap(a, b) for i, a in enumerate(bbs) for b in bbs[i + 1:])


def test_thin_slab_is_cropped_around_the_peak_not_squashed():
    shape, spacing = SHAPES["dicom20"]
    vol, expl, _ = _case(shape, spacing)
    fig = montage_figure(vol, expl)
    fig.canvas.draw()
    coronal = [ax for ax in fig.subfigs[0].axes if "coronal" in ax.get_xlabel()][0]
    assert "cropped" in coronal.get_xlabel()
    bb = coronal.get_window_extent()
    # physical aspect kept: width / height of the panel == width / height of the shown mm (<= 2.5)
    x0, x1 = sorted(coronal.get_xlim())
    y0, y1 = sorted(coronal.get_ylim())
    assert (x1 - x0) / (y1 - y0) <= 2.5 + 1e-6
    assert bb.width / bb.height == pytest.approx((x1 - x0) / (y1 - y0), rel=0.03)


def test_mask_outline_is_drawn_solid_through_the_lesion_and_dashed_elsewhere(tmp_path):
    shape, spacing = SHAPES["demo"]
    vol, expl, mask = _case(shape, spacing)
    fig = montage_figure(vol, expl, mask={"nodule": mask})
    row0, row1 = fig.subfigs
    # nodule row: the coronal and sagittal slices through the peak cross the mask, the axial does not
    styles = {}
    for ax in row0.axes:
        if ax.get_images():
            cs = [c for c in ax.collections if hasattr(c, "get_linestyle")]
            assert cs, ax.get_xlabel()
            colours = {tuple(np.round(c.get_edgecolor()[0][:3], 3)) for c in cs}
            assert len(colours) == 1
            styles[ax.get_xlabel().split("(")[1].split()[0]] = cs[0].get_linestyle()[0][1]
    assert styles["axial"] is not None  # dashed: projected from another slice
    assert styles["coronal"] is None and styles["sagittal"] is None  # solid: the lesion is in the slice
    assert not any(ax.collections for ax in row1.axes if ax.get_images())  # no mask for "mass"
    from matplotlib.colors import to_rgb

    assert colours == {tuple(np.round(to_rgb(MASK_COLOUR), 3))}
    png = save_montage(vol, expl, tmp_path / "m.png", mask=mask)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_empty_map_title_says_so():
    shape, spacing = SHAPES["demo"]
    vol, expl, _ = _case(shape, spacing, empty=1)
    fig = montage_figure(vol, expl)
    assert "map is all zero" in fig.subfigs[1]._suptitle.get_text()
    assert "all zero" not in fig.subfigs[0]._suptitle.get_text()


def test_mask_on_another_grid_is_refused():
    shape, spacing = SHAPES["demo"]
    vol, expl, _ = _case(shape, spacing)
    with pytest.raises(ValueError, match="scan's grid"):
        montage_figure(vol, expl, mask=np.zeros((10, 10, 10)))


def test_readme_montage_script_draws_the_demo_with_outlines(tmp_path):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_readme_montage", root / "scripts" / "make_readme_montage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(tmp_path / "m.png")
    from PIL import Image

    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    cyan = (img[..., 0] < 60) & (img[..., 1] > 180) & (img[..., 2] > 200)  # the outline colour #00e5ff
    assert cyan.sum() > 200
    assert "demo_montage.png" in (root / "README.md").read_text()

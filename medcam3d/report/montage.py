"""PNG montage of an explanation: per class, axial/coronal/sagittal slices through the map's peak,
the CT in a display window with the map overlaid, the lesion mask's outline when one is given, a
colour bar and the class probability.

Slices are shown in RAS-reoriented (closest canonical) space with the physical aspect ratio from
the voxel spacing, in radiological convention (patient's right on the image's left).

Layout (robust for any scan shape): one matplotlib sub-figure per class, so each class's title sits
in its own band above its panels and can never overlap an image; panel widths follow the panels'
physical widths, and the figure's height follows the tallest panel, so little space is empty. The
geometry is computed (:mod:`medcam3d.report.layout`), not left to a layout engine. A panel more
than :data:`MAX_PANEL_ASPECT` times wider than tall (the coronal/sagittal views of a thin slab,
e.g. a 20-slice series) is cropped to that aspect around the map's peak, which keeps it readable;
its label says so. A slice with two or more voxels per displayed pixel is area-averaged down to
about its displayed size first (:mod:`medcam3d.report.downsample`; the map's peak keeps its value).
Matplotlib is used through its object API with the Agg canvas, so no GUI backend is touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medcam3d.metrics.peak import first_max_index
from medcam3d.report.downsample import block_mean, block_mean_keep_peak, extent_mm, factor
from medcam3d.report.layout import (
    CBAR_W_IN,
    DPI,
    EDGE_IN,
    FIG_TITLE_IN,
    FIG_WIDTH_IN,
    YLABEL_IN,
    RowGeometry,
    figure_height,
    row_geometry,
)

_VIEWS = (
    # name, axis held fixed, (horizontal axis, vertical axis), axis letters (left, right, bottom, top)
    ("axial", 2, (0, 1), ("R", "L", "P", "A")),
    ("coronal", 1, (0, 2), ("R", "L", "I", "S")),
    ("sagittal", 0, (1, 2), ("A", "P", "I", "S")),
)
#: Widest panel shown uncropped (width / height, in mm).
MAX_PANEL_ASPECT = 2.5
MASK_COLOUR = "#00e5ff"


def _numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        t = t.as_tensor() if hasattr(t, "as_tensor") else t
        return t.float().numpy()
    return np.asarray(t, dtype=np.float32)


def _array(t: Any) -> np.ndarray:
    """A numpy view of a tensor or array, its dtype kept (no full-volume float copy)."""
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        t = t.as_tensor() if hasattr(t, "as_tensor") else t
        try:
            return t.numpy()
        except TypeError:  # a dtype numpy lacks (bfloat16)
            return t.float().numpy()
    return np.asarray(t)


def _ornt(affine: np.ndarray) -> np.ndarray:
    import nibabel.orientations as nio

    return nio.io_orientation(affine)


def to_ras(arrays: list[np.ndarray], affine: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Reorient (X, Y, Z) arrays to the closest RAS axis order (views, no copy); also return the
    spacing (mm) along the reoriented axes."""
    import nibabel.orientations as nio

    ornt = _ornt(affine)
    out = [nio.apply_orientation(a, ornt) for a in arrays]
    # input axis i lands on output axis ornt[i, 0]: output axis j comes from input argsort(...)[j]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[np.argsort(ornt[:, 0])]
    return out, spacing


def _slice(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A view of ``vol`` at ``index`` along ``axis`` (np.take would copy all of a strided array)."""
    return vol[(slice(None),) * axis + (index,)]


@dataclass
class MapPanel:
    """What the montage shows of one class: its peak (RAS-reoriented voxel index), the map's slice
    through the peak for each view (rows = vertical axis, float32) and its maximum."""

    peak: tuple[int, ...]
    slices: list[np.ndarray]
    vmax: float


def map_panel(m: Any, affine: np.ndarray) -> MapPanel:
    """The :class:`MapPanel` of one (X, Y, Z) map on the grid of ``affine`` (keeps 3 slices, not the map).

    The peak is the map's first maximum in RAS order (:func:`medcam3d.metrics.peak.first_max_index` of
    the reoriented view: the lowest R, then A, then S index among equal maxima); an all-zero (or
    non-positive) map's panel goes through the centre."""
    a = _array(m)
    (ras,), _ = to_ras([a], np.asarray(affine, dtype=np.float64))
    vmax = float(a.max())  # on the stored array, in memory order
    peak = first_max_index(ras) if vmax > 0 else tuple(int(s) // 2 for s in ras.shape)
    peak = tuple(int(p) for p in peak)
    slices = [np.ascontiguousarray(_slice(ras, axis, peak[axis]).T, dtype=np.float32) for _, axis, _, _ in _VIEWS]
    return MapPanel(peak, slices, vmax)


def _crop(n: int, d: float, centre: int, max_mm: float) -> tuple[int, int]:
    """Index range [lo, hi) of at most ``max_mm`` along an axis of ``n`` voxels of ``d`` mm around ``centre``."""
    keep = max(1, min(n, int(round(max_mm / d))))
    lo = int(np.clip(centre - keep // 2, 0, n - keep))
    return lo, lo + keep


def _panels(shape: tuple[int, ...], spacing: np.ndarray, peak: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per view: the slice index, the horizontal/vertical index ranges and the physical size (mm)."""
    out = []
    for name, axis, (h, v), letters in _VIEWS:
        hw, vw = shape[h] * spacing[h], shape[v] * spacing[v]
        hr, vr, cropped = (0, shape[h]), (0, shape[v]), False
        if hw > MAX_PANEL_ASPECT * vw:
            hr, cropped = _crop(shape[h], spacing[h], peak[h], MAX_PANEL_ASPECT * vw), True
        elif vw > MAX_PANEL_ASPECT * hw:
            vr, cropped = _crop(shape[v], spacing[v], peak[v], MAX_PANEL_ASPECT * hw), True
        out.append({"name": name, "axis": axis, "h": h, "v": v, "letters": letters, "hr": hr, "vr": vr,
                    "cropped": cropped, "w_mm": (hr[1] - hr[0]) * spacing[h],
                    "h_mm": (vr[1] - vr[0]) * spacing[v]})
    return out


def _view(vol: np.ndarray, p: dict[str, Any], index: int) -> np.ndarray:
    return _shown(_slice(vol, p["axis"], index).T, p)


def _shown(rows_v: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    """The displayed part of a slice whose rows are the vertical axis."""
    return rows_v[p["vr"][0]:p["vr"][1], p["hr"][0]:p["hr"][1]]


def save_montage(
    volume: Any,
    expl: Any,
    path: str | os.PathLike[str],
    window: tuple[float, float] = (-1350.0, 150.0),
    title: str | None = None,
    panels: list[MapPanel] | None = None,
    mask: Any | None = None,
) -> Path:
    """Write the montage of ``expl`` (an Explanation on ``volume``'s grid) to ``path`` (PNG).

    Args:
        volume: MetaTensor (1, X, Y, Z) in HU with ``.affine`` (the scan the maps sit on).
        expl: Explanation with ``maps`` (K, X, Y, Z), ``class_names``, ``probabilities``,
            ``method``, ``target_layer``.
        window: (low, high) HU display range of the CT (e.g. ``WINDOWS["lung"].limits``).
        title: figure title (e.g. the case id).
        panels: the classes' :class:`MapPanel` when already taken (e.g. while each map was written);
            otherwise taken from ``expl.iter_maps()``.
        mask: optional (X, Y, Z) array on the same grid (label > 0 = lesion) for every class, or a
            mapping {class name: array}. Its outline is drawn solid on panels whose slice crosses it,
            dashed (its projection along the slice axis) on the others.

    Raises:
        ValueError: a mask not on the scan's grid.

    Returns:
        ``path`` as a Path, written atomically.
    """
    fig = montage_figure(volume, expl, window, title, mask, panels)
    out = Path(path)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    try:
        # deflate level 1, not Pillow's default 6: on a 1080 x 1036 lung montage 0.04 s instead of
        # 0.13 s, for a 6 % larger file (453 kB against 426 kB)
        fig.savefig(tmp, format="png", pil_kwargs={"compress_level": 1})
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no partial file left (e.g. disk full)
        raise
    return out


def montage_figure(
    volume: Any,
    expl: Any,
    window: tuple[float, float] = (-1350.0, 150.0),
    title: str | None = None,
    mask: Any | None = None,
    panels: list[MapPanel] | None = None,
) -> Any:
    """The montage as a matplotlib ``Figure`` (Agg canvas); arguments as :func:`save_montage`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.gridspec import GridSpec

    maps_t = getattr(expl, "maps", None)
    grid = maps_t if maps_t is not None else getattr(expl, "grid", None)
    affine = _numpy(grid.affine if hasattr(grid, "affine") else volume.affine).astype(np.float64)
    if panels is None:
        maps_iter = expl.iter_maps() if hasattr(expl, "iter_maps") else _numpy(maps_t)
        panels = [map_panel(m, affine) for m in maps_iter]
    ct = _array(volume)[0]
    names = list(getattr(expl, "class_names", []))
    masks = _class_masks(mask, names, ct.shape)
    (ct,), spacing = to_ras([ct], affine)
    boxes: dict[int, _MaskBox] = {}  # one per distinct mask array, shared by the classes using it
    for a in masks.values():
        if id(a) not in boxes:
            boxes[id(a)] = _MaskBox(to_ras([a], affine)[0][0])
    masks_ras = {nm: boxes[id(a)] for nm, a in masks.items()}
    probs = _numpy(expl.probabilities).reshape(-1) if getattr(expl, "probabilities", None) is not None else None
    flags = _flags(expl)
    n = len(panels)

    peaks = [pn.peak for pn in panels]
    layouts = [_panels(ct.shape, spacing, pk) for pk in peaks]
    # the three panels of a row get the same height, each keeping its own physical aspect, so a thin
    # slab's coronal view is as tall as the axial one; widths follow the aspects
    rows = [row_geometry([p["w_mm"] / p["h_mm"] for p in lay]) for lay in layouts]
    height = figure_height(rows, bool(title))
    fig = Figure(figsize=(FIG_WIDTH_IN, height), dpi=DPI)
    renderer = FigureCanvasAgg(fig).get_renderer()
    # row 0: the figure title's band; a sub-figure per class below it
    gs = GridSpec(n + 1, 1, figure=fig, height_ratios=[FIG_TITLE_IN if title else EDGE_IN, *[r.height for r in rows]])
    for k, (pn, lay, peak, geo) in enumerate(zip(panels, layouts, peaks, rows)):
        sf = fig.add_subfigure(gs[k + 1, 0])
        vmax = pn.vmax
        image = None
        for col, p in enumerate(lay):
            ax = sf.add_axes(geo.rect(geo.panel_x[col], geo.panel_w[col], geo.image_y, geo.image_h))
            idx = int(peak[p["axis"]])
            ct2, m2 = _view(ct, p, idx), _shown(pn.slices[col], p)
            fv = factor(ct2.shape[0], geo.image_h * DPI)
            fh = factor(ct2.shape[1], geo.panel_w[col] * DPI)
            extent = (0.0, extent_mm(ct2.shape[1], fh, spacing[p["h"]]),
                      0.0, extent_mm(ct2.shape[0], fv, spacing[p["v"]]))
            ax.imshow(block_mean(ct2, fv, fh), cmap="gray", vmin=window[0], vmax=window[1], origin="lower",
                      extent=extent, interpolation="nearest", aspect="auto")
            if vmax > 0:
                at = (peak[p["v"]] - p["vr"][0], peak[p["h"]] - p["hr"][0])  # the peak in this panel
                shown = np.ma.masked_less(block_mean_keep_peak(m2, fv, fh, at), 0.1 * vmax)
                image = ax.imshow(shown, cmap="inferno", vmin=0.0, vmax=vmax, origin="lower",
                                  extent=extent, alpha=0.55, interpolation="nearest", aspect="auto")
            note = ""
            box = masks_ras.get(names[k]) if k < len(names) else None
            if box is not None:
                outline = box.outline(p, idx, spacing)
                if outline is not None:  # the lesion crosses this slice: its outline
                    ax.contour(outline[0], levels=[0.5], colors=MASK_COLOUR, linewidths=1.2, origin="lower",
                               extent=outline[1])
                else:  # it does not: the outline of its projection along the slice axis, dashed
                    outline = box.outline(p, None, spacing)
                    if outline is not None:
                        ax.contour(outline[0], levels=[0.5], colors=MASK_COLOUR, linewidths=1.0,
                                   linestyles="dashed", origin="lower", extent=outline[1])
                    note = ", mask projected"
            ax.set_xlim(p["w_mm"], 0.0)  # radiological: patient's right (or anterior) on the left
            ax.set_ylim(0.0, p["h_mm"])
            ax.set_xticks([])
            ax.set_yticks([])
            crop = ", cropped" if p["cropped"] else ""
            letters = p["letters"]
            ax.set_xlabel(f"{letters[0]} ← → {letters[1]}  ({p['name']} {idx}{crop}{note})", fontsize=8)
            _fit(ax.xaxis.label, renderer, geo.panel_w[col] + YLABEL_IN)
            ax.set_ylabel(f"{letters[2]} → {letters[3]}", fontsize=8)
        cname = expl.class_names[k] if k < len(expl.class_names) else f"class_{k}"
        ptxt = f"p = {float(probs[k]):.3f}" if probs is not None and k < len(probs) else ""
        zero = f"  — {flags[k]}" if flags[k] else ("  — map is all zero" if vmax <= 0 else "")
        sf.suptitle(f"{cname}: {ptxt}  [{expl.method}, {expl.target_layer}]{zero}", fontsize=10,
                    color="#b00000" if vmax <= 0 else "black", y=1.0 - 0.1 / geo.height, va="top")
        if image is not None:
            _colour_bar(sf, image, geo)
    if title:
        legend = "   (cyan: lesion mask; dashed = projected from other slices)" if masks_ras else ""
        fig.suptitle(title + legend, fontsize=11, y=1.0 - 0.1 / height, va="top")
    return fig


def _colour_bar(sf: Any, image: Any, geo: RowGeometry) -> None:
    cax = sf.add_axes(geo.rect(geo.cbar_x, CBAR_W_IN, geo.image_y, geo.image_h))
    bar = sf.colorbar(image, cax=cax)
    bar.ax.tick_params(labelsize=8)
    bar.set_label("map (not normalised)", fontsize=8)


def _fit(label: Any, renderer: Any, width_in: float) -> None:
    """Break ``label`` (a Text) before its "(" part when it is wider than ``width_in`` inches (its
    measured layout is cached by matplotlib and reused when the figure is drawn)."""
    if label.get_window_extent(renderer).width > width_in * DPI:
        label.set_text(label.get_text().replace("  (", "\n(", 1))


class _MaskBox:
    """A bool RAS mask kept as its bounding box (the only part that has outlines), with the slices
    and projections the panels outline.

    An outline is a float32 0/1 patch of the panel around the box (one voxel of margin, so the 0.5
    contour closes as on the whole slice) and its extent (mm, outer pixel edges, the panel's
    coordinates): the contour drawn from it is the one the whole displayed slice would give."""

    def __init__(self, mask_ras: np.ndarray) -> None:
        xy = mask_ras.any(axis=2)  # one pass over the mask
        xs, ys = np.flatnonzero(xy.any(axis=1)), np.flatnonzero(xy.any(axis=0))
        if xs.size == 0:
            self.box = None
            return
        sub = mask_ras[xs[0]:xs[-1] + 1, ys[0]:ys[-1] + 1]
        zs = np.flatnonzero(sub.any(axis=(0, 1)))
        self.lo = (int(xs[0]), int(ys[0]), int(zs[0]))
        self.box = np.ascontiguousarray(sub[:, :, zs[0]:zs[-1] + 1])
        self._proj: dict[int, np.ndarray] = {}

    def outline(self, p: dict[str, Any], index: int | None, spacing: np.ndarray) -> tuple[np.ndarray, tuple] | None:
        """The outline patch of panel ``p``: of slice ``index``, or (``None``) of the projection along
        the panel's axis; ``None`` when nothing of it shows on the panel."""
        if self.box is None:
            return None
        axis, h, v = p["axis"], p["h"], p["v"]
        if index is None:
            if axis not in self._proj:
                self._proj[axis] = self.box.any(axis=axis)
            part = self._proj[axis].T
        elif self.lo[axis] <= index < self.lo[axis] + self.box.shape[axis]:
            part = _slice(self.box, axis, index - self.lo[axis]).T
        else:
            return None
        (v0, v1), (h0, h1) = p["vr"], p["hr"]
        if v1 - v0 < 2 or h1 - h0 < 2:
            return None  # a contour needs two rows and two columns
        lv, lh = self.lo[v], self.lo[h]
        if lv >= v1 or lv + part.shape[0] <= v0 or lh >= h1 or lh + part.shape[1] <= h0:
            return None  # the mask lies outside the panel's crop
        r0, r1 = _grow(max(v0, lv - 1), min(v1, lv + part.shape[0] + 1), v0, v1)
        c0, c1 = _grow(max(h0, lh - 1), min(h1, lh + part.shape[1] + 1), h0, h1)
        patch = np.zeros((r1 - r0, c1 - c0), np.float32)
        src = part[max(r0 - lv, 0):r1 - lv, max(c0 - lh, 0):c1 - lh]
        patch[max(lv - r0, 0):max(lv - r0, 0) + src.shape[0], max(lh - c0, 0):max(lh - c0, 0) + src.shape[1]] = src
        if not patch.any():
            return None
        sh, sv = spacing[h], spacing[v]
        return patch, ((c0 - h0) * sh, (c1 - h0) * sh, (r0 - v0) * sv, (r1 - v0) * sv)


def _grow(lo: int, hi: int, first: int, end: int) -> tuple[int, int]:
    """[lo, hi) widened to at least 2 within [first, end) (which holds at least 2)."""
    if hi - lo >= 2:
        return lo, hi
    hi = min(end, max(hi, lo + 2))
    return min(lo, hi - 2), hi


def _class_masks(mask: Any, names: list[str], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """{class name: bool (X, Y, Z), True = lesion}: one array for every class, or a mapping per
    class. One array given for several classes is converted once and shared."""
    if mask is None:
        return {}
    if isinstance(mask, dict):
        given = {nm: mask[nm] for nm in names if nm in mask and mask[nm] is not None}
    else:
        given = {nm: mask for nm in names}
    done: dict[int, np.ndarray] = {}
    out = {}
    for nm, m in given.items():
        if id(m) not in done:
            a = _array(m)
            a = a.reshape(a.shape[-3:]) if a.ndim == 4 and a.shape[0] == 1 else a
            if a.shape != tuple(shape):
                raise ValueError(f"mask for {nm!r} has shape {a.shape}, the scan {tuple(shape)}; "
                                 "put it on the scan's grid")
            done[id(m)] = a > 0
        out[nm] = done[id(m)]
    return out


def _flags(expl: Any) -> list[str | None]:
    """Per class the empty-map flag of the NIfTI/manifest record (None where there is none)."""
    try:
        from medcam3d.io.export import class_records

        flags = [r.get("flag") for r in class_records(expl, list(expl.class_names))]
    except Exception:
        flags = [None] * len(getattr(expl, "class_names", []))
    saved = (getattr(expl, "extra", None) or {}).get("flags") or []  # maps read back from files
    return [f or (saved[i] if i < len(saved) else None) for i, f in enumerate(flags)]

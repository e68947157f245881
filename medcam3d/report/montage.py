"""PNG montage of an explanation: per class, axial/coronal/sagittal slices through the map's peak,
the CT in a display window with the map overlaid, the lesion mask's outline when one is given, a
colour bar and the class probability.

Slices are shown in RAS-reoriented (closest canonical) space with the physical aspect ratio from
the voxel spacing, in radiological convention (patient's right on the image's left).

Layout (robust for any scan shape): one matplotlib sub-figure per class, so each class's title sits
in its own band above its panels and can never overlap an image; panel widths follow the panels'
physical widths, and the figure's height follows the tallest panel, so little space is empty. A
panel more than :data:`MAX_PANEL_ASPECT` times wider than tall (the coronal/sagittal views of a
thin slab, e.g. a 20-slice series) is cropped to that aspect around the map's peak, which keeps it
readable; its label says so. Matplotlib is used through its object API with the Agg canvas, so no
GUI backend is touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medcam3d.metrics.peak import first_max_index

_VIEWS = (
    # name, axis held fixed, (horizontal axis, vertical axis), axis letters (left, right, bottom, top)
    ("axial", 2, (0, 1), ("R", "L", "P", "A")),
    ("coronal", 1, (0, 2), ("R", "L", "I", "S")),
    ("sagittal", 0, (1, 2), ("A", "P", "I", "S")),
)
#: Widest panel shown uncropped (width / height, in mm).
MAX_PANEL_ASPECT = 2.5
FIG_WIDTH_IN = 12.0
MASK_COLOUR = "#00e5ff"


def _numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        t = t.as_tensor() if hasattr(t, "as_tensor") else t
        return t.float().numpy()
    return np.asarray(t, dtype=np.float32)


def to_ras(arrays: list[np.ndarray], affine: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Reorient (X, Y, Z) arrays to the closest RAS axis order; also return the spacing (mm)."""
    import nibabel.orientations as nio

    ornt = nio.io_orientation(affine)
    out = [nio.apply_orientation(a, ornt) for a in arrays]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[ornt[:, 0].astype(int)]
    return out, spacing


def _slice(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A view of ``vol`` at ``index`` along ``axis`` (np.take would copy all of a strided array)."""
    return vol[(slice(None),) * axis + (index,)]


@dataclass
class MapPanel:
    """What the montage shows of one class: its peak (RAS-reoriented voxel index), the map's slice
    through the peak for each view (rows = vertical axis) and its maximum."""

    peak: tuple[int, ...]
    slices: list[np.ndarray]
    vmax: float


def map_panel(m: Any, affine: np.ndarray) -> MapPanel:
    """The :class:`MapPanel` of one (X, Y, Z) map on the grid of ``affine`` (keeps 3 slices, not the map)."""
    (m_ras,), _ = to_ras([_numpy(m)], np.asarray(affine, dtype=np.float64))
    vmax = float(m_ras.max())
    peak = first_max_index(m_ras) if vmax > 0 else tuple(s // 2 for s in m_ras.shape)
    peak = tuple(int(p) for p in peak)
    slices = [np.ascontiguousarray(_slice(m_ras, axis, peak[axis]).T) for _, axis, _, _ in _VIEWS]
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
    s = _slice(vol, p["axis"], index)  # the two remaining axes keep their order (h < v)
    return _shown(s.T, p)


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
        fig.savefig(tmp, format="png")
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

    maps_t = getattr(expl, "maps", None)
    grid = maps_t if maps_t is not None else getattr(expl, "grid", None)
    affine = _numpy(grid.affine if hasattr(grid, "affine") else volume.affine).astype(np.float64)
    if panels is None:
        maps_iter = expl.iter_maps() if hasattr(expl, "iter_maps") else _numpy(maps_t)
        panels = [map_panel(m, affine) for m in maps_iter]
    ct = _numpy(volume)[0]
    names = list(getattr(expl, "class_names", []))
    masks = _class_masks(mask, names, ct.shape)
    keys = [nm for nm in names if nm in masks]
    (ct, *rest), spacing = to_ras([ct, *[masks[nm] for nm in keys]], affine)
    masks_ras = dict(zip(keys, rest))
    probs = _numpy(expl.probabilities).reshape(-1) if getattr(expl, "probabilities", None) is not None else None
    flags = _flags(expl)
    n = len(panels)

    peaks = [pn.peak for pn in panels]
    layouts = [_panels(ct.shape, spacing, pk) for pk in peaks]
    # the three panels of a row get the same height, each keeping its own physical aspect, so a thin
    # slab's coronal view is as tall as the axial one; widths follow the aspects
    row_h = []
    for lay in layouts:
        aspects = sum(p["w_mm"] / p["h_mm"] for p in lay)
        row_h.append((FIG_WIDTH_IN - 1.4) / aspects + 1.1)  # + colour bar room, title band, labels
    fig = Figure(figsize=(FIG_WIDTH_IN, sum(row_h) + (0.5 if title else 0.1)), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    subfigs = fig.subfigures(n, 1, squeeze=False, height_ratios=row_h)[:, 0]
    for k, (pn, lay, peak, sf) in enumerate(zip(panels, layouts, peaks, subfigs)):
        vmax = pn.vmax
        axes = sf.subplots(1, 3, width_ratios=[p["w_mm"] / p["h_mm"] for p in lay])
        image = None
        for col, (ax, p) in enumerate(zip(axes, lay)):
            idx = int(peak[p["axis"]])
            ct2, m2 = _view(ct, p, idx), _shown(pn.slices[col], p)
            extent = (0.0, p["w_mm"], 0.0, p["h_mm"])
            ax.imshow(ct2, cmap="gray", vmin=window[0], vmax=window[1], origin="lower",
                      extent=extent, interpolation="nearest")
            if vmax > 0:
                shown = np.ma.masked_less(m2, 0.1 * vmax)
                image = ax.imshow(shown, cmap="inferno", vmin=0.0, vmax=vmax, origin="lower",
                                  extent=extent, alpha=0.55, interpolation="nearest")
            note = ""
            mask_ras = masks_ras.get(names[k]) if k < len(names) else None
            if mask_ras is not None:
                k2 = _view(mask_ras, p, idx)
                if k2.any():  # the lesion crosses this slice: its outline
                    ax.contour(k2, levels=[0.5], colors=MASK_COLOUR, linewidths=1.2, origin="lower",
                               extent=extent)
                else:  # it does not: the outline of its projection along the slice axis, dashed
                    proj = _view(mask_ras.max(axis=p["axis"], keepdims=True), p, 0)
                    if proj.any():
                        ax.contour(proj, levels=[0.5], colors=MASK_COLOUR, linewidths=1.0,
                                   linestyles="dashed", origin="lower", extent=extent)
                    note = ", mask projected"
            ax.invert_xaxis()  # radiological: patient's right (or anterior) on the left
            ax.set_xticks([])
            ax.set_yticks([])
            crop = ", cropped" if p["cropped"] else ""
            letters = p["letters"]
            ax.set_xlabel(f"{letters[0]} ← → {letters[1]}  ({p['name']} {idx}{crop}{note})", fontsize=8)
            ax.set_ylabel(f"{letters[2]} → {letters[3]}", fontsize=8)
        cname = expl.class_names[k] if k < len(expl.class_names) else f"class_{k}"
        ptxt = f"p = {float(probs[k]):.3f}" if probs is not None and k < len(probs) else ""
        zero = f"  — {flags[k]}" if flags[k] else ("  — map is all zero" if vmax <= 0 else "")
        sf.suptitle(f"{cname}: {ptxt}  [{expl.method}, {expl.target_layer}]{zero}", fontsize=10,
                    color="#b00000" if vmax <= 0 else "black")
        if image is not None:
            bar = sf.colorbar(image, ax=list(axes), fraction=0.025, pad=0.01, shrink=0.9)
            bar.set_label("map (not normalised)", fontsize=8)
    if title:
        legend = "   (cyan: lesion mask; dashed = projected from other slices)" if masks_ras else ""
        fig.suptitle(title + legend, fontsize=11)
    return fig


def _class_masks(mask: Any, names: list[str], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """{class name: float32 0/1 (X, Y, Z)}: one array for every class, or a mapping per class."""
    if mask is None:
        return {}
    if isinstance(mask, dict):
        given = {nm: mask[nm] for nm in names if nm in mask and mask[nm] is not None}
    else:
        given = {nm: mask for nm in names}
    out = {}
    for nm, m in given.items():
        a = _numpy(m)
        a = a.reshape(a.shape[-3:]) if a.ndim == 4 and a.shape[0] == 1 else a
        if a.shape != tuple(shape):
            raise ValueError(f"mask for {nm!r} has shape {a.shape}, the scan {tuple(shape)}; put it on the scan's grid")
        out[nm] = (a > 0).astype(np.float32)
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

"""PNG montage of an explanation: per class, axial/coronal/sagittal slices through the map's peak,
the CT in a display window with the map overlaid, a colour bar and the class probability.

Slices are shown in RAS-reoriented (closest canonical) space with the physical aspect ratio from
the voxel spacing, in radiological convention (patient's right on the image's left). Matplotlib is
used through its object API with the Agg canvas, so no GUI backend is touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_VIEWS = (
    # name, axis held fixed, (horizontal axis, vertical axis), axis letters (left, right, bottom, top)
    ("axial", 2, (0, 1), ("R", "L", "P", "A")),
    ("coronal", 1, (0, 2), ("R", "L", "I", "S")),
    ("sagittal", 0, (1, 2), ("A", "P", "I", "S")),
)


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
    return np.take(vol, index, axis=axis)


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
    peak = np.unravel_index(int(np.argmax(m_ras)), m_ras.shape) if vmax > 0 else tuple(s // 2 for s in m_ras.shape)
    peak = tuple(int(p) for p in peak)
    slices = [np.ascontiguousarray(_slice(m_ras, axis, peak[axis]).T) for _, axis, _, _ in _VIEWS]
    return MapPanel(peak, slices, vmax)


def save_montage(
    volume: Any,
    expl: Any,
    path: str | os.PathLike[str],
    window: tuple[float, float] = (-1350.0, 150.0),
    title: str | None = None,
    panels: list[MapPanel] | None = None,
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
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    maps = getattr(expl, "maps", None)
    affine = _numpy(maps.affine if hasattr(maps, "affine") else volume.affine).astype(np.float64)
    if panels is None:
        panels = [map_panel(m, affine) for m in expl.iter_maps()]
    (ct,), spacing = to_ras([_numpy(volume)[0]], affine)
    probs = _numpy(expl.probabilities).reshape(-1) if getattr(expl, "probabilities", None) is not None else None
    n = len(panels)
    fig = Figure(figsize=(11.5, 3.4 * n + 0.6), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 3, squeeze=False)
    for k, panel in enumerate(panels):
        vmax, peak = panel.vmax, panel.peak
        image = None
        for col, (name, axis, (h, v), letters) in enumerate(_VIEWS):
            ax = axes[k, col]
            ct2 = _slice(ct, axis, peak[axis]).T  # rows = vertical axis
            m2 = panel.slices[col]
            extent = (0.0, ct.shape[h] * spacing[h], 0.0, ct.shape[v] * spacing[v])
            ax.imshow(ct2, cmap="gray", vmin=window[0], vmax=window[1], origin="lower",
                      extent=extent, interpolation="nearest")
            if vmax > 0:
                shown = np.ma.masked_less(m2, 0.1 * vmax)
                image = ax.imshow(shown, cmap="inferno", vmin=0.0, vmax=vmax, origin="lower",
                                  extent=extent, alpha=0.55, interpolation="nearest")
            ax.invert_xaxis()  # radiological: patient's right (or anterior) on the left
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"{letters[0]} ← → {letters[1]}   ({name}, slice {peak[axis]})", fontsize=8)
            ax.set_ylabel(f"{letters[2]} → {letters[3]}", fontsize=8)
        cname = expl.class_names[k] if k < len(expl.class_names) else f"class_{k}"
        ptxt = f"p = {float(probs[k]):.3f}" if probs is not None and k < len(probs) else ""
        zero = "  (map is all zero)" if vmax <= 0 else ""
        axes[k, 1].set_title(f"{cname}: {ptxt}  [{expl.method}, {expl.target_layer}]{zero}", fontsize=10)
        if image is not None:
            bar = fig.colorbar(image, ax=list(axes[k]), fraction=0.02, pad=0.01)
            bar.set_label("map (not normalised)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    out = Path(path)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out)
    return out

"""CT display windows for the viewer: named presets, [level, width] pairs, and an automatic choice.

The presets are the project's shared table (:data:`medcam3d.config.WINDOWS`, also used by montages),
so a "lung" window looks the same in napari and in a saved PNG. A window becomes napari contrast
limits ``level ± width / 2`` (lung: L −600 / W 1500 → −1350..150 HU).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from medcam3d.config.windows import WINDOWS, Window
from medcam3d.errors import InputError

AUTO = "auto"
#: Share of the body (air inside it included) below −500 HU above which a scan is called a chest CT.
LUNG_SHARE = 0.10
_AIR_HU = -500.0


def window_names() -> list[str]:
    """Preset names a user can pick (``view(window=...)`` and the "CT window" dock widget)."""
    return list(WINDOWS)


def lung_share(data: np.ndarray, z_axis: int = 2) -> float:
    """Share of the body's voxels darker than −500 HU (lungs, bowel gas).

    The body is what lies above −500 HU plus every hole it encloses in each axial slice (so the
    lungs count as body, the air around the patient does not). Chest CTs score ≈ 0.2–0.3, abdominal
    ones < 0.05. Slices are subsampled to ≤ 128 pixels a side: this costs milliseconds.
    """
    from scipy import ndimage

    a = np.moveaxis(np.asarray(data), z_axis, 0)
    step = max(1, int(np.ceil(max(a.shape[1:]) / 128)))
    tissue = a[:, ::step, ::step] > _AIR_HU
    body = np.stack([ndimage.binary_fill_holes(s) for s in tissue])
    n = int(body.sum())
    return float((body & ~tissue).sum() / n) if n else 0.0


def auto_window(data: np.ndarray, z_axis: int = 2) -> Window:
    """The lung window for a chest CT (large dark share of the body), else the abdomen window."""
    return WINDOWS["lung"] if lung_share(data, z_axis) >= LUNG_SHARE else WINDOWS["abdomen"]


def resolve_window(window: Any, data: np.ndarray | None = None, z_axis: int = 2) -> Window:
    """Turn ``window`` into a :class:`~medcam3d.config.Window`.

    Args:
        window: None or "auto" (chosen from ``data``), a preset name (see :func:`window_names`),
            a ``Window``, a ``(level, width)`` pair in HU, or ``{"level": L, "width": W}``.
        data: the CT array (HU), needed for the automatic choice.
        z_axis: the array axis closest to the patient's head-foot axis.

    Raises:
        InputError: unknown name, malformed pair, or width <= 0.
    """
    if window is None or (isinstance(window, str) and window.lower() == AUTO):
        if data is None:
            return WINDOWS["abdomen"]
        return auto_window(data, z_axis)
    if isinstance(window, Window):
        return window
    if isinstance(window, str):
        key = window.lower().replace("-", "_").replace(" ", "_")
        if key in WINDOWS:
            return WINDOWS[key]
        raise InputError(
            f"window={window!r} is not a CT window preset; use one of {', '.join(WINDOWS)}, 'auto', "
            "or a (level, width) pair in HU such as (-600, 1500)."
        )
    if isinstance(window, Mapping):
        window = (window.get("level"), window.get("width"))
    try:
        level, width = (float(v) for v in window)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise InputError(
            f"window={window!r} is neither a preset name nor a (level, width) pair in HU; "
            f"use e.g. 'lung' or (-600, 1500). Presets: {', '.join(WINDOWS)}."
        ) from None
    if not (np.isfinite(level) and np.isfinite(width)) or width <= 0:
        raise InputError(f"window (level={level}, width={width}): width must be a finite number > 0 HU.")
    return Window("custom", level, width)

"""``medcam3d view SCAN [MAP ...]``: open a scan and saved maps in napari (imported lazily)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medcam3d.errors import Medcam3dError

NAPARI_MISSING = (
    "napari is not installed; install the viewer extra: pip install 'medcam3d-hirescam[napari]'"
)


class ViewerUnavailable(Medcam3dError, RuntimeError):
    """napari (or a Qt binding) cannot be imported."""


def import_napari() -> Any:
    """napari, or ViewerUnavailable with an install hint."""
    try:
        import napari
    except ImportError as exc:
        raise ViewerUnavailable(f"{NAPARI_MISSING} ({exc})") from exc
    return napari


def open_viewer(scan: str | os.PathLike[str], maps: list[str | os.PathLike[str]],
                window: tuple[float, float]) -> Any:
    """Build the napari viewer: the scan (``window`` = (level, width) HU) with each map overlaid.

    Uses :func:`medcam3d.viewer.view` for the scan and the viewer's map reader for the map files
    (class, method and layer from the header medcam3d wrote), so layers sit in world space.
    """
    import_napari()
    from medcam3d.viewer import view
    from medcam3d.viewer.reader import read_map

    paths = [Path(m) for m in maps]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        from medcam3d.errors import VolumeLoadError

        raise VolumeLoadError(f"map file(s) not found: {', '.join(missing)}")
    layer_data = [item for p in paths for item in read_map(p)]  # read all before opening a window
    viewer = view(scan, window=window)
    for data, kwargs, kind in layer_data:
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    return viewer


def run_view(scan: str | os.PathLike[str], maps: list[str | os.PathLike[str]],
             window: tuple[float, float]) -> None:
    """Open the viewer and block in napari's event loop until it is closed."""
    napari = import_napari()
    open_viewer(scan, maps, window)
    napari.run()

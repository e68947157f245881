"""medcam3d.viewer: napari layers, the npe2 plugin (reader, dock widgets, sample data) and ``view``.

Importing this package does not import napari or Qt; they load when a viewer function runs.
Public API: :func:`view` (also ``medcam3d.view``).
"""

from __future__ import annotations

from medcam3d.viewer.view import view

__all__ = ["view"]

"""Kept importable for existing code: :class:`Explanation` now lives in :mod:`medcam3d.explanation`."""

from medcam3d.explanation import Explanation

__all__ = ["Explanation"]

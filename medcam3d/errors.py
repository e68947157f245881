"""Exception types raised by medcam3d's public entry points.

Every user-facing error is a subclass of :class:`Medcam3dError`, so callers can catch the whole
family at once, and also of the matching built-in type (``ValueError``, ``OSError``...), so code
written against the built-ins keeps working. Messages say what went wrong, where, and what to do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


class Medcam3dError(Exception):
    """Base class of every error medcam3d raises on purpose."""


class InputError(Medcam3dError, ValueError):
    """A tensor or argument given to the engine has the wrong type, rank, dtype or value."""


class TargetLayerError(Medcam3dError, ValueError):
    """The target layer is unknown, not part of the model, or does not emit a spatial map."""


class ClassIndexError(Medcam3dError, IndexError):
    """A requested class index is outside the model's outputs."""


class VolumeLoadError(Medcam3dError, ValueError):
    """A scan (NIfTI file or DICOM series) could not be read or is not a usable CT volume."""


class ExportError(Medcam3dError, OSError):
    """A map could not be written (unwritable folder, existing file, output would overwrite input)."""


class ConfigError(Medcam3dError, ValueError):
    """A configuration (dict or YAML) is invalid; the message names the key path."""


class OutputExistsError(ExportError):
    """An output file already exists and overwriting was not asked for; ``paths`` lists them."""

    def __init__(self, message: str, paths: Sequence[str | os.PathLike[str]] = ()) -> None:
        super().__init__(message)
        self.paths = [Path(p) for p in paths]


class FeatureGeometryError(TargetLayerError):
    """Where the target layer's cells sit in the input could not be measured unambiguously (feature
    axes not aligned with input axes, centres not linear in the cell index, a layer the geometry probe
    cannot make symmetric). Declare it with ``feature_geometry=``; see medcam3d.engine.geometry."""

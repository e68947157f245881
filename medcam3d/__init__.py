"""medcam3d: faithful HiResCAM / Grad-CAM explanations of 3D CT classifiers, on the scan's own grid.

Every public name is imported on first use (the engine pulls in torch; I/O, spatial mapping and
metrics pull in MONAI and nibabel; the viewer napari), so ``import medcam3d`` and ``medcam3d --help``
import none of them, and ``import medcam3d`` never needs Qt. Only the error classes are eager.
"""

from __future__ import annotations

import importlib
from typing import Any

from medcam3d.errors import (
    ClassIndexError,
    ConfigError,
    ExportError,
    FeatureGeometryError,
    InputError,
    Medcam3dError,
    OutputExistsError,
    TargetLayerError,
    VolumeLoadError,
)

__version__ = "0.1.0"

# Public names that live in modules with heavier dependencies (torch, monai, nibabel, napari).
_LAZY = {
    "METHODS": "medcam3d.engine",
    "CAMResult": "medcam3d.engine",
    "ClassSpec": "medcam3d.engine",
    "Completeness": "medcam3d.engine",
    "EigenCAM": "medcam3d.engine",
    "FeatureGeometry": "medcam3d.engine",
    "GradCAM": "medcam3d.engine",
    "GradCAMElementWise": "medcam3d.engine",
    "GradCAMPlusPlus": "medcam3d.engine",
    "GradientXInput": "medcam3d.engine",
    "HiResCAM": "medcam3d.engine",
    "LayerCAM": "medcam3d.engine",
    "MultiCAM": "medcam3d.engine",
    "OutputKey": "medcam3d.engine",
    "RegionScore": "medcam3d.engine",
    "Similarity": "medcam3d.engine",
    "XGradCAM": "medcam3d.engine",
    "completeness_gap": "medcam3d.engine",
    "make_cam": "medcam3d.engine",
    "load_volume": "medcam3d.io",
    "save_nifti": "medcam3d.io",
    "load_explanation": "medcam3d.io.maps",
    "explain_volume": "medcam3d.spatial",
    "Explanation": "medcam3d.explanation",
    "build_preprocessing": "medcam3d.spatial",
    "model_input": "medcam3d.spatial",
    "load_run_config": "medcam3d.config",
    "view": "medcam3d.viewer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'medcam3d' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ClassIndexError",
    "ConfigError",
    "FeatureGeometryError",
    "ExportError",
    "InputError",
    "Medcam3dError",
    "OutputExistsError",
    "TargetLayerError",
    "VolumeLoadError",
    *_LAZY,
]

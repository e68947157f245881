"""medcam3d: faithful HiResCAM / Grad-CAM explanations of 3D CT classifiers, on the scan's own grid.

The engine (tensors only) is imported eagerly; file I/O, spatial mapping, metrics and the napari
viewer are imported on first use so ``import medcam3d`` stays light and never needs Qt.
"""

from __future__ import annotations

import importlib
from typing import Any

from medcam3d.engine import (
    METHODS,
    CAMResult,
    ClassSpec,
    Completeness,
    EigenCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    GradientXInput,
    HiResCAM,
    LayerCAM,
    MultiCAM,
    OutputKey,
    RegionScore,
    Similarity,
    XGradCAM,
    completeness_gap,
    make_cam,
)
from medcam3d.errors import (
    ClassIndexError,
    ConfigError,
    ExportError,
    InputError,
    Medcam3dError,
    TargetLayerError,
    VolumeLoadError,
)

__version__ = "0.1.0"

# Public names that live in modules with heavier dependencies (monai, nibabel, napari).
_LAZY = {
    "load_volume": "medcam3d.io",
    "save_nifti": "medcam3d.io",
    "load_explanation": "medcam3d.io.maps",
    "explain_volume": "medcam3d.spatial",
    "Explanation": "medcam3d.explanation",
    "build_preprocessing": "medcam3d.spatial",
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
    "METHODS",
    "CAMResult",
    "ClassIndexError",
    "ClassSpec",
    "Completeness",
    "ConfigError",
    "EigenCAM",
    "ExportError",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "GradientXInput",
    "HiResCAM",
    "InputError",
    "LayerCAM",
    "Medcam3dError",
    "MultiCAM",
    "OutputKey",
    "RegionScore",
    "Similarity",
    "TargetLayerError",
    "VolumeLoadError",
    "XGradCAM",
    "completeness_gap",
    "make_cam",
    *_LAZY,
]

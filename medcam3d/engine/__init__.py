"""The explanation engine: HiResCAM and Grad-CAM on tensors. Knows nothing of files or viewers."""

from medcam3d.engine.cam import METHODS, BaseCAM, GradCAM, HiResCAM, make_cam
from medcam3d.engine.completeness import Completeness, completeness_gap
from medcam3d.engine.result import CAMResult, upsample_maps
from medcam3d.engine.targets import Target, resolve_target

__all__ = [
    "METHODS",
    "BaseCAM",
    "CAMResult",
    "Completeness",
    "GradCAM",
    "HiResCAM",
    "Target",
    "completeness_gap",
    "make_cam",
    "resolve_target",
    "upsample_maps",
]

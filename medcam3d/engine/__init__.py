"""The explanation engine: class activation maps on tensors. Knows nothing of files or viewers."""

from medcam3d.engine.cam import (
    METHODS,
    BaseCAM,
    EigenCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    GradientXInput,
    HiResCAM,
    LayerCAM,
    MultiCAM,
    XGradCAM,
    make_cam,
    method_name,
)
from medcam3d.engine.completeness import RTOL_BY_DTYPE, Completeness, completeness_gap
from medcam3d.engine.geometry import FeatureGeometry, measure_geometry, place_maps
from medcam3d.engine.result import CAMResult, upsample_maps
from medcam3d.engine.scores import ClassLogits, OutputKey, RegionScore, ScoreSpec, Similarity
from medcam3d.engine.selection import ClassSpec
from medcam3d.engine.targets import Target, resolve_target, unwrap_compiled

__all__ = [
    "METHODS",
    "RTOL_BY_DTYPE",
    "BaseCAM",
    "CAMResult",
    "ClassLogits",
    "ClassSpec",
    "Completeness",
    "EigenCAM",
    "FeatureGeometry",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "GradientXInput",
    "HiResCAM",
    "LayerCAM",
    "MultiCAM",
    "OutputKey",
    "RegionScore",
    "ScoreSpec",
    "Similarity",
    "Target",
    "XGradCAM",
    "completeness_gap",
    "make_cam",
    "method_name",
    "measure_geometry",
    "place_maps",
    "resolve_target",
    "unwrap_compiled",
    "upsample_maps",
]

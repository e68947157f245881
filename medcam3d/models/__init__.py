"""medcam3d.models: the bundled demo classifiers (trained on synthetic chest CT) and their helpers.

    from medcam3d.models import load_demo_model, demo_preprocess, CLASS_NAMES
    model = load_demo_model("gap")        # MONAI DenseNet, GAP head
    flat = load_demo_model("flatten")     # MONAI Classifier, flatten + linear head
    axial = load_demo_model("axialnet")   # AxialNet: 2D CNN per axial slice, per-slice FC, mean over slices
"""

from medcam3d.models.auroc import auroc, per_class_auroc
from medcam3d.models.axialnet import AxialNet
from medcam3d.models.demo import (
    AXIAL_KWARGS,
    CELL_HALF_DIAGONAL_MM,
    CLASS_NAMES,
    FLATTEN_KWARGS,
    GAP_CELL_MM,
    GAP_EARLY_LAYER,
    GAP_KWARGS,
    HU_WINDOW,
    INPUT_SHAPE,
    KINDS,
    SPACING,
    TARGET_LAYERS,
    build_demo_model,
    demo_preprocess,
    demo_run_config,
    load_demo_model,
    weights_path,
)

__all__ = [
    "AXIAL_KWARGS",
    "AxialNet",
    "CELL_HALF_DIAGONAL_MM",
    "CLASS_NAMES",
    "FLATTEN_KWARGS",
    "GAP_CELL_MM",
    "GAP_EARLY_LAYER",
    "GAP_KWARGS",
    "HU_WINDOW",
    "INPUT_SHAPE",
    "KINDS",
    "SPACING",
    "TARGET_LAYERS",
    "auroc",
    "build_demo_model",
    "demo_preprocess",
    "demo_run_config",
    "load_demo_model",
    "per_class_auroc",
    "weights_path",
]

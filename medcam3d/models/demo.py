"""The bundled demo classifiers: small MONAI 3D nets trained on synthetic chest CT (medcam3d.synthetic).

The models share one input convention (:data:`INPUT_SHAPE` voxels at :data:`SPACING` mm, RAS, HU
windowed to [0, 1] with :data:`HU_WINDOW`) and three multi-label outputs (:data:`CLASS_NAMES`):

- ``"gap"``: MONAI ``DenseNet`` ending in global average pooling + linear (the usual 3D CNN head).
  At its last layer HiResCAM and Grad-CAM coincide.
- ``"axialnet"``: :class:`medcam3d.models.axialnet.AxialNet` (2D CNN per axial slice, per-slice FC as a
  convolution, mean over slices), the paper author's CT architecture: a spatial head on which
  HiResCAM is exactly the model's computation and Grad-CAM is not (the paper-claim model).
- ``"flatten"``: MONAI ``Classifier`` (conv stack -> flatten -> one linear layer), a head with a
  weight per position: HiResCAM's map sums exactly to the logit minus the bias; Grad-CAM's does not.

Weights are loaded with ``torch.load(weights_only=True)``; see MODEL_CARD.md for how they were made.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medcam3d.errors import ConfigError, InputError
from medcam3d.models.axialnet import AXIAL_TARGET_LAYER, AxialNet
from medcam3d.synthetic import CLASS_NAMES, DEFAULT_FOV_MM, DEFAULT_SHAPE

#: Model input grid (x, y, z voxels, RAS) = the synthetic generator's default grid.
INPUT_SHAPE: tuple[int, int, int] = tuple(DEFAULT_SHAPE)  # type: ignore[assignment]
#: Voxel size of the model input in mm.
SPACING: tuple[float, float, float] = tuple(f / n for f, n in zip(DEFAULT_FOV_MM, DEFAULT_SHAPE))  # type: ignore[assignment]
#: HU window mapped linearly (and clipped) to [0, 1].
HU_WINDOW: tuple[float, float] = (-1000.0, 400.0)

#: Constructor arguments, also written into sample_configs/demo.yaml.
GAP_KWARGS: dict[str, Any] = {
    "spatial_dims": 3, "in_channels": 1, "out_channels": len(CLASS_NAMES),
    "init_features": 16, "growth_rate": 8, "block_config": (4, 4),
}
#: AxialNet (medcam3d.models.axialnet): 2D CNN per axial slab of 3 adjacent slices (as channels, like the
#: original's 3-slice "RGB" images; stride 16 -> 4 x 4 cells of 80 x 80 x 18 mm), per-slice FC as a
#: Conv3d with a (4, 4, 1) kernel, mean over the 16 slabs.
AXIAL_KWARGS: dict[str, Any] = {
    "slice_shape": INPUT_SHAPE[:2], "classes": len(CLASS_NAMES),
    "channels": (16, 32, 32, 32), "strides": (2, 2, 2, 2), "slab": 3,
}
FLATTEN_KWARGS: dict[str, Any] = {
    "in_shape": (1, *INPUT_SHAPE), "classes": len(CLASS_NAMES),
    "channels": (8, 16, 32, 32), "strides": (2, 2, 2, 2),
}
#: Size (mm) of one cell of the GAP model's last feature map (stride 8: 8 x 8 x 6 cells). A map at
#: that layer is a cell-level answer; its upsampled peak sits at a cell centre, so "the peak lands on
#: the lesion" can only mean "within half a cell diagonal of it" (:data:`CELL_HALF_DIAGONAL_MM`).
GAP_CELL_MM: tuple[float, float, float] = tuple(8 * s for s in SPACING)  # type: ignore[assignment]
CELL_HALF_DIAGONAL_MM: float = 0.5 * sum(c * c for c in GAP_CELL_MM) ** 0.5
#: Layer explained by default: the GAP model's last feature map, the flatten model's last conv block.
TARGET_LAYERS: dict[str, str] = {"gap": "class_layers.relu", "flatten": "net", "axialnet": AXIAL_TARGET_LAYER}
#: An earlier layer of the GAP model (inside the transition between its two dense blocks, before the
#: pooling: 16 x 16 x 12 cells), for comparisons.
GAP_EARLY_LAYER = "features.transition1.relu"
WEIGHT_FILES: dict[str, str] = {"gap": "demo_weights.pt", "flatten": "demo_flatten_weights.pt",
                                "axialnet": "demo_axialnet_weights.pt"}
KINDS = tuple(WEIGHT_FILES)


def _check_kind(kind: str) -> str:
    if kind not in WEIGHT_FILES:
        raise InputError(f"demo model kind must be one of {', '.join(KINDS)}; got {kind!r}.")
    return kind


def build_demo_model(kind: str = "gap") -> nn.Module:
    """An untrained demo network of the given kind ("gap", "flatten" or "axialnet"), in train mode."""
    from monai.networks.nets import Classifier, DenseNet

    if _check_kind(kind) == "gap":
        return DenseNet(**GAP_KWARGS)
    if kind == "axialnet":
        return AxialNet(**AXIAL_KWARGS)
    return Classifier(**FLATTEN_KWARGS)


def weights_path(kind: str = "gap") -> Path:
    """Path of the shipped weights file of ``kind`` inside the installed package."""
    return Path(str(resources.files("medcam3d.models").joinpath(WEIGHT_FILES[_check_kind(kind)])))


def load_demo_model(kind: str = "gap", weights: str | Path | None = None) -> nn.Module:
    """The trained demo model in eval mode on CPU (weights: the shipped file unless given).

    Raises ConfigError when the weights file is missing or does not fit the network.
    """
    model = build_demo_model(kind)
    path = Path(weights) if weights is not None else weights_path(kind)
    if not path.is_file():
        raise ConfigError(f"demo model weights not found: {str(path)!r}; retrain with "
                          "`python scripts/train_demo_model.py` (see medcam3d/models/MODEL_CARD.md)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"demo weights {str(path)!r} do not fit the {kind!r} demo model: "
                          f"{str(exc).splitlines()[0]}") from exc
    return model.eval()


def demo_preprocess(crop: bool = True) -> list[dict[str, Any]]:
    """Preprocessing (config format, see medcam3d.build_preprocessing) mapping any CT to the input grid.

    Orientation RAS -> resample to :data:`SPACING` -> HU window to [0, 1] -> centre pad/crop to
    :data:`INPUT_SHAPE`. A synthetic scan is already on this grid, so the steps are identities there.
    """
    steps: list[dict[str, Any]] = [
        {"name": "Orientation", "axcodes": "RAS"},
        {"name": "Spacing", "pixdim": list(SPACING), "mode": "bilinear"},
        {"name": "ScaleIntensityRange", "a_min": HU_WINDOW[0], "a_max": HU_WINDOW[1],
         "b_min": 0.0, "b_max": 1.0, "clip": True},
    ]
    if crop:
        steps.append({"name": "ResizeWithPadOrCrop", "spatial_size": list(INPUT_SHAPE)})
    return steps


def demo_run_config(methods: tuple[str, ...] = ("hirescam", "gradcam")) -> dict[str, Any]:
    """The run config (dict form of sample_configs/demo.yaml) with the shipped weights' absolute path.

    Works from an installed package (no repository checkout needed); used by ``medcam3d demo``.
    """
    return {
        "model": {"name": "DenseNet",
                  "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in GAP_KWARGS.items()},
                  "checkpoint": str(weights_path("gap"))},
        "preprocess": demo_preprocess(),
        "methods": list(methods),
        "target_layer": TARGET_LAYERS["gap"],
        "class_names": list(CLASS_NAMES),
        "activation": "sigmoid",
        "class_idx": "all",
        "output": {"four_d": False, "montage": True, "window": "lung"},
    }

"""The preprocessing chain between the scan and the model: built, checked, applied.

A chain is a ``monai.transforms.Compose`` of array (not dictionary) transforms. Every step that
changes the geometry must be a MONAI ``InvertibleTransform`` so the maps can travel back through
exactly the same steps; intensity steps need no inverse (maps are not intensities). Random
transforms are refused: an explanation must be reproducible. Steps of unknown kind (utility or
user callables) are allowed but checked at run time: they must keep the grid (shape and affine).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from medcam3d.errors import ConfigError
from medcam3d.spatial.config import is_windowing, transform_from_config

_INTENSITY_MODULES = ("monai.transforms.intensity.",)
_GEOMETRY_MODULES = ("monai.transforms.spatial.", "monai.transforms.croppad.")


def _check_step(t: Any, path: str) -> Any:
    """Refuse dictionary, random and non-invertible geometry transforms; return ``t``."""
    from monai.transforms import Compose, InvertibleTransform, MapTransform, Randomizable
    from monai.transforms.transform import LazyTransform

    name = type(t).__name__
    if isinstance(t, MapTransform):
        raise ConfigError(
            f"{path}: {name} is a dictionary transform; pass array transforms (e.g. Spacing, not Spacingd)."
        )
    if isinstance(t, Randomizable):
        raise ConfigError(
            f"{path}: {name} is random; an explanation must be reproducible, so use deterministic "
            "transforms only (no augmentation)."
        )
    if isinstance(t, Compose):
        raise ConfigError(f"{path}: nested Compose should have been flattened")  # pragma: no cover
    if not callable(t):
        raise ConfigError(
            f"{path}: expected a mapping like {{name: Spacing, pixdim: [2, 2, 2]}} or a MONAI transform "
            f"object, got {type(t).__name__} {t!r}."
        )
    module = type(t).__module__ + "."
    if not isinstance(t, InvertibleTransform) and module.startswith(_GEOMETRY_MODULES):
        raise ConfigError(
            f"{path}: {name} changes the geometry but has no inverse, so maps could not be mapped back "
            "onto the scan. Use an invertible transform (Spacing, Orientation, Resize, "
            "ResizeWithPadOrCrop, SpatialPad, CenterSpatialCrop, CropForeground...)."
        )
    if isinstance(t, LazyTransform) and t.lazy:
        t.lazy = False  # pending (lazy) operations would not be recorded for the inverse
    return t


def build_preprocessing(spec: Any, *, key: str = "preprocess") -> Any:
    """Build the checked, invertible preprocessing chain as a ``monai.transforms.Compose``.

    Args:
        spec: None or [] (no preprocessing); a ``Compose`` or list of array transforms; a list of
            config entries ``{"name": "Spacing", "pixdim": [2, 2, 2], "mode": "bilinear"}`` (any
            class of ``monai.transforms`` by name, instantiated with the other keys; CropForeground
            also takes ``threshold``); or ``{"transforms": [...]}``. Objects and entries may be mixed.
        key: the key path used in error messages (the config key the spec came from).

    Raises:
        ConfigError: naming the key path of the bad entry/value (unknown name with close matches,
            bad value, dictionary/random transform, geometry transform without inverse).
    """
    from monai.transforms import Compose

    if spec is None:
        return Compose([])
    if isinstance(spec, Compose):
        if type(spec) is not Compose:
            raise ConfigError(
                f"{key}: {type(spec).__name__} picks transforms at random; use a plain Compose."
            )
        items: list[Any] = list(spec.flatten().transforms)
    elif isinstance(spec, Mapping):
        extra = sorted(str(k) for k in spec if k != "transforms")
        if "transforms" not in spec or extra:
            problems = [f"unexpected key(s): {', '.join(extra)}"] if extra else []
            if "transforms" not in spec:
                problems.append("'transforms' is missing")
            raise ConfigError(
                f"{key}: expected a list of transforms or a mapping with only the key 'transforms'; "
                + "; ".join(problems)
                + "."
            )
        return build_preprocessing(spec["transforms"], key=f"{key}.transforms")
    elif isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
        items = list(spec)
    else:
        raise ConfigError(
            f"{key}: expected a list of transforms (or of {{name: ..., ...}} entries) or a Compose, "
            f"got {type(spec).__name__}."
        )
    steps: list[Any] = []
    windowed = False
    for i, item in enumerate(items):
        path = f"{key}[{i}]"
        if isinstance(item, Mapping):
            t = transform_from_config(item, path, after_windowing=windowed)
            windowed = windowed or is_windowing(item)
        else:
            if isinstance(item, Compose):
                raise ConfigError(f"{path}: nested Compose; pass its transforms in the list instead.")
            t = item
            windowed = windowed or type(t).__name__ in (
                "ScaleIntensityRange",
                "ScaleIntensityRangePercentiles",
            )
        steps.append(_check_step(t, path))
    return Compose(steps)


def _affine(x: Any) -> torch.Tensor:
    return torch.as_tensor(x.affine, dtype=torch.float64)


def model_input(volume: Any, preprocess: Any = None, *, key: str = "preprocess") -> Any:
    """Apply the preprocessing to ``volume`` and return what the model sees.

    Args:
        volume: MetaTensor (1, X, Y, Z) with its affine (as ``medcam3d.load_volume`` gives).
        preprocess: a spec for :func:`build_preprocessing` or the Compose it built. To map maps back
            with :func:`maps_to_volume`, pass the SAME Compose object to both (the inverse checks
            it is inverting the very transforms that ran).
        key: key path for error messages.

    Returns:
        MetaTensor (C, *model_spatial) float32 whose ``applied_operations`` record the geometric
        steps and whose ``affine`` is the model grid's world affine. ``volume`` is not modified.

    Raises:
        ConfigError: a step failed on this volume, dropped the metadata, or changed the grid
            without recording an invertible operation.
    """
    from monai.data import MetaTensor
    from monai.transforms import InvertibleTransform

    compose = build_preprocessing(preprocess, key=key)  # checks a ready Compose too; same objects
    data = volume.clone()  # transforms must not touch the caller's tensor or its meta
    for i, t in enumerate(compose.transforms):
        path = f"{key}[{i}] ({type(t).__name__})"
        before_shape, before_affine = tuple(data.shape[1:]), _affine(data)
        n_ops = len(data.applied_operations)
        try:
            out = t(data)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(
                f"{path} failed on a volume of shape {tuple(data.shape)}: {type(e).__name__}: {e}"
            ) from e
        if not isinstance(out, MetaTensor):
            raise ConfigError(
                f"{path} returned {type(out).__name__}, not a MetaTensor; the geometry would be lost. "
                "Keep metadata tracking on (e.g. EnsureType(track_meta=True)) or drop the step."
            )
        if isinstance(t, InvertibleTransform):
            if t.tracing and len(out.applied_operations) <= n_ops:
                raise ConfigError(f"{path} did not record its operation, so it cannot be inverted.")
        elif tuple(out.shape[1:]) != before_shape or not torch.allclose(_affine(out), before_affine):
            raise ConfigError(
                f"{path} changed the grid (shape {before_shape} -> {tuple(out.shape[1:])}) but is not "
                "invertible; maps could not be mapped back. Use an invertible MONAI transform."
            )
        data = out
    if data.ndim != 4:  # pragma: no cover - the per-step grid checks catch this first
        raise ConfigError(
            f"{key}: the chain produced shape {tuple(data.shape)}; the model input must be (C, X, Y, Z)."
        )
    if not data.is_floating_point() or data.dtype != torch.float32:
        data = data.to(torch.float32)
    return data

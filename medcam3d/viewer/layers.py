"""Build napari layer data (``(data, kwargs, type)`` tuples) for a CT, its maps and its masks.

One place decides how medcam3d looks in napari, shared by :func:`medcam3d.view`, the npe2 reader
and the dock widget: the CT in HU with a CT window, one additive heat layer per explained class with
contrast limits SHARED across the classes of one scan (``threshold × shared max .. shared max``, so
magnitudes compare and faint values vanish), masks as labels (outlined by the viewer). Axes are
labelled by anatomy, in mm; in 3D the CT is a minimum-intensity projection. Every layer gets the scan's affine (see
:mod:`medcam3d.viewer.geometry`) and, under ``metadata["medcam3d"]``, what is needed to write a map
back onto the source grid (source affine + meta, axis permutation, class, method, layer, score).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medcam3d.errors import InputError
from medcam3d.io.affine import ras_affine, to_numpy_affine
from medcam3d.viewer.geometry import display_grid
from medcam3d.viewer.present import AXIS_LABELS, CT_RENDERING_3D, UNITS
from medcam3d.viewer.windows import resolve_window

LayerData = tuple[Any, dict[str, Any], str]
#: Every medcam3d layer's world axes: RAS mm, labelled by anatomy (see medcam3d.viewer.present).
_AXES = {"axis_labels": AXIS_LABELS, "units": UNITS}
META_KEY = "medcam3d"
HEAT, CT, MASK = "heat", "ct", "mask"


def medcam_meta(layer: Any) -> dict[str, Any]:
    """The ``metadata["medcam3d"]`` dict of a layer ({} for layers medcam3d did not make)."""
    meta = getattr(layer, "metadata", None) or {}
    info = meta.get(META_KEY)
    return info if isinstance(info, dict) else {}


def check_display_args(colormap: str, opacity: float, threshold: float) -> None:
    """Raise InputError for a colormap napari does not know, or opacity/threshold outside [0, 1]."""
    if not isinstance(opacity, (int, float)) or isinstance(opacity, bool) or not 0.0 <= float(opacity) <= 1.0:
        raise InputError(f"opacity={opacity!r}: expected a number between 0 (invisible) and 1 (opaque).")
    if (
        not isinstance(threshold, (int, float))
        or isinstance(threshold, bool)
        or not 0.0 <= float(threshold) < 1.0
    ):
        raise InputError(
            f"threshold={threshold!r}: expected a fraction in [0, 1) of the shared maximum below which "
            "map values are hidden (0.2 hides the faintest 20%)."
        )
    heat_colormap(colormap)


def heat_colormap(name: str) -> Any:
    """napari colormap ``name`` whose lowest value is fully transparent.

    With additive blending a colour adds to the CT below it; making the bottom of the colormap
    transparent guarantees that values at or below the lower contrast limit add nothing, whatever
    the colormap's darkest colour (turbo's is dark blue, not black).
    """
    from napari.utils.colormaps import Colormap, ensure_colormap

    if not isinstance(name, str):
        raise InputError(f"colormap must be a napari colormap name such as 'inferno' or 'turbo', got {name!r}.")
    try:
        base = ensure_colormap(name)
    except (KeyError, ValueError) as e:
        raise InputError(f"colormap={name!r} is not a colormap napari knows; use e.g. 'inferno' or 'turbo'.") from e
    colors = np.array(base.colors, dtype=np.float32)
    colors[0, 3] = 0.0
    return Colormap(colors=colors, controls=base.controls, name=f"medcam3d_{name}", interpolation="linear")


def shared_limits(maps: np.ndarray, threshold: float) -> tuple[float, float]:
    """Contrast limits for all classes of one scan: ``(threshold × max, max)`` of every map together."""
    finite = np.asarray(maps)[np.isfinite(maps)]
    vmax = float(finite.max()) if finite.size else 0.0
    if vmax <= 0.0:
        vmax = 1.0  # all-zero maps: any positive range shows nothing
    return float(threshold) * vmax, vmax


def _numpy(t: Any) -> np.ndarray:
    if hasattr(t, "as_tensor"):
        t = t.as_tensor()
    if hasattr(t, "detach"):
        t = t.detach().cpu().numpy()
    return np.asarray(t)


def _plain_meta(tensor: Any) -> dict[str, Any]:
    """A shallow copy of a MetaTensor's meta without its affine (kept separately)."""
    meta = dict(getattr(tensor, "meta", None) or {})
    meta.pop("affine", None)
    return meta


def _scan_name(volume: Any, default: str = "CT") -> str:
    src = (getattr(volume, "meta", None) or {}).get("filename_or_obj")
    if isinstance(src, (str, os.PathLike)) and str(src):
        from medcam3d.filenames import nifti_stem

        return nifti_stem(src)
    return default


def _z_axis(affine: np.ndarray) -> int:
    """The array axis closest to the world z (head-foot) axis."""
    return int(np.argmax(np.abs(np.asarray(affine)[2, :3])))


def ct_layer_data(volume: Any, *, window: Any = None, name: str | None = None) -> LayerData:
    """Image layer data for a CT MetaTensor (1, X, Y, Z) in HU: grey, windowed, on its affine."""
    data = _numpy(volume)[0]
    aff = ras_affine(volume)
    win = resolve_window(window, data, _z_axis(aff))
    shown, shown_aff, perm = display_grid(data, aff)
    info = {
        "kind": CT,
        "volume": volume,
        "affine": to_numpy_affine(volume.affine),
        "meta": _plain_meta(volume),
        "perm": perm,
        "window": win.name,
    }
    kwargs = {
        "name": name or _scan_name(volume),
        "colormap": "gray",
        "contrast_limits": list(win.limits),
        "affine": shown_aff,
        "metadata": {META_KEY: info},
        "interpolation2d": "linear",
        "rendering": CT_RENDERING_3D,
        **_AXES,
    }
    return shown, kwargs, "image"


def heat_layer_data(
    maps: np.ndarray,
    affine: np.ndarray,
    meta: Mapping[str, Any],
    classes: Sequence[Mapping[str, Any]],
    *,
    method: str,
    target_layer: str = "",
    colormap: str = "inferno",
    opacity: float = 0.6,
    threshold: float = 0.2,
) -> list[LayerData]:
    """One additive image layer per class of ``maps`` (K, X, Y, Z), contrast limits shared by all K.

    Args:
        maps: the maps on the source grid (not normalised).
        affine: their voxel → world affine, in the space ``meta["space"]`` says (RAS by default).
        meta: the source MetaTensor's meta (kept so the map can be saved with the same header codes).
        classes: per class ``{"name", "index", "logit", "probability"}`` (missing values: None).
        method, target_layer: how the maps were made (go into names and metadata).
    """
    check_display_args(colormap, opacity, threshold)
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 4 or len(classes) != maps.shape[0]:
        raise InputError(f"maps must be (K, X, Y, Z) with one entry in classes per map; got {maps.shape}, {len(classes)}.")
    src_aff = to_numpy_affine(affine)
    ras = src_aff if str(meta.get("space", "RAS")).upper() != "LPS" else np.diag([-1.0, -1, 1, 1]) @ src_aff
    lo, hi = shared_limits(maps, threshold)
    cmap = heat_colormap(colormap)
    out: list[LayerData] = []
    for k, cls in enumerate(classes):
        shown, shown_aff, perm = display_grid(maps[k], ras)
        info = {
            "kind": HEAT,
            "class_name": str(cls.get("name", f"class_{k}")),
            "class_index": cls.get("index"),
            "logit": cls.get("logit"),
            "probability": cls.get("probability"),
            "method": str(method),
            "target_layer": str(target_layer or ""),
            "affine": src_aff,
            "meta": dict(meta),
            "perm": perm,
            "shared_max": hi,
            "threshold": float(threshold),
        }
        kwargs = {
            "name": f"{info['class_name']} ({method})",
            "colormap": cmap,
            "contrast_limits": [lo, hi],
            "blending": "additive",
            "opacity": float(opacity),
            "affine": shown_aff,
            "metadata": {META_KEY: info},
            "interpolation2d": "linear",
            "interpolation3d": "linear",
            **_AXES,
        }
        out.append((shown, kwargs, "image"))
    return out


def explanation_layer_data(
    expl: Any, *, colormap: str = "inferno", opacity: float = 0.6, threshold: float = 0.2
) -> list[LayerData]:
    """Heat layer data for every class of a :class:`~medcam3d.spatial.Explanation`."""
    maps = getattr(expl, "maps", None)
    if maps is None or not hasattr(maps, "affine"):
        raise InputError(
            f"explanation must be a medcam3d Explanation (maps as a MetaTensor with its affine), got "
            f"{type(expl).__name__}."
        )
    arr = _numpy(maps)
    names = list(getattr(expl, "class_names", None) or [f"class_{i}" for i in range(arr.shape[0])])

    from medcam3d.io.export import class_records

    classes = class_records(expl, names)
    return heat_layer_data(
        arr,
        to_numpy_affine(maps.affine),
        _plain_meta(maps),
        classes,
        method=str(getattr(expl, "method", "") or "map"),
        target_layer=str(getattr(expl, "target_layer", "") or ""),
        colormap=colormap,
        opacity=opacity,
        threshold=threshold,
    )


def mask_layer_data(mask: Any, name: str, volume: Any) -> LayerData:
    """Labels layer data for a mask on the CT's grid: an array (same shape), MetaTensor or file path."""
    if isinstance(mask, (str, os.PathLike)):
        from medcam3d.io import load_volume

        mask = load_volume(mask)
    ref_shape = tuple(volume.shape[1:])
    if hasattr(mask, "affine"):  # a MetaTensor carries its own grid
        arr = _numpy(mask)
        arr = arr[0] if arr.ndim == 4 and arr.shape[0] == 1 else arr
        aff = ras_affine(mask)
    else:
        arr = _numpy(mask)
        arr = arr[0] if arr.ndim == 4 and arr.shape[0] == 1 else arr
        if arr.shape != ref_shape:
            raise InputError(
                f"mask {name!r} has shape {arr.shape} but the volume is {ref_shape}; a bare array must be on "
                "the volume's grid (or pass a MetaTensor/NIfTI path that carries its own affine)."
            )
        aff = ras_affine(volume)
    if arr.ndim != 3:
        raise InputError(f"mask {name!r} must be 3D, got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)) or np.any(arr < 0):
        raise InputError(f"mask {name!r} must hold non-negative integer labels (0 = background).")
    labels = arr.astype(np.uint8 if arr.max(initial=0) < 256 else np.int32)
    shown, shown_aff, perm = display_grid(labels, aff)
    kwargs = {
        "name": f"{name} (mask)",
        "affine": shown_aff,
        "opacity": 0.5,
        "metadata": {META_KEY: {"kind": MASK, "perm": perm, "affine": aff}},
        **_AXES,
    }
    return shown, kwargs, "labels"

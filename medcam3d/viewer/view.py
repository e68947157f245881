"""``medcam3d.view``: a scan, its explanation maps and masks in napari, in millimetres."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medcam3d.errors import InputError
from medcam3d.viewer.layers import (
    LayerData,
    check_display_args,
    ct_layer_data,
    explanation_layer_data,
    mask_layer_data,
)

from medcam3d.viewer.present import AXIAL_ORDER, RADIOLOGICAL_2D, go_to_axial, present  # noqa: F401


def _as_list(explanation: Any) -> list[Any]:
    if explanation is None:
        return []
    if isinstance(explanation, Sequence) and not isinstance(explanation, (str, bytes)):
        return list(explanation)
    return [explanation]


def _mask_items(masks: Any) -> list[tuple[str, Any]]:
    if masks is None:
        return []
    if isinstance(masks, Mapping):
        return [(str(k), v) for k, v in masks.items()]
    if isinstance(masks, (str, os.PathLike)):
        return [(os.path.basename(os.fspath(masks)).split(".")[0] or "mask", masks)]
    return [("mask", masks)]


def _check_same_grid(expl: Any, volume: Any) -> None:
    maps = getattr(expl, "maps", None)
    if maps is None or not hasattr(maps, "affine"):
        raise InputError(
            f"explanation must be a medcam3d Explanation (from medcam3d.explain_volume), got {type(expl).__name__}."
        )
    if tuple(maps.shape[1:]) != tuple(volume.shape[1:]):
        raise InputError(
            f"explanation maps are on a {tuple(maps.shape[1:])} grid but the volume is {tuple(volume.shape[1:])}: "
            "they come from another scan. Pass the volume the explanation was computed on."
        )
    from medcam3d.io.affine import ras_affine

    if not np.allclose(ras_affine(maps), ras_affine(volume), atol=1e-3):
        raise InputError(
            "explanation maps and volume have different affines (another scan, or a resampled copy); "
            "pass the volume the explanation was computed on."
        )


def go_to_peak(viewer: Any, layer: Any) -> None:
    """Move the 2D slice to the world position of ``layer``'s maximum (or the centre if it is all 0)."""
    data = np.asarray(layer.data)
    if data.size and np.nanmax(data) > 0:
        idx = np.unravel_index(int(np.nanargmax(data)), data.shape)
        world = layer.data_to_world(idx)
        for axis, value in enumerate(world):
            viewer.dims.set_point(axis, float(value))


def build_view_layers(
    volume: Any,
    explanation: Any = None,
    masks: Any = None,
    *,
    window: Any = None,
    colormap: str = "inferno",
    opacity: float = 0.6,
    threshold: float = 0.2,
) -> list[LayerData]:
    """Check everything and build the layer data of :func:`view` (CT, heat layers, masks), in that order."""
    from medcam3d.spatial.volume import as_volume

    check_display_args(colormap, opacity, threshold)
    vol = as_volume(volume)
    out = [ct_layer_data(vol, window=window)]
    for expl in _as_list(explanation):
        if isinstance(expl, (str, os.PathLike)):  # a saved map file or a folder of them
            from medcam3d.io.maps import load_explanation

            expl = load_explanation(expl)
        _check_same_grid(expl, vol)
        out.extend(explanation_layer_data(expl, colormap=colormap, opacity=opacity, threshold=threshold))
    out.extend(mask_layer_data(m, name, vol) for name, m in _mask_items(masks))
    return out


def view(
    volume: Any,
    explanation: Any = None,
    masks: Any = None,
    viewer: Any = None,
    *,
    window: Any = None,
    colormap: str = "inferno",
    opacity: float = 0.6,
    threshold: float = 0.2,
) -> Any:
    """Show a CT with its explanation maps (and masks) in napari; return the viewer.

    The CT is a grey image in HU; each explained class is an additive heat layer named
    ``"<class> (<method>)"`` whose contrast limits are shared by all classes of the explanation
    (lower limit ``threshold × shared max``, so faint values vanish and magnitudes compare across
    classes). Every layer is placed with the scan's affine, so world coordinates are RAS mm. A new
    viewer opens in the axial plane, radiological orientation, at the slice of the strongest map
    value, sliders labelled by anatomy; switch to 3D with ``viewer.dims.ndisplay = 3`` (the CT is then
    a minimum-intensity projection so the heat shows). A "CT window" dock widget switches the
    window preset.

    Args:
        volume: MetaTensor (1, X, Y, Z) in HU with its affine, or a NIfTI file / DICOM folder path.
        explanation: an :class:`~medcam3d.spatial.Explanation` of that volume, a map NIfTI file (or
            a folder of one method's maps) written by ``save_nifti``/``medcam3d explain``, or a list
            of these (e.g. HiResCAM and Grad-CAM); limits are shared within each explanation.
        masks: a mask or ``{name: mask}``; each an integer array on the volume's grid, a MetaTensor,
            or a NIfTI path. Shown as labels layers drawn as outlines (the heat stays visible).
        viewer: an existing napari viewer to add to; None opens a new one.
        window: CT window: None/"auto" (lung for chest CTs, else abdomen), a preset name
            ("lung", "mediastinum", "abdomen", "bone", ...), or a ``(level, width)`` pair in HU.
        colormap: napari colormap of the heat layers ("inferno", "turbo", ...).
        opacity: heat layer opacity in [0, 1].
        threshold: fraction in [0, 1) of the shared maximum below which map values are hidden.

    Raises:
        InputError: bad volume/explanation/mask/window/colormap/opacity/threshold (checked before
            any window opens). VolumeLoadError: ``volume`` is a path that cannot be read.
    """
    layer_data = build_view_layers(
        volume, explanation, masks, window=window, colormap=colormap, opacity=opacity, threshold=threshold
    )
    import napari

    if viewer is None:
        viewer = napari.Viewer()
    first = len(viewer.layers) == 0
    added = [getattr(viewer, f"add_{kind}")(data, **kwargs) for data, kwargs, kind in layer_data]
    from medcam3d.viewer.widgets import dock_window_widget

    dock_window_widget(viewer, window)  # before reset_view: docking narrows the canvas
    present(viewer, fit=first)
    if first:
        heat = [ly for ly in added[1:] if ly.metadata.get("medcam3d", {}).get("kind") == "heat"]
        if heat:
            go_to_peak(viewer, max(heat, key=lambda ly: float(np.max(ly.data))))
    viewer.layers.selection.active = added[0]
    return viewer

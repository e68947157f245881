"""How a viewer first shows medcam3d layers, whatever opened them (``view``, the reader, sample data,
the Explain widget): axial slices in radiological orientation, fitted to the canvas, sliders labelled
by anatomy, masks as outlines, and a 3D rendering in which the heat stays visible.

Layer data already carries what can travel with a layer (anatomical axis labels, mm units, the CT's
3D rendering); what belongs to the viewer (slice plane, camera, fit, label contours) is applied here,
by :func:`present` directly or, for the npe2 reader and sample data which return layer data without a
viewer, by :func:`present_when_added` once napari has inserted their layers.
"""

from __future__ import annotations

from typing import Any

#: World axes are RAS mm; each slider moves through the plane named (axis 2 = the axial slider).
AXIS_LABELS = ("L→R (sagittal)", "P→A (coronal)", "I→S (axial)")
UNITS = ("mm", "mm", "mm")
#: napari dims order for an axial view (slice along world z; rows = y, columns = x).
AXIAL_ORDER = (2, 1, 0)
#: Radiological convention: anterior at the top, the patient's right on the screen's left.
RADIOLOGICAL_2D = ("up", "left")
#: In 3D the CT is a minimum-intensity projection (air and lung dark), so additive heat shows on it;
#: a maximum-intensity projection of a lung-windowed CT is a white block that hides the maps.
CT_RENDERING_3D = "minip"
#: Masks are drawn as outlines one voxel wide, in one colour (as in the PNG montages), so they
#: never hide the heat at the lesion.
MASK_CONTOUR = 1
MASK_COLOUR = "#00e5ff"


def go_to_axial(viewer: Any) -> None:
    """Axial slices in radiological orientation (anterior up, patient's right on the left)."""
    viewer.dims.order = AXIAL_ORDER
    viewer.scene.camera.orientation2d = RADIOLOGICAL_2D


def outline_masks(viewer: Any) -> None:
    """Draw every medcam3d mask layer as an outline."""
    from medcam3d.viewer.layers import MASK, medcam_meta

    from napari.utils.colormaps import DirectLabelColormap

    for layer in viewer.layers:
        if medcam_meta(layer).get("kind") == MASK:
            layer.contour = MASK_CONTOUR
            layer.colormap = DirectLabelColormap(color_dict={None: MASK_COLOUR, 0: "transparent"})


def present(viewer: Any, *, fit: bool = True) -> None:
    """Axial, radiological, anatomical slider labels, mask outlines; ``fit`` resets the camera."""
    viewer.dims.axis_labels = AXIS_LABELS
    go_to_axial(viewer)
    outline_masks(viewer)
    if fit:
        viewer.reset_view()


def present_when_added(n_layers: int) -> None:
    """Present the current viewer once ``n_layers`` more layers have been inserted (npe2 reader and
    sample data hand napari layer data, not a viewer). Fits the view only when the viewer was empty.
    Does nothing without a current viewer (e.g. the reader called outside napari)."""
    try:
        import napari
    except ImportError:  # pragma: no cover
        return
    viewer = napari.current_viewer()
    if viewer is None or n_layers <= 0:
        return
    was_empty = len(viewer.layers) == 0
    target = len(viewer.layers) + n_layers

    def on_inserted(_event: Any = None) -> None:
        if len(viewer.layers) < target:
            return
        viewer.layers.events.inserted.disconnect(on_inserted)
        present(viewer, fit=was_empty)

    viewer.layers.events.inserted.connect(on_inserted)

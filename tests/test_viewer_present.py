"""What a radiologist meets first in napari, from every entry point: axial, radiological, fitted,
sliders labelled by anatomy, masks as outlines, a 3D CT rendering that lets the heat show; and the
Explain widget's failure/warning/saving behaviour."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("qtpy")

import nibabel as nib  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import medcam3d  # noqa: E402
from medcam3d.viewer.present import AXIAL_ORDER, AXIS_LABELS, RADIOLOGICAL_2D  # noqa: E402

pytestmark = pytest.mark.napari

PLUGIN = "medcam3d-hirescam"
DATA = Path(__file__).parent / "data" / "totalseg"
DICOM = DATA / "example_ct_dicom"


def _check_axial_and_fitted(viewer) -> None:
    assert tuple(viewer.dims.order) == AXIAL_ORDER
    assert tuple(viewer.camera.orientation2d) == RADIOLOGICAL_2D
    assert tuple(viewer.dims.axis_labels) == AXIS_LABELS
    # fitted: the camera looks at the centre of the layers' world extent (y, x) in 2D
    lo, hi = viewer.layers.extent.world
    centre = (np.asarray(lo) + np.asarray(hi)) / 2
    assert np.allclose(np.asarray(viewer.camera.center)[-2:], centre[[1, 0]], atol=1.0)


@pytest.mark.parametrize("what", ["nifti", "dicom", "map"])
def test_reader_opens_axial_radiological_fitted(make_napari_viewer, qtbot, tmp_path, what):
    viewer = make_napari_viewer()
    if what == "nifti":
        path = DATA / "example_ct_sm.nii.gz"
    elif what == "dicom":
        path = DICOM
    else:
        vol = medcam3d.load_volume(DATA / "example_ct_sm.nii.gz")
        expl = _toy_explanation(vol)
        (path,) = medcam3d.save_nifti(expl, tmp_path)
    layers = viewer.open(str(path), plugin=PLUGIN)
    assert layers
    _check_axial_and_fitted(viewer)
    if what == "dicom":  # 20 slices: the slider moves through 20 axial slices, labelled as such
        z = list(viewer.dims.order)[0]
        assert viewer.dims.axis_labels[z] == "I→S (axial)"
        assert viewer.dims.nsteps[z] == 20


def test_sample_data_opens_axial_with_outlined_masks(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "demo_chest_ct")
    _check_axial_and_fitted(viewer)
    masks = [ly for ly in viewer.layers if ly.name.endswith("(mask)")]
    assert masks and all(ly.contour > 0 for ly in masks)


def test_view_outlines_masks_minip_ct_and_accepts_map_files(make_napari_viewer, tmp_path):
    vol = medcam3d.load_volume(DATA / "example_ct_sm.nii.gz")
    expl = _toy_explanation(vol)
    (path,) = medcam3d.save_nifti(expl, tmp_path)
    viewer = make_napari_viewer()
    medcam3d.view(vol, str(path), masks={"liver": DATA / "example_seg_fast" / "liver.nii.gz"}, viewer=viewer)
    _check_axial_and_fitted(viewer)
    ct, heat, mask = viewer.layers
    assert heat.name == "liver (hirescam)" and np.allclose(heat.data, expl.maps[0].numpy())
    assert mask.contour > 0  # an outline: the heat under the lesion stays visible
    assert str(ct.rendering) == "minip"  # 3D: lungs/air dark, additive heat visible (MIP: a white block)
    # a label file opened through the reader is an outlined mask, not a CT
    (lab,) = viewer.open(str(DATA / "example_seg_fast" / "liver.nii.gz"), plugin=PLUGIN)
    assert lab.__class__.__name__ == "Labels" and lab.contour > 0


def test_window_dock_names_the_window_the_ct_is_shown_with(make_napari_viewer):
    from medcam3d.viewer.windows import resolve_window
    from medcam3d.viewer.widgets import WINDOW_DOCK_NAME

    vol = medcam3d.load_volume(DATA / "example_ct_sm.nii.gz")
    viewer = make_napari_viewer()
    medcam3d.view(vol, _toy_explanation(vol), viewer=viewer, window="mediastinum")
    dock = dict(viewer.window.dock_widgets)[WINDOW_DOCK_NAME]
    assert dock.window.value == "mediastinum"
    # the CT's limits are the preset's L ± W/2 (mediastinum W350/L40 -> -135..215 HU)
    assert tuple(viewer.layers[0].contrast_limits) == pytest.approx((-135.0, 215.0))
    assert tuple(resolve_window("mediastinum").limits) == pytest.approx((-135.0, 215.0))


def _toy_explanation(vol):
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Conv3d(1, 1, 1)
            self.fc = nn.Linear(1, 1)

        def forward(self, x):
            return self.fc(torch.relu(self.features(x)).mean((2, 3, 4)))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.features.weight.fill_(0.01)
        net.features.bias.fill_(1.0)
        net.fc.weight.fill_(1.0)
    return medcam3d.explain_volume(net, vol, method="hirescam", target_layer="features", class_names=["liver"])


# ---- Explain widget ------------------------------------------------------------------------------

def _notes(severity: str) -> list[str]:
    from napari.utils.notifications import NotificationSeverity, notification_manager

    sev = getattr(NotificationSeverity, severity)
    return [str(n.message) for n in notification_manager.records if n.severity == sev]


def _widget(make_napari_viewer, path=DATA / "example_ct_sm.nii.gz"):
    from medcam3d.viewer.widgets import ExplainWidget

    viewer = make_napari_viewer()
    viewer.open(str(path), plugin=PLUGIN)
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Explain")
    widget.reset_choices()
    return viewer, widget


def _wait(qtbot, widget) -> None:
    assert widget.explain() is not None
    qtbot.waitUntil(lambda: widget.explain_button.enabled, timeout=120_000)


def test_failed_run_resets_progress_and_puts_the_cause_first(make_napari_viewer, qtbot, tmp_path):
    viewer, widget = _widget(make_napari_viewer)
    (tmp_path / "failnet_mod.py").write_text(
        "from torch import nn\n\nclass FailNet(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.conv = nn.Conv3d(1, 2, 3)\n\n    def forward(self, x):\n"
        "        raise RuntimeError('boom: this model always fails')\n")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"model": {"_target_": "failnet_mod.FailNet"},
                                                       "class_names": ["a", "b"]}))
    widget.config.value = tmp_path / "bad.yaml"
    widget.allow_random.value = True
    _wait(qtbot, widget)
    assert widget.progress.value == 0
    msg = _notes("ERROR")[-1]
    assert msg.startswith("RuntimeError: boom: this model always fails")
    # the random-weights warning reached the GUI, once
    warns = [m for m in _notes("WARNING") if "RANDOM weights" in m]
    assert len(warns) == 1


def test_wrong_input_channels_is_a_clear_error(make_napari_viewer, qtbot):
    viewer, widget = _widget(make_napari_viewer)
    widget.network.value = "DenseNet121"
    widget.net_kwargs.value = "spatial_dims: 3, in_channels: 3, out_channels: 2"
    widget.allow_random.value = True
    _wait(qtbot, widget)
    msg = _notes("ERROR")[-1]
    assert msg.startswith("The model's first convolution expects 3 input channel(s) but the CT layer has 1")
    assert widget.progress.value == 0


def test_saved_map_is_named_after_the_scan_and_overwrite_speaks_of_the_checkbox(make_napari_viewer, tmp_path):
    scan = tmp_path / "patient7_ct.nii.gz"
    shutil.copy(DATA / "example_ct_sm.nii.gz", scan)
    viewer, widget = _widget(make_napari_viewer, scan)
    vol = medcam3d.load_volume(scan)
    for data, kwargs, kind in medcam3d.viewer.layers.explanation_layer_data(_toy_explanation(vol)):
        viewer.add_image(data, **kwargs)
    widget.reset_choices()
    widget.heat_layer.value = viewer.layers["liver (hirescam)"]
    widget.out_dir.value = tmp_path / "out"
    (path,) = widget.save()
    assert path.name == "patient7_ct_hirescam_liver.nii.gz"
    assert nib.load(path).shape == vol.shape[1:]
    assert widget.save() == []
    msg = _notes("ERROR")[-1]
    assert "tick 'overwrite'" in msg and "overwrite=True" not in msg


def test_dock_labels_are_not_truncated(make_napari_viewer, qtbot):
    from qtpy.QtWidgets import QApplication, QLabel, QLineEdit

    viewer, widget = _widget(make_napari_viewer)
    viewer.window._qt_window.show()  # napari's default window size
    QApplication.processEvents()
    labels = [lb for lb in widget.native.findChildren(QLabel) if lb.text() and lb.isVisible()]
    assert len(labels) >= 10
    for lb in labels:
        assert lb.width() >= lb.sizeHint().width(), lb.text()
    # the pre-filled network kwargs are readable without scrolling the field
    (kw,) = [le for le in widget.native.findChildren(QLineEdit) if le.text().startswith("spatial_dims")]
    assert kw.width() >= kw.fontMetrics().horizontalAdvance(kw.text()) + 8


def test_plugin_dock_titles_are_not_truncated(make_napari_viewer):
    from qtpy.QtWidgets import QApplication, QLabel

    viewer = make_napari_viewer()
    viewer.window._qt_window.show()
    viewer.window.add_plugin_dock_widget(PLUGIN, "CT window")
    viewer.window.add_plugin_dock_widget(PLUGIN, "Explain (HiResCAM / Grad-CAM)")
    QApplication.processEvents()
    titles = [lb for lb in viewer.window._qt_window.findChildren(QLabel)
              if f"({PLUGIN})" in lb.text() and lb.isVisible()]
    assert len(titles) == 2
    for lb in titles:
        assert lb.width() >= lb.fontMetrics().horizontalAdvance(lb.text()), lb.text()

"""The Explain dock widget: runs in a worker, adds heat layers equal to explain_volume's, saves them,
and turns every failure into a napari error notification while the viewer stays usable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("qtpy")

import nibabel as nib  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from monai.data import MetaTensor  # noqa: E402

import medcam3d  # noqa: E402

pytestmark = pytest.mark.napari

NET_KWARGS = {"in_shape": [1, 16, 16, 16], "classes": 2, "channels": [4, 8], "strides": [2, 2]}
PREPROCESS = [
    {"name": "Resize", "spatial_size": [16, 16, 16]},
    {"name": "ScaleIntensityRange", "a_min": -1000, "a_max": 400, "b_min": 0.0, "b_max": 1.0, "clip": True},
]
AFFINE = np.array([[2.0, 0, 0, -20], [0, 3.0, 0, 10], [0, 0, -4.0, 30], [0, 0, 0, 1]])
BAD_NET = '''
import torch
from torch import nn


class BadNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3)

    def forward(self, x):
        raise RuntimeError("boom: this model always fails")
'''


def tiny_config(folder: Path) -> Path:
    """A YAML config for a tiny MONAI Classifier with fixed (seeded) weights saved next to it."""
    torch.manual_seed(0)
    from monai.networks.nets import Classifier

    torch.save(Classifier(**NET_KWARGS).state_dict(), folder / "tiny.pt")
    cfg = {
        "model": {"name": "Classifier", "kwargs": NET_KWARGS, "checkpoint": "tiny.pt"},
        "preprocess": PREPROCESS,
        "class_names": ["nodule", "effusion"],
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def bad_config(folder: Path) -> Path:
    name = f"badnet_{folder.name.replace('-', '_')}"
    (folder / f"{name}.py").write_text(BAD_NET)
    path = folder / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": {"_target_": f"{name}.BadNet"}, "class_names": ["a", "b"]}))
    return path


def volume() -> MetaTensor:
    rng = np.random.default_rng(1)
    ct = rng.normal(-400, 300, (20, 18, 12)).astype(np.float32)
    return MetaTensor(torch.from_numpy(ct)[None], affine=torch.as_tensor(AFFINE), meta={"space": "RAS"})


def errors_shown() -> list[str]:
    from napari.utils.notifications import NotificationSeverity, notification_manager

    return [str(n.message) for n in notification_manager.records if n.severity == NotificationSeverity.ERROR]


def setup_widget(make_napari_viewer):
    from medcam3d.viewer.widgets import ExplainWidget

    viewer = make_napari_viewer()
    vol = volume()
    medcam3d.view(vol, viewer=viewer)
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Explain")
    widget.reset_choices()
    assert widget.ct_layer.value is viewer.layers["CT"]
    return viewer, widget, vol


def run_and_wait(qtbot, widget) -> None:
    worker = widget.explain()  # disables the button; the worker's finished signal re-enables it
    assert worker is not None and not widget.explain_button.enabled
    qtbot.waitUntil(lambda: widget.explain_button.enabled, timeout=60_000)


def test_widget_explains_in_a_worker_and_saves(make_napari_viewer, qtbot, tmp_path):
    viewer, widget, vol = setup_widget(make_napari_viewer)
    cfg = tiny_config(tmp_path)
    widget.config.value = cfg
    widget.classes.value = "all"
    run_and_wait(qtbot, widget)
    assert [ly.name for ly in viewer.layers] == ["CT", "nodule (hirescam)", "effusion (hirescam)"]
    assert widget.progress.value == widget.progress.max == 2
    # same maps as calling explain_volume directly with that config, on the CT's own grid
    rc = medcam3d.config.load_run_config(cfg)
    ref = medcam3d.explain_volume(rc.model, vol, preprocess=rc.preprocess, method="hirescam", class_names=rc.class_names)
    vmax = float(ref.maps.max())
    assert vmax > 0
    for k, name in enumerate(["nodule", "effusion"]):
        layer = viewer.layers[f"{name} (hirescam)"]
        assert np.allclose(layer.data, ref.maps[k].numpy(), atol=1e-6)
        assert np.allclose(layer.affine.affine_matrix, AFFINE)
        assert list(layer.contrast_limits) == pytest.approx([0.2 * vmax, vmax], rel=1e-5)
        assert layer.blending == "additive"
    # Grad-CAM of one class by name: one more layer, the others untouched
    widget.method.value, widget.classes.value = "gradcam", "effusion"
    run_and_wait(qtbot, widget)
    assert viewer.layers[-1].name == "effusion (gradcam)" and len(viewer.layers) == 4

    # save the selected heat layer through the widget: on the source grid, with its affine
    widget.reset_choices()
    widget.heat_layer.value = viewer.layers["nodule (hirescam)"]
    widget.out_dir.value = tmp_path / "out"
    (path,) = widget.save()
    img = nib.load(path)
    assert np.allclose(img.affine, AFFINE)
    assert np.allclose(np.asarray(img.dataobj), ref.maps[0].numpy(), atol=1e-6)
    before, n_errors = path.read_bytes(), len(errors_shown())
    assert widget.save() == []  # exists, overwrite unticked: a notification, file untouched
    assert "already exist" in errors_shown()[-1] and len(errors_shown()) == n_errors + 1
    assert path.read_bytes() == before


def test_widget_failures_are_notifications_and_the_viewer_stays_usable(make_napari_viewer, qtbot, tmp_path):
    viewer, widget, _ = setup_widget(make_napari_viewer)
    # no model chosen: refused in the UI thread, no worker
    assert widget.explain() is None
    assert "No model" in errors_shown()[-1]
    # a model that fails inside the worker
    widget.config.value = bad_config(tmp_path)
    widget.allow_random.value = True
    run_and_wait(qtbot, widget)
    assert "boom: this model always fails" in errors_shown()[-1]
    assert [ly.name for ly in viewer.layers] == ["CT"]
    # unknown class name: the worker reports it, nothing added
    widget.config.value = tiny_config(tmp_path)
    widget.classes.value = "nodule, pneumothorax"
    run_and_wait(qtbot, widget)
    assert "'pneumothorax' is neither an output index nor a class name" in errors_shown()[-1]
    assert len(viewer.layers) == 1
    # and the same widget still works afterwards
    widget.classes.value = "nodule"
    run_and_wait(qtbot, widget)
    assert [ly.name for ly in viewer.layers] == ["CT", "nodule (hirescam)"]

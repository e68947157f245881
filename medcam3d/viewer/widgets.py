"""napari dock widgets: "Explain" (run HiResCAM/Grad-CAM on a CT layer, save a map) and "CT window".

The explanation runs in a ``napari.qt.threading`` generator worker (progress bar, UI stays live);
layers are only touched in the worker's main-thread callbacks. Every failure, in the UI thread or the
worker, becomes a napari error notification with medcam3d's message, never a traceback dialog.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from magicgui import widgets as mw

from medcam3d.engine import METHODS
from medcam3d.errors import ConfigError, InputError, Medcam3dError, OutputExistsError
from medcam3d.viewer.layers import CT, HEAT, explanation_layer_data, medcam_meta
from medcam3d.viewer.windows import AUTO, resolve_window, window_names

WINDOW_DOCK_NAME = "CT window"
#: Width (px) at which the Explain form shows every label and field untruncated.
DOCK_MIN_WIDTH = 440
WINDOW_DOCK_MIN_WIDTH = 260
METHOD_CHOICES = [(cls.label, name) for name, cls in METHODS.items()]


class _WorkerFailure(Exception):
    """Carries any exception out of the worker.

    superqt's GeneratorWorker treats a RuntimeError raised by the generator as "worker deleted":
    it emits neither ``errored`` nor ``finished`` (the UI would wait forever). torch reports most
    model failures as RuntimeError, so every failure is wrapped in this (non-Runtime) type.
    """


def _notify_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def _notify_warning(message: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(message)


def _notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


def _error_text(exc: BaseException) -> str:
    """The user-facing message of an exception (medcam3d errors already say what to do)."""
    if isinstance(exc, Medcam3dError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _chosen_path(value: Any) -> Path | None:
    """A FileEdit value, or None when nothing was chosen (magicgui's empty value is Path('.'))."""
    if value is None:
        return None
    text = str(value).strip()
    return None if text in ("", ".") else Path(text).expanduser()


def _image_layers(viewer: Any, kind: str | None) -> list[tuple[str, Any]]:
    """(name, layer) of the image layers; kind=HEAT: heat layers only, kind=CT: everything else."""
    from napari.layers import Image

    out = []
    for layer in viewer.layers:
        if not isinstance(layer, Image):
            continue
        is_heat = medcam_meta(layer).get("kind") == HEAT
        if (kind == HEAT) == is_heat:
            out.append((layer.name, layer))
    return out


def _connect_layer_events(viewer: Any, callback: Callable[..., Any]) -> None:
    for event in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.reordered):
        event.connect(callback)


class WindowWidget(mw.Container):
    """Pick a CT layer and a window preset ("auto", "lung", "mediastinum", "abdomen", "bone"...)."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.ct_layer = mw.ComboBox(label="CT layer", choices=lambda _w: _image_layers(self.viewer, CT))
        self.window = mw.ComboBox(label="CT window", choices=[AUTO, *window_names()], value=AUTO)
        self.extend([self.ct_layer, self.window])
        self.min_width = WINDOW_DOCK_MIN_WIDTH  # the dock's title stays readable
        self.window.changed.connect(self.apply)
        _connect_layer_events(napari_viewer, lambda *_: self.reset_choices())

    def apply(self, *_: Any) -> None:
        """Set the chosen layer's contrast limits to the chosen window (level ± width / 2)."""
        layer = self.ct_layer.value
        if layer is None:
            return
        try:
            from medcam3d.io.affine import ras_affine
            from medcam3d.viewer.layer_io import volume_from_layer
            from medcam3d.viewer.layers import _z_axis

            data = None
            z_axis = 2
            if self.window.value == AUTO:
                vol = volume_from_layer(layer)
                data, z_axis = vol.numpy()[0], _z_axis(ras_affine(vol))
            win = resolve_window(self.window.value, data, z_axis)
        except Medcam3dError as exc:
            _notify_error(_error_text(exc))
            return
        layer.contrast_limits = list(win.limits)


def dock_window_widget(viewer: Any, window: Any = None) -> WindowWidget:
    """Dock the "CT window" widget on ``viewer`` (once; returns the existing one if present).

    ``window``: the preset the CT was shown with (e.g. ``"mediastinum"``), so the dock names the
    window the user sees rather than "auto"; None/"auto" or a (level, width) pair leave it at auto.
    """
    existing = dict(viewer.window.dock_widgets).get(WINDOW_DOCK_NAME)
    if isinstance(existing, WindowWidget):
        existing.reset_choices()
        widget = existing
    else:
        widget = WindowWidget(viewer)
        viewer.window.add_dock_widget(widget, name=WINDOW_DOCK_NAME, area="right")
    if isinstance(window, str) and window.lower() in window_names():
        widget.window.value = window.lower()  # same limits the CT layer already has
    return widget


def parse_classes(text: str, class_names: list[str] | None) -> str | list[int] | None:
    """"" → None (the config's choice), "all" → "all", "0, 2" → [0, 2], names → their indices."""
    text = (text or "").strip()
    if not text:
        return None
    if text.lower() == "all":
        return "all"
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part.lstrip("-").isdigit():
            out.append(int(part))
        elif class_names and part in class_names:
            out.append(class_names.index(part))
        else:
            known = f"; known names: {', '.join(class_names)}" if class_names else " (the model has no class names)"
            raise InputError(f"classes: {part!r} is neither an output index nor a class name{known}.")
    if not out:
        raise InputError(f"classes: {text!r} names no class; use 'all', indices like '0, 2' or class names.")
    return out


def check_input_channels(model: Any, channels: int) -> None:
    """Refuse a model whose first convolution expects another number of input channels than the scan
    has (a CT layer has 1), before torch fails with a shape error deep inside the network.

    Raises:
        InputError: naming both numbers and what to do.
    """
    from torch import nn

    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is not None and first.in_channels != channels:
        raise InputError(
            f"The model's first convolution expects {first.in_channels} input channel(s) but the CT layer "
            f"has {channels}; use a model built with in_channels={channels} (e.g. 'in_channels: 1' in "
            "net kwargs or the config)."
        )


def parse_kwargs(text: str) -> dict[str, Any]:
    """Network kwargs typed as YAML flow mapping content: 'spatial_dims: 3, in_channels: 1'."""
    import yaml

    text = (text or "").strip()
    if not text:
        return {}
    try:
        value = yaml.safe_load("{" + text.strip("{}") + "}")
    except yaml.YAMLError as exc:
        raise ConfigError(f"network kwargs: {text!r} is not 'key: value, key: value' ({exc}).") from None
    if not isinstance(value, dict):
        raise ConfigError(f"network kwargs: expected 'key: value, ...', got {text!r}.")
    return value


class ExplainWidget(mw.Container):
    """Explain a CT layer with a model from a config YAML (or a MONAI network + checkpoint).

    Results arrive as heat layers built by the same code as :func:`medcam3d.view` (shared contrast
    limits, additive, named "<class> (<method>)"); "Save map" writes the chosen heat layer with
    :func:`medcam3d.save_nifti` on the source scan's grid.
    """

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.worker: Any = None
        self.ct_layer = mw.ComboBox(label="CT layer", choices=lambda _w: _image_layers(self.viewer, CT))
        self.config = mw.FileEdit(label="config (YAML)", mode="r", filter="*.yaml *.yml")
        self.network = mw.LineEdit(label="or MONAI net", value="", tooltip="e.g. DenseNet121 (used when no config)")
        self.net_kwargs = mw.LineEdit(
            label="net kwargs", value="spatial_dims: 3, in_channels: 1, out_channels: 2",
            tooltip="constructor arguments as 'key: value, ...'",
        )
        self.checkpoint = mw.FileEdit(label="checkpoint", mode="r", filter="*.pt *.pth *.ckpt")
        self.allow_random = mw.CheckBox(label="allow random weights", value=False)
        self.method = mw.ComboBox(label="method", choices=METHOD_CHOICES, value="hirescam")
        self.classes = mw.LineEdit(label="classes", value="", tooltip="blank: config's; 'all'; '0, 2'; or names")
        self.target_layer = mw.LineEdit(label="target layer", value="", tooltip="blank: config's / network default")
        self.explain_button = mw.PushButton(text="Explain")
        self.progress = mw.ProgressBar(label="progress", min=0, max=1, value=0)
        self.heat_layer = mw.ComboBox(label="heat layer", choices=lambda _w: _image_layers(self.viewer, HEAT))
        self.out_dir = mw.FileEdit(label="save to", mode="d")
        self.overwrite = mw.CheckBox(label="overwrite", value=False)
        self.save_button = mw.PushButton(text="Save map as NIfTI")
        self.extend([
            self.ct_layer, self.config, self.network, self.net_kwargs, self.checkpoint, self.allow_random,
            self.method, self.classes, self.target_layer, self.explain_button, self.progress,
            self.heat_layer, self.out_dir, self.overwrite, self.save_button,
        ])  # fmt: skip
        self.min_width = DOCK_MIN_WIDTH  # every label readable in full
        self.explain_button.changed.connect(self.explain)
        self.save_button.changed.connect(self.save)
        _connect_layer_events(napari_viewer, lambda *_: self.reset_choices())

    # ---- explain -------------------------------------------------------------------------------
    def _job(self) -> dict[str, Any]:
        """Read and check the form (UI thread); the slow parts (model, explanation) run in the worker."""
        layer = self.ct_layer.value
        if layer is None:
            raise InputError("No CT layer: open a scan (File > Open) or pick one in 'CT layer'.")
        from medcam3d.viewer.layer_io import volume_from_layer

        job: dict[str, Any] = {
            "volume": volume_from_layer(layer),
            "config": _chosen_path(self.config.value),
            "network": self.network.value.strip(),
            "checkpoint": _chosen_path(self.checkpoint.value),
            "allow_random": bool(self.allow_random.value),
            "method": self.method.value,
            "classes": self.classes.value,
            "target_layer": self.target_layer.value.strip() or None,
        }
        if job["config"] is None and not job["network"]:
            raise ConfigError("No model: choose a config YAML (see sample_configs/) or type a MONAI network name.")
        if job["config"] is None:
            job["kwargs"] = parse_kwargs(self.net_kwargs.value)
        return job

    @classmethod
    def _run(cls, job: dict[str, Any]):  # generator: runs in the worker thread
        """Build the model, explain, return the Explanation; yields once per finished step."""
        try:
            return (yield from cls._steps(job))
        except Exception as exc:
            raise _WorkerFailure(_error_text(exc)) from exc

    @staticmethod
    def _steps(job: dict[str, Any]):
        import medcam3d
        from medcam3d.config import build_model, load_run_config

        with warnings.catch_warnings(record=True) as caught:  # e.g. RANDOM weights: shown in the GUI
            warnings.simplefilter("always")
            if job["config"] is not None:
                cfg = load_run_config(job["config"], allow_random_weights=job["allow_random"])
                model, kwargs = cfg.model, cfg.explain_kwargs()  # the same mapping as the CLI
            else:
                model = build_model(job["network"], job["kwargs"], job["checkpoint"], job["allow_random"])
                kwargs = {"preprocess": None, "class_names": None, "target_layer": None, "class_idx": "all"}
        check_input_channels(model, int(job["volume"].shape[0]))
        yield ("model", [str(w.message) for w in caught if issubclass(w.category, UserWarning)])
        chosen = parse_classes(job["classes"], kwargs["class_names"])
        kwargs.update(
            methods=[job["method"]],
            target_layer=job["target_layer"] or kwargs["target_layer"],
            class_idx=kwargs["class_idx"] if chosen is None else chosen,
        )
        (expl,) = medcam3d.explain_volume(model, job["volume"], **kwargs).values()
        yield ("explained", [])
        return expl

    def explain(self, *_: Any) -> Any:
        """Start the explanation in a worker thread; returns the worker (None if the form is invalid)."""
        from napari.qt.threading import create_worker

        try:
            job = self._job()
        except Exception as exc:  # any form problem becomes a notification, never a traceback
            _notify_error(_error_text(exc))
            return None
        self.progress.max, self.progress.value = 2, 0
        self.explain_button.enabled = False
        worker = create_worker(
            self._run, job, _progress={"total": 2, "desc": "medcam3d explain"}, _ignore_errors=True
        )
        worker.yielded.connect(self._on_step)
        worker.returned.connect(self._on_result)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        worker.start()
        return worker

    def _on_step(self, step: Any) -> None:
        self.progress.value = min(self.progress.value + 1, self.progress.max)
        for message in (step[1] if isinstance(step, tuple) else []):
            _notify_warning(message)

    def _on_result(self, expl: Any) -> None:
        try:
            layer_data = explanation_layer_data(expl)
        except Medcam3dError as exc:
            _notify_error(_error_text(exc))
            return
        for data, kwargs, _kind in layer_data:
            old = [ly for ly in self.viewer.layers if ly.name == kwargs["name"] and medcam_meta(ly).get("kind") == HEAT]
            for ly in old:
                self.viewer.layers.remove(ly)
            self.viewer.add_image(data, **kwargs)
        self.reset_choices()

    def _on_error(self, exc: BaseException) -> None:
        cause = exc.__cause__ if isinstance(exc, _WorkerFailure) and exc.__cause__ is not None else exc
        self.progress.value = 0  # a failed run leaves no half-full bar
        _notify_error(f"{_error_text(cause)} (medcam3d could not explain the scan)")  # cause first

    def _on_finished(self) -> None:
        self.explain_button.enabled = True

    # ---- save ----------------------------------------------------------------------------------
    def save(self, *_: Any) -> list[Path]:
        """Write the chosen heat layer as NIfTI into the chosen folder; returns the written paths."""
        from medcam3d.viewer.layer_io import save_heat_layer

        try:
            layer = self.heat_layer.value
            if layer is None:
                raise InputError("No heat layer to save: run Explain first or open a medcam3d map.")
            out = _chosen_path(self.out_dir.value)
            if out is None:
                raise InputError("Choose the folder to save the map into ('save to').")
            paths = save_heat_layer(layer, out, overwrite=bool(self.overwrite.value))
        except OutputExistsError as exc:  # the widget's wording: a checkbox, not an argument
            names = ", ".join(p.name for p in exc.paths)
            _notify_error(f"{names} already exist(s) in {exc.paths[0].parent}; tick 'overwrite' to replace.")
            return []
        except Exception as exc:
            _notify_error(_error_text(exc))
            return []
        _notify_info(f"medcam3d saved {', '.join(str(p) for p in paths)}")
        return paths

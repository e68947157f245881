"""Run configurations: YAML/dict loading, validation and model building.

Shared by the ``medcam3d`` CLI and the napari dock widget. Public API (frozen):

- :func:`load_run_config` (source, *, allow_random_weights=False, base_dir=None) -> :class:`RunConfig`
- :func:`build_model` (name_or_target, kwargs, checkpoint=None, allow_random_weights=False, *, base_dir=None)
- :func:`load_checkpoint` (model, path), :func:`extract_state_dict` (obj, source, options)
- :class:`CheckpointOptions` (key, strip_prefix, map_prefix, strict), :class:`LoadReport`
- :func:`monai_network_names` () -> names accepted by ``model.name``
- :func:`read_config_file` (path) -> dict
- :class:`OutputOptions`, :class:`Window`, :data:`WINDOWS` (named CT windows), :data:`METHODS`
- :func:`config_digest` (source, *, base_dir=None) -> :class:`ConfigDigest`
  (validation and fingerprint without building the model; see :mod:`medcam3d.config.digest`)

Names are imported on first use, so validating a config (:mod:`medcam3d.config.run`,
:mod:`medcam3d.config.digest`) does not import torch: the model builders do, when they are used.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "CheckpointOptions": "medcam3d.config.models",
    "LoadReport": "medcam3d.config.models",
    "build_model": "medcam3d.config.models",
    "extract_state_dict": "medcam3d.config.models",
    "load_checkpoint": "medcam3d.config.models",
    "monai_network_names": "medcam3d.config.models",
    "ACTIVATIONS": "medcam3d.config.run",
    "METHODS": "medcam3d.config.run",
    "OutputOptions": "medcam3d.config.run",
    "RunConfig": "medcam3d.config.run",
    "load_run_config": "medcam3d.config.run",
    "read_config_file": "medcam3d.config.run",
    "ConfigDigest": "medcam3d.config.digest",
    "config_digest": "medcam3d.config.digest",
    "WINDOWS": "medcam3d.config.windows",
    "Window": "medcam3d.config.windows",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:  # a submodule (medcam3d.config.trust...) used as an attribute
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module 'medcam3d.config' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ACTIVATIONS",
    "METHODS",
    "CheckpointOptions",
    "ConfigDigest",
    "LoadReport",
    "WINDOWS",
    "OutputOptions",
    "RunConfig",
    "Window",
    "build_model",
    "config_digest",
    "extract_state_dict",
    "load_checkpoint",
    "load_run_config",
    "monai_network_names",
    "read_config_file",
]

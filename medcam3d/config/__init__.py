"""Run configurations: YAML/dict loading, validation and model building.

Shared by the ``medcam3d`` CLI and the napari dock widget. Public API (frozen):

- :func:`load_run_config` (source, *, allow_random_weights=False, base_dir=None) -> :class:`RunConfig`
- :func:`build_model` (name_or_target, kwargs, checkpoint=None, allow_random_weights=False, *, base_dir=None)
- :func:`load_checkpoint` (model, path), :func:`extract_state_dict` (obj, source, options)
- :class:`CheckpointOptions` (key, strip_prefix, map_prefix, strict), :class:`LoadReport`
- :func:`monai_network_names` () -> names accepted by ``model.name``
- :func:`read_config_file` (path) -> dict
- :class:`OutputOptions`, :class:`Window`, :data:`WINDOWS` (named CT windows), :data:`METHODS`
"""

from medcam3d.config.models import (
    CheckpointOptions,
    LoadReport,
    build_model,
    extract_state_dict,
    load_checkpoint,
    monai_network_names,
)
from medcam3d.config.run import (
    ACTIVATIONS,
    METHODS,
    OutputOptions,
    RunConfig,
    load_run_config,
    read_config_file,
)
from medcam3d.config.windows import WINDOWS, Window

__all__ = [
    "ACTIVATIONS",
    "METHODS",
    "CheckpointOptions",
    "LoadReport",
    "WINDOWS",
    "OutputOptions",
    "RunConfig",
    "Window",
    "build_model",
    "extract_state_dict",
    "load_checkpoint",
    "load_run_config",
    "monai_network_names",
    "read_config_file",
]

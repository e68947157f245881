"""Load and validate a run configuration (YAML file or dict) into a :class:`RunConfig`.

Everything is checked before any case runs: keys (unknown ones with close matches), types, the
model (built, checkpoint loaded), the target layer (must exist in the built model) and the
preprocessing (built with :func:`medcam3d.spatial.build_preprocessing`). Every problem is a
:class:`~medcam3d.errors.ConfigError` whose message starts with the key path.

YAML layout (see ``sample_configs/template.yaml`` for every key explained)::

    model:
      name: DenseNet121            # a class in monai.networks.nets, OR
      # _target_: mypkg.nets.Net   # your own nn.Module class (importable, or nets/net.py:Net)
      # factory: false             # true: _target_ is your own function returning the model
      # loads_own_weights: false   # true: the class/factory loads trained weights itself
      kwargs: {spatial_dims: 3, in_channels: 1, out_channels: 3}
      checkpoint: weights.pt       # relative to this file's folder; null = none
      # checkpoint_key: null       # dotted path to the state dict inside the file
      # strip_prefix: []           # key prefixes to remove;  map_prefix: {old.: new.}
      # strict: true               # false: missing keys allowed only outside the forward pass
    preprocess: {...}              # passed to medcam3d.spatial.build_preprocessing
    methods: [hirescam, gradcam]   # or one string
    target_layer: null             # module name; null = the default for the network
    class_names: [nodule, effusion, consolidation]
    activation: sigmoid            # or softmax
    class_idx: all                 # or an index / list of indices or class names
    output: {four_d: false, montage: true, window: lung}   # window: name | [level, width]
    device: null                   # null = cuda if available else cpu; or cpu / cuda / cuda:1
    amp: false
    score: null                    # what is explained (see medcam3d.config.explain_args)
    forward_kwargs: {}             # extra keyword inputs of model.forward
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcam3d.config.explain_args import build_score, parse_forward_kwargs, parse_score
from medcam3d.config.schema import Errors, check_keys, close_matches, describe, join
from medcam3d.config.windows import WINDOWS, Window
from medcam3d.errors import ConfigError, InputError, Medcam3dError, TargetLayerError
from medcam3d.names import ACTIVATIONS, METHOD_NAMES, method_name

if TYPE_CHECKING:  # torch, the model builders and the probe are imported where they are used, so
    # validating a config and computing its fingerprint (medcam3d.config.digest) import no torch
    from torch import nn

    from medcam3d.config.checkpoint import LoadReport
    from medcam3d.config.probe import ProbeResult

METHODS = METHOD_NAMES  # the engine's method names (one home: medcam3d.names)
TOP_KEYS = (
    "model",
    "preprocess",
    "methods",
    "target_layer",
    "class_names",
    "activation",
    "class_idx",
    "output",
    "device",
    "amp",
    "score",
    "forward_kwargs",
)
MODEL_KEYS = (
    "name",
    "_target_",
    "factory",
    "loads_own_weights",
    "kwargs",
    "checkpoint",
    "checkpoint_key",
    "strip_prefix",
    "map_prefix",
    "strict",
)
OUTPUT_KEYS = ("four_d", "montage", "window", "storage", "spacing_mm")
STORAGES = ("float32", "uint16")  # as medcam3d.io.export.STORAGES (config does not import io)


@dataclass
class OutputOptions:
    """What to write per case besides the per-class NIfTI maps."""

    four_d: bool = False  # also one 4D NIfTI with every class
    montage: bool = True  # PNG montage (axial/coronal/sagittal through each map's peak)
    window: Window = field(default_factory=lambda: WINDOWS["lung"])  # CT window of the montage
    storage: str = "uint16"  # NIfTI data type of the maps: uint16 (scl_slope, <= max/131070 off) or float32
    spacing_mm: float | None = None  # write maps on a coarser world-aligned grid (None: the scan's)


@dataclass
class RunConfig:
    """A validated run configuration, ready to explain scans.

    Attributes:
        model: the network, in eval mode, on CPU, weights loaded (move it to ``device`` yourself).
        preprocess: the MONAI Compose built from ``preprocess`` (invertible; see medcam3d.spatial).
        methods: names from ``medcam3d.engine.METHODS``, in the order given, no duplicates.
        target_layer: module name, or None for the network's default layer.
        class_names: one name per model output, or None.
        activation: ``"sigmoid"`` (multi-label) or ``"softmax"``.
        class_idx: ``"all"`` or a list of output indices (class names already turned into indices).
        output: :class:`OutputOptions`.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... or None (cuda if available, else cpu).
        amp: run the model under autocast (bfloat16 on CPU).
        score: the engine score object (None: class logits), see :mod:`medcam3d.config.explain_args`.
        forward_kwargs: extra keyword inputs of ``model.forward`` as configured (plain data).
        source: the YAML file the config came from (None for a dict).
        checkpoint: resolved weights path (None when running with random weights).
        model_label: the ``name`` or ``_target_`` of the model.
        random_weights: True when no checkpoint was loaded and the model does not load its own.
        spec: the normalised config as plain data (what :meth:`fingerprint` hashes).
        checkpoint_sha256: SHA-256 of the checkpoint file as it was when loaded.
        weights_sha256: SHA-256 of the built model's state dict (``loads_own_weights`` models).
        code_sha256: SHA-256 of the source file defining a user ``_target_`` (None for MONAI).
        load_report: keys a non-strict checkpoint load left out (None without a checkpoint).
        probe: the probe forward's outcome (:class:`medcam3d.config.probe.ProbeResult`).
    """

    model: nn.Module
    preprocess: Any
    methods: list[str]
    target_layer: str | None
    class_names: list[str] | None
    activation: str
    class_idx: str | list[int]
    output: OutputOptions
    device: str | None
    amp: bool
    source: Path | None
    checkpoint: Path | None
    model_label: str
    random_weights: bool
    spec: dict[str, Any]
    checkpoint_sha256: str | None = None
    weights_sha256: str | None = None
    code_sha256: str | None = None
    load_report: LoadReport | None = None
    probe: ProbeResult | None = None
    score: Any = None
    forward_kwargs: dict[str, Any] = field(default_factory=dict)

    def explain_kwargs(self, case_inputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The :func:`medcam3d.explain_volume` arguments this config sets (every method in one
        pass): the one mapping shared by the CLI and the napari widget. Add the volume, ``device``
        and ``amp``; override any key (e.g. ``methods``) as needed.

        ``case_inputs``: per-case extra model inputs (e.g. clinical values read from a cohort CSV's
        columns, already batched tensors), merged over the config's constant ``forward_kwargs``.
        """
        from medcam3d.config.explain_args import forward_values

        return {
            "preprocess": self.preprocess,
            "methods": list(self.methods),
            "target_layer": self.target_layer,
            "class_idx": self.class_idx,
            "class_names": self.class_names,
            "activation": self.activation,
            "score": self.score,
            "forward_kwargs": {**forward_values(self.forward_kwargs), **dict(case_inputs or {})},
        }

    def fingerprint(self) -> str:
        """SHA-256 of everything that changes the outputs: the normalised config (minus device),
        the weights (the checkpoint file's bytes, or the state dict of a model that loads its own
        weights) and the source file of a user ``_target_``. Resume compares it per case."""
        return fingerprint_of(self.spec, self.checkpoint_sha256 or self.weights_sha256, self.code_sha256)

    def resolved_device(self) -> str:
        """``device``, with None turned into ``"cuda"`` when available, else ``"cpu"``."""
        if self.device is not None:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def fingerprint_of(spec: Mapping[str, Any], weights_sha256: str | None, code_sha256: str | None) -> str:
    """The run fingerprint (:meth:`RunConfig.fingerprint`) from its parts: the normalised config
    (``device`` left out), the weights' SHA-256 (None: random weights) and the ``_target_`` source
    file's SHA-256 (None: a MONAI network). One function, so :mod:`medcam3d.config.digest` (which
    computes it without building the model) cannot drift from it."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in spec.items() if k != "device"}, sort_keys=True, default=str).encode())
    h.update((weights_sha256 or "random-weights").encode())
    h.update((code_sha256 or "").encode())
    return h.hexdigest()


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a YAML config file into a dict (ConfigError for a missing/empty/invalid file)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: file not found: {str(p)!r}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config: cannot read {str(p)!r}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config: {str(p)!r} is not valid YAML{where}: {problem}") from exc
    if data is None:
        raise ConfigError(f"config: {str(p)!r} is empty; it needs at least a 'model' section")
    if not isinstance(data, dict):
        raise ConfigError(
            f"config: {str(p)!r} must be a mapping of keys (model:, preprocess:, ...), "
            f"got {describe(data)}"
        )
    return data


def _device_ok(value: str) -> bool:
    if value == "cpu":  # always valid; no need to import torch for it
        return True
    import torch

    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        return False
    return True


def _parse_window(errors: Errors, value: Any) -> Window | None:
    path = "output.window"
    if isinstance(value, str):
        if value in WINDOWS:
            return WINDOWS[value]
        errors.add(path, f"unknown window {value!r}{close_matches(value, WINDOWS)}; use one of "
                   f"{', '.join(WINDOWS)} or [level, width]")
        return None
    if isinstance(value, Mapping):
        check_keys(errors, path, value, ("level", "width"))
        value = [value.get("level"), value.get("width")]
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        if value[1] <= 0:
            errors.add(path, f"width must be > 0, got {value[1]!r}")
            return None
        return Window("custom", float(value[0]), float(value[1]))
    errors.add(path, f"expected a window name ({', '.join(WINDOWS)}) or [level, width] in HU, "
               f"got {describe(value)}")
    return None


def _parse_model_options(errors: Errors, model: Mapping[str, Any]) -> dict[str, Any]:
    """The trust and checkpoint keys of ``model``: factory, loads_own_weights, checkpoint_key,
    strip_prefix, map_prefix, strict (normalised; defaults filled in)."""
    out: dict[str, Any] = {}
    for key, default in (("factory", False), ("loads_own_weights", False), ("strict", True)):
        value = model.get(key, default)
        if not isinstance(value, bool):
            errors.add(join("model", key), f"expected true or false, got {describe(value)}")
            value = default
        out[key] = value
    ckey = model.get("checkpoint_key")
    if ckey is not None and not (isinstance(ckey, str) and ckey.strip()):
        errors.add("model.checkpoint_key", f"expected a (dotted) key such as 'state_dict' or "
                   f"'ema.model', or null, got {describe(ckey)}")
        ckey = None
    out["checkpoint_key"] = ckey
    strip = model.get("strip_prefix", [])
    strip = [strip] if isinstance(strip, str) else strip
    if not isinstance(strip, list) or not all(isinstance(p, str) and p for p in strip):
        errors.add("model.strip_prefix", f"expected a prefix or a list of prefixes, got {describe(strip)}")
        strip = []
    out["strip_prefix"] = list(strip)
    mapping = model.get("map_prefix", {}) or {}
    if not isinstance(mapping, Mapping) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in mapping.items()
    ):
        errors.add("model.map_prefix", f"expected a mapping {{old_prefix: new_prefix}}, got {describe(mapping)}")
        mapping = {}
    out["map_prefix"] = dict(mapping)
    if model.get("checkpoint") is None:
        for key in ("checkpoint_key", "strip_prefix", "map_prefix"):
            if model.get(key):
                errors.add(join("model", key), "has no effect without model.checkpoint")
    return out


def _validate(data: Mapping[str, Any], errors: Errors) -> dict[str, Any]:
    """Check keys and types of everything that does not need the model; return normalised data."""
    check_keys(errors, "", data, TOP_KEYS)
    out: dict[str, Any] = {}

    # model
    model = data.get("model")
    if model is None:
        errors.add("model", "missing; give model.name (a MONAI network) or model._target_")
    elif not isinstance(model, Mapping):
        errors.add("model", f"expected a mapping with name/_target_, kwargs, checkpoint, got {describe(model)}")
    else:
        check_keys(errors, "model", model, MODEL_KEYS)
        has_name, has_target = "name" in model, "_target_" in model
        if has_name == has_target:
            errors.add("model", "give exactly one of model.name (a class in monai.networks.nets) "
                       "or model._target_ (package.module.Class)")
        key = "name" if has_name else "_target_"
        label = model.get(key)
        if (has_name or has_target) and not (isinstance(label, str) and label.strip()):
            errors.add(join("model", key), f"expected a string, got {describe(label)}")
        kwargs = model.get("kwargs", {})
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, Mapping):
            errors.add("model.kwargs", f"expected a mapping of constructor arguments, got {describe(kwargs)}")
            kwargs = {}
        ckpt = model.get("checkpoint")
        if ckpt is not None and not isinstance(ckpt, str):
            errors.add("model.checkpoint", f"expected a file path or null, got {describe(ckpt)}")
            ckpt = None
        out["model"] = {key: label, "kwargs": copy.deepcopy(dict(kwargs)), "checkpoint": ckpt,
                        **_parse_model_options(errors, model)}

    out["preprocess"] = copy.deepcopy(data.get("preprocess"))

    # methods
    methods = data.get("methods", ["hirescam"])
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, list) or not methods:
        errors.add("methods", f"expected a method name ({', '.join(METHODS)}) or a list of them, got {describe(methods)}")
        methods = []
    clean: list[str] = []
    for i, m in enumerate(methods):
        try:
            name = method_name(m)
        except InputError:
            name = None
        if name not in METHODS:
            hint = close_matches(m, METHODS) if isinstance(m, str) else ""
            errors.add(join("methods", i), f"expected one of {', '.join(METHODS)}, got {describe(m)}{hint}")
        elif name not in clean:
            clean.append(name)
    out["methods"] = clean

    # target layer
    tl = data.get("target_layer")
    if tl is not None and not (isinstance(tl, str) and tl.strip()):
        errors.add("target_layer", f"expected a module name (string) or null, got {describe(tl)}")
        tl = None
    out["target_layer"] = tl

    # class names
    names = data.get("class_names")
    if names is not None:
        if not isinstance(names, list) or not names:
            errors.add("class_names", f"expected a list of names, got {describe(names)}")
            names = None
        else:
            for i, n in enumerate(names):
                if not isinstance(n, str) or not n.strip():
                    errors.add(join("class_names", i), f"expected a non-empty string, got {describe(n)}")
            dupes = sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})
            if dupes:
                errors.add("class_names", f"duplicate names {dupes}")
    out["class_names"] = names

    # activation
    act = data.get("activation", "sigmoid")
    if act not in ACTIVATIONS:
        hint = close_matches(act, ACTIVATIONS) if isinstance(act, str) else ""
        errors.add("activation", f"expected 'sigmoid' (multi-label) or 'softmax', got {describe(act)}{hint}")
    out["activation"] = act

    # class_idx
    idx = data.get("class_idx", "all")
    if idx is None:
        idx = "all"
    if isinstance(idx, int | str) and not isinstance(idx, bool) and idx != "all":
        idx = [idx]
    if idx != "all":
        if not isinstance(idx, list) or not idx:
            errors.add("class_idx", f"expected 'all', an index or a list of indices/class names, got {describe(idx)}")
            idx = "all"
        else:
            resolved: list[int] = []
            for i, v in enumerate(idx):
                if isinstance(v, int) and not isinstance(v, bool):
                    if v < 0:
                        errors.add(join("class_idx", i), f"expected an index >= 0, got {v}")
                    resolved.append(v)
                elif isinstance(v, str) and isinstance(names, list) and v in names:
                    resolved.append(names.index(v))
                elif isinstance(v, str):
                    hint = close_matches(v, names) if isinstance(names, list) else " (no class_names given)"
                    errors.add(join("class_idx", i), f"{v!r} is not a class name{hint}")
                else:
                    errors.add(join("class_idx", i), f"expected an integer or a class name, got {describe(v)}")
            idx = resolved
    out["class_idx"] = idx
    if isinstance(names, list) and isinstance(idx, list):
        for i, v in enumerate(idx):
            if v >= len(names):
                errors.add(join("class_idx", i), f"index {v} is out of range for {len(names)} class_names")

    # output
    output = data.get("output", {}) or {}
    # storage is always in the normalised spec (so in the fingerprint): runs written with another
    # default (float32 before 2026-11-30) are never taken for finished ones
    opts = {"four_d": False, "montage": True, "window": "lung", "storage": "uint16"}
    if not isinstance(output, Mapping):
        errors.add("output", f"expected a mapping (four_d, montage, window), got {describe(output)}")
    else:
        check_keys(errors, "output", output, OUTPUT_KEYS)
        for key in ("four_d", "montage"):
            if key in output:
                if not isinstance(output[key], bool):
                    errors.add(join("output", key), f"expected true or false, got {describe(output[key])}")
                else:
                    opts[key] = output[key]
        if "window" in output:
            opts["window"] = copy.deepcopy(output["window"])
        if "storage" in output:
            if output["storage"] not in STORAGES:
                errors.add(join("output", "storage"),
                           f"expected one of {', '.join(STORAGES)}, got {describe(output['storage'])}")
            else:
                opts["storage"] = output["storage"]
        sp = output.get("spacing_mm")
        if sp is not None:
            if isinstance(sp, bool) or not isinstance(sp, int | float) or not 0 < sp < float("inf"):
                errors.add(join("output", "spacing_mm"), f"expected a number of mm > 0 or null, got {describe(sp)}")
            else:
                opts["spacing_mm"] = float(sp)
    window = _parse_window(errors, opts["window"])
    out["output"] = opts

    # device, amp
    dev = data.get("device")
    if dev is not None and not (isinstance(dev, str) and _device_ok(dev)):
        errors.add("device", f"expected cpu, cuda, cuda:N or null (auto), got {describe(dev)}")
        dev = None
    out["device"] = dev
    amp = data.get("amp", False)
    if not isinstance(amp, bool):
        errors.add("amp", f"expected true or false, got {describe(amp)}")
        amp = False
    out["amp"] = amp
    out["score"] = parse_score(errors, data.get("score"))
    out["forward_kwargs"] = parse_forward_kwargs(errors, data.get("forward_kwargs"))
    out["_window"] = window
    return out


def _check_output_count(spec: dict[str, Any], where: str) -> None:
    """When model.kwargs names the number of outputs (out_channels / num_classes, as MONAI's
    classifiers do), class_names and class_idx must agree with it."""
    kwargs = spec["model"]["kwargs"]
    n = next(
        (kwargs[k] for k in ("out_channels", "num_classes") if isinstance(kwargs.get(k), int)), None
    )
    if n is None:
        return
    suffix = f" (in {where})" if where else ""
    names = spec["class_names"]
    if names is not None and len(names) != n:
        raise ConfigError(
            f"class_names: {len(names)} name(s) given but the model has {n} outputs "
            f"(model.kwargs); give one name per output{suffix}"
        )
    idx = spec["class_idx"]
    if isinstance(idx, list):
        for i, v in enumerate(idx):
            if v >= n:
                raise ConfigError(f"class_idx[{i}]: index {v} is out of range for {n} model outputs{suffix}")


def build_preprocess(spec: Any, where: str = "") -> Any:
    """Build the preprocessing Compose with medcam3d.spatial.build_preprocessing; its ConfigErrors
    get a ``preprocess`` key-path prefix when they lack one."""
    from medcam3d.spatial import build_preprocessing

    try:
        return build_preprocessing(spec, key="preprocess")
    except ConfigError as exc:
        msg = str(exc)
        if not msg.startswith("preprocess"):
            msg = f"preprocess: {msg}"
        raise ConfigError(f"{msg} (in {where})" if where else msg) from exc


def validated_spec(
    source: str | os.PathLike[str] | Mapping[str, Any], base_dir: str | os.PathLike[str] | None = None
) -> tuple[dict[str, Any], Window | None, Path | None, str, Path]:
    """Read and check every key and type of a config, without building anything (no torch).

    Returns (normalised spec, output window, the YAML file or None, where (for messages),
    base_dir: ``base_dir`` or the YAML file's folder or the current folder).

    Raises:
        ConfigError: anything invalid that can be told without the model (all problems at once).
    """
    if isinstance(source, Mapping):
        data, path, where = dict(source), None, ""
    elif isinstance(source, str | os.PathLike):
        path = Path(source).expanduser().resolve()
        data, where = read_config_file(path), str(path)
    else:
        raise ConfigError(f"config: expected a YAML file path or a dict, got {describe(source)}")
    if base_dir is None:
        base_dir = path.parent if path is not None else Path.cwd()
    errors = Errors(where)
    spec = _validate(data, errors)
    errors.raise_if_any()
    window = spec.pop("_window")
    return spec, window, path, where, Path(base_dir)


def checkpoint_path(spec: Mapping[str, Any], base_dir: Path) -> Path | None:
    """``model.checkpoint`` resolved (relative paths from ``base_dir``); None when not given."""
    ckpt = spec["model"]["checkpoint"]
    if ckpt is None:
        return None
    path = Path(ckpt).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def load_run_config(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    allow_random_weights: bool = False,
    base_dir: str | os.PathLike[str] | None = None,
    probe_inputs: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Validate a config (YAML path or dict) completely and build what it describes.

    Args:
        source: path to a YAML file, or an already-parsed dict (same layout).
        allow_random_weights: accept a config without ``model.checkpoint`` (warns loudly).
        base_dir: folder that relative paths (checkpoint, a ``_target_`` module file) are resolved
            against; default: the YAML file's folder, or the current folder for a dict.
        probe_inputs: extra keyword inputs of ``model.forward`` for the probe forward, merged over
            the config's ``forward_kwargs`` (the CLI passes the first case's per-case inputs from
            the cohort CSV's ``input.<name>`` columns).

    Returns:
        A :class:`RunConfig` with the model built (eval, CPU, weights loaded), the target layer
        checked against it, and the preprocessing built.

    Raises:
        ConfigError: anything invalid; the message starts with the key path, e.g.
            ``"model.kwargs.spatial_dims: expected an integer, got 'three'"``.
    """
    from medcam3d.config.checkpoint import CheckpointOptions
    from medcam3d.config.models import build_model_with_report
    from medcam3d.engine import resolve_target

    spec, window, path, where, base_dir = validated_spec(source, base_dir)

    def fail(exc: Medcam3dError) -> ConfigError:
        msg = str(exc)
        return ConfigError(f"{msg} (in {where})" if where else msg)

    model_spec = spec["model"]
    label = model_spec.get("name") or model_spec.get("_target_")
    ckpt_path = checkpoint_path(spec, base_dir)
    options = CheckpointOptions(
        key=model_spec["checkpoint_key"],
        strip_prefix=tuple(model_spec["strip_prefix"]),
        map_prefix=tuple(model_spec["map_prefix"].items()),
        strict=model_spec["strict"],
    )
    own = model_spec["loads_own_weights"]
    try:
        model, report = build_model_with_report(
            label, model_spec["kwargs"], ckpt_path, allow_random_weights, base_dir=base_dir,
            factory=model_spec["factory"], loads_own_weights=own, checkpoint_options=options,
        )
    except ConfigError as exc:
        raise fail(exc) from exc

    _check_output_count(spec, where)

    target = spec["target_layer"]
    if target is not None:
        try:
            resolve_target(model, target)
        except Medcam3dError as exc:
            msg = str(exc)
            if " Close matches" not in msg:
                names = [n for n, _ in model.named_modules() if n]
                hint = close_matches(target.removesuffix(":input"), names)
                msg = msg.replace(". Use a name", f"{hint}. Use a name", 1) if hint else msg
            msg = msg if msg.startswith("target_layer:") else f"target_layer: {msg}"
            raise ConfigError(msg + (f" (in {where})" if where else "")) from exc

    preprocess = build_preprocess(spec["preprocess"], where)
    try:
        score = build_score(spec["score"], base_dir)
    except ConfigError as exc:
        raise fail(exc) from exc
    probe = _probe(model, preprocess, target, report, where, spec["forward_kwargs"], probe_inputs)

    return RunConfig(
        model=model,
        preprocess=preprocess,
        methods=list(spec["methods"]),
        target_layer=target,
        class_names=list(spec["class_names"]) if spec["class_names"] else None,
        activation=spec["activation"],
        class_idx=spec["class_idx"],
        output=OutputOptions(
            four_d=spec["output"]["four_d"], montage=spec["output"]["montage"], window=window,
            storage=spec["output"]["storage"],
            spacing_mm=spec["output"].get("spacing_mm"),
        ),
        device=spec["device"],
        amp=spec["amp"],
        source=path,
        checkpoint=ckpt_path,
        model_label=label,
        random_weights=ckpt_path is None and not own,
        spec=spec,
        checkpoint_sha256=_sha256(ckpt_path) if ckpt_path is not None else None,
        score=score,
        forward_kwargs=dict(spec["forward_kwargs"]),
        weights_sha256=_state_sha256(model) if own and ckpt_path is None else None,
        code_sha256=_code_sha256(label, base_dir, model_spec["factory"]),
        load_report=report,
        probe=probe,
    )


def _probe(
    model: nn.Module,
    preprocess: Any,
    target: str | None,
    report: LoadReport | None,
    where: str,
    forward_kwargs: dict[str, Any],
    probe_inputs: Mapping[str, Any] | None = None,
) -> ProbeResult:
    """Probe forward (see :mod:`medcam3d.config.probe`); refuse a bad target layer, and a
    non-strict checkpoint that lacks weights the forward uses."""
    suffix = f" (in {where})" if where else ""
    try:
        from medcam3d.config.explain_args import forward_values
        from medcam3d.config.probe import probe_model

        probe = probe_model(model, preprocess, target,
                            {**forward_values(forward_kwargs), **dict(probe_inputs or {})})
    except TargetLayerError as exc:
        raise ConfigError(f"target_layer: {exc}{suffix}") from exc
    except ConfigError as exc:
        raise ConfigError(f"{exc}{suffix}") from exc
    if not probe.ran:
        warnings.warn(
            f"medcam3d: the probe forward on a synthetic CT failed ({probe.error}); the target layer "
            "will be checked on the first scan", UserWarning, stacklevel=3,
        )
    if report is None or not (report.missing or report.unexpected):
        return probe
    name = str(report.path)
    if report.missing and not probe.ran:
        raise ConfigError(
            f"model.checkpoint: {name!r} lacks {len(report.missing)} key(s) of the model (e.g. "
            f"{report.missing[:3]}) and the probe forward could not run to show they are unused"
            f"{suffix}"
        )
    used = sorted(k for k in report.missing if k in probe.used)
    if used:
        raise ConfigError(
            f"model.checkpoint: {name!r} lacks {len(used)} weight(s) the explained forward pass "
            f"uses (e.g. {used[:3]}); with strict: false only weights of modules that never run may "
            "be missing. Check model.checkpoint_key, strip_prefix and map_prefix" + suffix
        )
    parts = []
    if report.missing:
        parts.append(f"{len(report.missing)} model key(s) not in the file, all in modules the "
                     f"forward never runs (e.g. {report.missing[:3]})")
    if report.unexpected:
        parts.append(f"{len(report.unexpected)} file key(s) ignored (e.g. {report.unexpected[:3]})")
    message = f"medcam3d: note: checkpoint {name}: " + "; ".join(parts)
    warnings.warn(message, UserWarning, stacklevel=3)
    print(message, file=sys.stderr, flush=True)
    return probe


def _state_sha256(model: nn.Module) -> str:
    """SHA-256 over every state-dict entry's name, dtype, shape and bytes."""
    import torch

    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        t = value.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _code_sha256(label: str, base_dir: Path, factory: bool) -> str | None:
    """SHA-256 of the source file that defines a ``_target_`` (None for MONAI names)."""
    from medcam3d.config.models import resolve_factory

    if "." not in label and ":" not in label:
        return None
    try:
        path = inspect.getsourcefile(resolve_factory(label, base_dir=base_dir, factory=factory))
    except (TypeError, ConfigError):
        return None
    return _sha256(Path(path)) if path else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

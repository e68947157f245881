"""Build a model from a MONAI network name or a checked ``_target_`` and load its weights.

Used by the CLI (through :func:`medcam3d.config.load_run_config`) and by the napari dock widget
("checkpoint + MONAI network name"). Every failure is a :class:`ConfigError` naming the key path.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medcam3d.config.checkpoint import (
    CheckpointOptions,
    LoadReport,
    extract_state_dict,
    load_weights,
)
from medcam3d.config.schema import close_matches, describe, expected_text, join, matches_annotation
from medcam3d.config.trust import check_model_target, import_target
from medcam3d.errors import ConfigError

__all__ = [
    "CheckpointOptions",
    "LoadReport",
    "build_model",
    "check_model_kwargs",
    "extract_state_dict",
    "load_checkpoint",
    "monai_network_names",
    "resolve_factory",
    "warn_random_weights",
]
#: Seed used while constructing a model (matters only when no checkpoint replaces the weights).
RANDOM_WEIGHTS_SEED = 0


@functools.lru_cache(maxsize=1)
def monai_network_names() -> tuple[str, ...]:
    """Names of the nn.Module classes in ``monai.networks.nets`` (what ``model.name`` accepts)."""
    from monai.networks import nets

    names = []
    for name in dir(nets):
        obj = getattr(nets, name)
        if name.startswith("_"):
            continue
        if inspect.isclass(obj) and issubclass(obj, nn.Module):
            names.append(name)
        elif inspect.isfunction(obj) and _returned_class(obj) is not None:
            names.append(name)  # factories such as resnet18(...) -> ResNet
    return tuple(sorted(names))


def _returned_class(func: Callable[..., Any]) -> type | None:
    """The nn.Module class a factory function says it returns (via its return annotation)."""
    ret = inspect.signature(func).return_annotation
    if isinstance(ret, str):
        ret = getattr(func, "__globals__", {}).get(ret)
    return ret if inspect.isclass(ret) and issubclass(ret, nn.Module) else None


def resolve_factory(
    name_or_target: str,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    factory: bool = False,
) -> Callable[..., Any]:
    """The class (or factory function) for a MONAI network name or a ``_target_``, checked first.

    A name without dots or a colon is looked up in ``monai.networks.nets``. Otherwise it is a
    ``_target_``: ``package.module.Class`` (imported; a module next to the config works when
    ``base_dir`` is its folder) or ``path/to/net.py:Class`` (relative to ``base_dir``). The object
    is checked by :func:`medcam3d.config.trust.check_model_target` before anything calls it: an
    nn.Module subclass, or (``factory=True``) a user-defined model factory function.

    Raises:
        ConfigError: unknown name, unimportable target, or a target that is not a model.
    """
    if not isinstance(name_or_target, str) or not name_or_target.strip():
        raise ConfigError(
            f"model: expected a MONAI network name or a dotted import path, got {describe(name_or_target)}"
        )
    if "." not in name_or_target and ":" not in name_or_target:
        names = monai_network_names()
        if name_or_target not in names:
            raise ConfigError(
                f"model.name: {name_or_target!r} is not a network in monai.networks.nets"
                f"{close_matches(name_or_target, names)}; for your own model use "
                "'_target_: package.module.Class' or '_target_: path/to/net.py:Class'"
            )
        from monai.networks import nets

        return getattr(nets, name_or_target)
    obj, from_file = import_target(name_or_target, base_dir=base_dir)
    check_model_target(obj, name_or_target, factory=factory, from_file=from_file)
    return obj


def _signature_params(factory: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], bool]:
    """Keyword parameters a factory accepts, following ``**kwargs`` up a class's MRO."""
    params: dict[str, inspect.Parameter] = {}
    classes = factory.__mro__ if inspect.isclass(factory) else (factory,)
    for owner in classes:
        if owner in (nn.Module, object):
            return params, True
        func = owner.__init__ if inspect.isclass(owner) else owner
        try:
            sig = inspect.signature(func)
        except (TypeError, ValueError):
            return params, True
        var_kw = False
        for p in sig.parameters.values():
            if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
                continue
            if p.kind is p.VAR_KEYWORD:
                var_kw = True
                continue
            params.setdefault(p.name, p)
        if not var_kw:
            return params, False
        if not inspect.isclass(factory):
            target = _returned_class(factory)  # resnet18(**kwargs) -> ResNet(**kwargs)
            if target is None:
                return params, True
            more, open_ended = _signature_params(target)
            for name, p in more.items():
                params.setdefault(name, p)
            return params, open_ended
    return params, True


def check_model_kwargs(factory: Callable[..., Any], kwargs: Mapping[str, Any], label: str) -> None:
    """Refuse unknown keyword arguments, values of the wrong type and missing required ones.

    Raises ConfigError("model.kwargs.<key>: expected an integer, got 'three'") and the like.
    """
    params, open_ended = _signature_params(factory)
    problems: list[str] = []
    for key, value in kwargs.items():
        path = join("model.kwargs", key)
        if key not in params:
            if not open_ended:
                problems.append(
                    f"{path}: {label} has no argument {key!r}{close_matches(key, params)}"
                )
            continue
        ok = matches_annotation(value, params[key].annotation)
        if ok is False:
            problems.append(
                f"{path}: expected {expected_text(params[key].annotation)}, got {describe(value)}"
            )
    try:  # only the factory's own required arguments; those behind **kwargs may be filled in
        own = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        own = {}
    for name, p in own.items():
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or name == "self":
            continue
        if p.default is inspect.Parameter.empty and name not in kwargs:
            problems.append(f"model.kwargs: missing required argument {name!r} of {label}")
    if problems:
        raise ConfigError("; ".join(problems))


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load weights from ``path`` into ``model`` (``torch.load(weights_only=True)``, strict keys).

    Raises ConfigError when the file is missing, unreadable, not a state_dict, or does not fit.
    """
    load_weights(model, path, CheckpointOptions())
    return model


def warn_random_weights(label: str) -> None:
    """Say loudly that a model runs with random weights: one ``RandomWeightsWarning``, which the
    command line prints as one stderr line and the napari widget shows as a notification."""
    message = (
        f"medcam3d: WARNING: {label} has RANDOM weights (no checkpoint); its explanations are "
        "meaningless except for testing the pipeline."
    )
    warnings.warn(message, RandomWeightsWarning, stacklevel=3)


class RandomWeightsWarning(UserWarning):
    """A model was built without a checkpoint (``allow_random_weights``)."""


def build_model_with_report(
    name_or_target: str,
    kwargs: Mapping[str, Any] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    allow_random_weights: bool = False,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    factory: bool = False,
    loads_own_weights: bool = False,
    checkpoint_options: CheckpointOptions | None = None,
) -> tuple[nn.Module, LoadReport | None]:
    """:func:`build_model`, also returning the checkpoint's :class:`LoadReport` (None without one).

    With ``checkpoint_options.strict`` False, missing keys are NOT refused here: the caller decides
    with a probe forward which of them matter (see :func:`medcam3d.config.probe.probe_model`).
    """
    kwargs = dict(kwargs or {})
    target = resolve_factory(name_or_target, base_dir=base_dir, factory=factory)
    label = name_or_target.replace(":", ".").rpartition(".")[2]
    check_model_kwargs(target, kwargs, label)
    if checkpoint is None and not (allow_random_weights or loads_own_weights):
        raise ConfigError(
            "model.checkpoint: no checkpoint given; set model.checkpoint to a weights file, declare "
            "model.loads_own_weights: true if the model loads its own weights, or pass "
            "--allow-random-weights (allow_random_weights=True) to run an untrained model"
        )
    try:
        # Random weights are seeded (without touching the caller's RNG) so every process of a
        # torchrun job, and every rerun, builds the same untrained model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = target(**kwargs)
    except Exception as exc:
        raise ConfigError(
            f"model: building {label}(**model.kwargs) failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model._target_: {name_or_target!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    report = None
    if checkpoint is not None:
        ckpt = Path(checkpoint).expanduser()
        if not ckpt.is_absolute() and base_dir is not None:
            ckpt = Path(base_dir) / ckpt
        report = load_weights(model, ckpt, checkpoint_options)
    elif not loads_own_weights:
        warn_random_weights(label)
    return model.eval(), report


def build_model(
    name_or_target: str,
    kwargs: Mapping[str, Any] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    allow_random_weights: bool = False,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    factory: bool = False,
    loads_own_weights: bool = False,
    checkpoint_options: CheckpointOptions | None = None,
) -> nn.Module:
    """Build a model in eval mode on CPU, with weights loaded.

    Args:
        name_or_target: a class of ``monai.networks.nets`` (``"DenseNet121"``), a dotted import
            path of a user class (``"mypkg.models.Net"``) or a file path ``"nets/net.py:Net"``.
        kwargs: keyword arguments for the constructor; checked against its signature first.
        checkpoint: weights file (``torch.load(weights_only=True)``). Relative paths are resolved
            against ``base_dir`` (default: the current folder).
        allow_random_weights: with no checkpoint, warn loudly instead of raising. The model is
            constructed under a fixed seed, so random weights are the same in every process.
        base_dir: folder for relative checkpoint paths and for a ``_target_`` module or file that
            sits next to the config.
        factory: ``name_or_target`` is a function that builds the model (only your own code; see
            :mod:`medcam3d.config.trust`).
        loads_own_weights: the class/factory loads trained weights itself: no checkpoint needed,
            no random-weights warning.
        checkpoint_options: where the state dict sits in the file, key prefixes, strictness.
            Without a probe forward this function cannot tell which missing keys matter, so a
            non-strict load that leaves any model key missing is refused here (use
            :func:`medcam3d.config.load_run_config`, which probes).

    Raises:
        ConfigError: unknown name/unimportable or untrusted target, bad kwargs, construction
            failure, no checkpoint (unless allowed), missing/unreadable/mismatching checkpoint.
    """
    model, report = build_model_with_report(
        name_or_target, kwargs, checkpoint, allow_random_weights, base_dir=base_dir,
        factory=factory, loads_own_weights=loads_own_weights, checkpoint_options=checkpoint_options,
    )
    if report is not None and report.missing:
        raise ConfigError(
            f"model.checkpoint: {str(report.path)!r} lacks {len(report.missing)} key(s) of "
            f"{type(model).__name__}, e.g. {report.missing[:3]}; load it through a run config "
            "(load_run_config) so a probe forward can tell whether the explained computation uses them"
        )
    return model

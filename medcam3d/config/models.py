"""Build a model from a MONAI network name or an importable ``_target_`` and load its weights.

Used by the CLI (through :func:`medcam3d.config.load_run_config`) and by the napari dock widget
("checkpoint + MONAI network name"). Every failure is a :class:`ConfigError` naming the key path.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medcam3d.config.schema import close_matches, describe, expected_text, join, matches_annotation
from medcam3d.errors import ConfigError

#: Prefixes that wrappers add to parameter names (DataParallel/DDP, torch.compile).
_STRIP_PREFIXES = ("module.", "_orig_mod.")
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


def resolve_factory(name_or_target: str, *, base_dir: str | os.PathLike[str] | None = None) -> Callable[..., Any]:
    """The class (or factory function) for a MONAI network name or a dotted ``package.module.Class``.

    A name without dots is looked up in ``monai.networks.nets``; a dotted name is imported. When the
    import fails and ``base_dir`` holds the module's file, ``base_dir`` is put on ``sys.path`` so a
    user's model file can sit next to the config.
    """
    if not isinstance(name_or_target, str) or not name_or_target.strip():
        raise ConfigError(
            f"model: expected a MONAI network name or a dotted import path, got {describe(name_or_target)}"
        )
    if "." not in name_or_target:
        names = monai_network_names()
        if name_or_target not in names:
            raise ConfigError(
                f"model.name: {name_or_target!r} is not a network in monai.networks.nets"
                f"{close_matches(name_or_target, names)}; for your own model use "
                "'_target_: package.module.Class'"
            )
        from monai.networks import nets

        return getattr(nets, name_or_target)
    module_name, _, attr = name_or_target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        candidate = Path(base_dir or ".") / (module_name.split(".")[0])
        if base_dir is not None and (candidate.with_suffix(".py").exists() or candidate.is_dir()):
            sys.path.insert(0, str(Path(base_dir).resolve()))
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc2:
                raise ConfigError(f"model._target_: cannot import {module_name!r}: {exc2}") from exc2
        else:
            raise ConfigError(
                f"model._target_: cannot import {module_name!r} ({exc}); the module must be "
                "importable (installed, or on PYTHONPATH)"
            ) from exc
    except Exception as exc:  # a user module that fails while importing
        raise ConfigError(
            f"model._target_: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        public = [n for n in dir(module) if not n.startswith("_")]
        raise ConfigError(
            f"model._target_: {module_name!r} has no callable {attr!r}{close_matches(attr, public)}"
        )
    return factory


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


def extract_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A plain state_dict from a raw one or a ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper,
    with ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes stripped."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not _looks_like_state_dict(obj):
            for key in ("state_dict", "model", "model_state_dict", "net"):
                if isinstance(obj.get(key), Mapping):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, Mapping) or not _looks_like_state_dict(obj):
        raise ConfigError(
            f"model.checkpoint: {source} does not hold a state_dict (expected a dict of tensors, "
            "or a dict with a 'state_dict' or 'model' entry)"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        for prefix in _STRIP_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _looks_like_state_dict(obj: Mapping[Any, Any]) -> bool:
    return len(obj) > 0 and all(isinstance(k, str) for k in obj) and all(
        isinstance(v, torch.Tensor) for v in obj.values()
    )


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load weights from ``path`` into ``model`` (``torch.load(weights_only=True)``, strict keys).

    Raises ConfigError when the file is missing, unreadable, not a state_dict, or does not fit.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"model.checkpoint: file not found: {str(p)!r} (relative paths are resolved from the "
            "config file's folder)"
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"model.checkpoint: cannot read {str(p)!r} as torch weights (loaded with "
            f"weights_only=True): {first}"
        ) from exc
    state = extract_state_dict(obj, source=repr(str(p)))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:4])
        raise ConfigError(
            f"model.checkpoint: {str(p)!r} does not fit {type(model).__name__} ({detail}); "
            "check model.name/_target_ and model.kwargs"
        ) from exc
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {len(result.missing_keys)} key(s) e.g. {result.missing_keys[:3]}")
        if result.unexpected_keys:
            parts.append(
                f"unexpected {len(result.unexpected_keys)} key(s) e.g. {result.unexpected_keys[:3]}"
            )
        raise ConfigError(
            f"model.checkpoint: {str(p)!r} does not fit {type(model).__name__} ({'; '.join(parts)}); "
            "check model.name/_target_ and model.kwargs"
        )
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


def build_model(
    name_or_target: str,
    kwargs: Mapping[str, Any] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    allow_random_weights: bool = False,
    *,
    base_dir: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Build a model in eval mode on CPU, with weights loaded.

    Args:
        name_or_target: a class of ``monai.networks.nets`` (``"DenseNet121"``) or a dotted import
            path of a user class/factory (``"mypkg.models.Net"``).
        kwargs: keyword arguments for the constructor; checked against its signature first.
        checkpoint: weights file (``torch.load(weights_only=True)``; raw state_dict or a
            ``{"state_dict"|"model": ...}`` wrapper; ``module.`` prefixes stripped). Relative
            paths are resolved against ``base_dir`` (default: the current folder).
        allow_random_weights: with no checkpoint, warn loudly instead of raising. The model is
            constructed under a fixed seed, so random weights are the same in every process.
        base_dir: folder for relative checkpoint paths and for importing a ``_target_`` module
            that sits next to the config.

    Raises:
        ConfigError: unknown name/unimportable target, bad kwargs, construction failure, no
            checkpoint (unless allowed), missing/unreadable/mismatching checkpoint.
    """
    kwargs = dict(kwargs or {})
    factory = resolve_factory(name_or_target, base_dir=base_dir)
    label = name_or_target.rpartition(".")[2]
    check_model_kwargs(factory, kwargs, label)
    if checkpoint is None and not allow_random_weights:
        raise ConfigError(
            "model.checkpoint: no checkpoint given; set model.checkpoint to a weights file, or "
            "pass --allow-random-weights (allow_random_weights=True) to run an untrained model"
        )
    try:
        # Random weights are seeded (without touching the caller's RNG) so every process of a
        # torchrun job, and every rerun, builds the same untrained model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = factory(**kwargs)
    except Exception as exc:
        raise ConfigError(
            f"model: building {label}(**model.kwargs) failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model._target_: {name_or_target!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    if checkpoint is not None:
        ckpt = Path(checkpoint).expanduser()
        if not ckpt.is_absolute() and base_dir is not None:
            ckpt = Path(base_dir) / ckpt
        load_checkpoint(model, ckpt)
    else:
        warn_random_weights(label)
    return model.eval()

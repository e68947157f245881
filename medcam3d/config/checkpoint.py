"""Read a checkpoint file into a model: where the state dict sits, key prefixes, strictness.

Files are always read with ``torch.load(weights_only=True)``: a checkpoint can hold tensors and plain
containers, never code (a pickle that would run code is refused by torch's restricted unpickler).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medcam3d.errors import ConfigError

#: Prefixes that wrappers add to parameter names (DataParallel/DDP, torch.compile); always stripped.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: Entries searched, in this order, when ``checkpoint_key`` is not given.
AUTO_KEYS = ("state_dict", "model", "model_state_dict", "net")


@dataclass(frozen=True)
class CheckpointOptions:
    """How to find the weights inside a checkpoint file and match them to the model.

    Attributes:
        key: dotted path to the state dict inside the file (``"state_dict"``, ``"ema.model"``);
            None = the file is a state dict, or has one under a key in :data:`AUTO_KEYS`.
        strip_prefix: prefixes removed from the front of every key that has them (after
            ``key``), e.g. ``("encoder.",)``; ``module.``/``_orig_mod.`` are always removed.
        map_prefix: ``(old, new)`` pairs: a key starting with ``old`` starts with ``new`` instead
            (applied after ``strip_prefix``; the first matching pair wins).
        strict: every model key must be in the file and every file key in the model. With
            False, mismatches are reported; :func:`medcam3d.config.load_run_config` then refuses
            only when a missing key belongs to a module the explained forward pass runs.
    """

    key: str | None = None
    strip_prefix: tuple[str, ...] = ()
    map_prefix: tuple[tuple[str, str], ...] = ()
    strict: bool = True


@dataclass
class LoadReport:
    """What a non-strict load left out: state-dict keys the model has but the file lacks
    (``missing``) and keys of the file the model has no place for (``unexpected``)."""

    path: Path
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def _looks_like_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _select(obj: Any, key: str | None, source: str) -> Mapping[str, Any]:
    if key is not None:
        node = obj
        for i, part in enumerate(key.split(".")):
            if not isinstance(node, Mapping) or part not in node:
                here = ".".join(key.split(".")[:i]) or "the top level"
                keys = sorted(str(k) for k in node)[:8] if isinstance(node, Mapping) else []
                raise ConfigError(
                    f"model.checkpoint_key: {source} has no entry {part!r} at {here}"
                    + (f" (it has: {', '.join(keys)})" if keys else "")
                )
            node = node[part]
        if not _looks_like_state_dict(node):
            raise ConfigError(
                f"model.checkpoint_key: {key!r} in {source} is not a state dict (a mapping of "
                "parameter names to tensors)"
            )
        return node
    for _ in range(3):
        if isinstance(obj, Mapping) and not _looks_like_state_dict(obj):
            for auto in AUTO_KEYS:
                if isinstance(obj.get(auto), Mapping):
                    obj = obj[auto]
                    break
            else:
                break
    if not _looks_like_state_dict(obj):
        keys = sorted(str(k) for k in obj)[:8] if isinstance(obj, Mapping) else []
        raise ConfigError(
            f"model.checkpoint: {source} does not hold a state_dict (expected a dict of tensors, or "
            f"one under {', '.join(repr(k) for k in AUTO_KEYS)}); name its entry with "
            "model.checkpoint_key" + (f" (top-level keys: {', '.join(keys)})" if keys else "")
        )
    return obj


def rename_keys(state: Mapping[str, Any], options: CheckpointOptions) -> dict[str, Any]:
    """Apply the wrapper prefixes, ``strip_prefix`` and ``map_prefix`` to every key."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in (*WRAPPER_PREFIXES, *options.strip_prefix):
                if prefix and key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        for old, new in options.map_prefix:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def extract_state_dict(
    obj: Any, source: str = "checkpoint", options: CheckpointOptions | None = None
) -> dict[str, torch.Tensor]:
    """A plain state dict from what ``torch.load`` returned: the entry ``options.key`` (or a raw
    state dict / one under :data:`AUTO_KEYS`), with prefixes handled as ``options`` says."""
    options = options or CheckpointOptions()
    return rename_keys(_select(obj, options.key, source), options)


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"model.checkpoint: file not found: {str(p)!r} (relative paths are resolved from the "
            "config file's folder)"
        )
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"model.checkpoint: cannot read {str(p)!r} as torch weights (loaded with "
            f"weights_only=True, which never runs code from the file): {first}"
        ) from exc


def _examples(keys: list[str]) -> str:
    return f"{len(keys)} key(s), e.g. {keys[:3]}"


def load_weights(
    model: nn.Module, path: str | os.PathLike[str], options: CheckpointOptions | None = None
) -> LoadReport:
    """Load ``path`` into ``model`` as ``options`` says; returns what did not match.

    Raises:
        ConfigError: missing/unreadable file, no state dict at ``options.key``, a shape mismatch,
            or (strict) any missing/unexpected key.
    """
    options = options or CheckpointOptions()
    p = Path(path)
    state = extract_state_dict(read_checkpoint(p), source=repr(str(p)), options=options)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:4])
        raise ConfigError(
            f"model.checkpoint: {str(p)!r} does not fit {type(model).__name__} ({detail}); "
            "check model.name/_target_ and model.kwargs"
        ) from exc
    report = LoadReport(p, list(result.missing_keys), list(result.unexpected_keys))
    if options.strict and (report.missing or report.unexpected):
        parts = []
        if report.missing:
            parts.append(f"missing {_examples(report.missing)}")
        if report.unexpected:
            parts.append(f"unexpected {_examples(report.unexpected)}")
        raise ConfigError(
            f"model.checkpoint: {str(p)!r} does not fit {type(model).__name__} ({'; '.join(parts)}); "
            "check model.name/_target_ and model.kwargs, name the state dict with "
            "model.checkpoint_key, rename keys with model.strip_prefix/map_prefix, or set "
            "model.strict: false to accept keys the explained computation does not use"
        )
    return report

"""The config keys that say *what* is explained and with which extra model inputs, and the one
mapping from a :class:`~medcam3d.config.RunConfig` to :func:`medcam3d.explain_volume` arguments
(used by the CLI and the napari widget alike).

YAML::

    score:                      # default: the model's (1, N) logits
      name: region              # logits | output | region | similarity
      box: [[10, 40], [20, 60], [4, 30]]   # region: voxel ranges on the model's OUTPUT grid
      reduce: mean              # region: mean | sum
      # key: logits             # output: tuple index / dict key (or a list for nested outputs)
      # reference: ref.pt       # similarity: (D,) or (R, D) list, or a .pt/.npy file (relative
      # kind: cosine            #   to the config); kind: cosine | dot
    forward_kwargs:             # extra keyword inputs of model.forward, constant for every case
      clinical: [0.61, 1.0]     # a list -> float32 tensor with a batch dim, shape (1, 2)
      scale: 2.0                # a scalar / string / bool is passed as is
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcam3d.config.schema import Errors, check_keys, describe, join
from medcam3d.errors import ConfigError, Medcam3dError

if TYPE_CHECKING:  # torch is imported where it is used: validating a config needs none
    import torch

SCORE_NAMES = ("logits", "output", "region", "similarity")
_SCORE_KEYS = {
    "logits": ("name",),
    "output": ("name", "key"),
    "region": ("name", "box", "reduce"),
    "similarity": ("name", "reference", "kind"),
}


def parse_score(errors: Errors, value: Any) -> dict[str, Any] | None:
    """Validate the ``score`` key; returns the normalised spec (None: class logits)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping):
        errors.add("score", f"expected a mapping with name: {' | '.join(SCORE_NAMES)}, got {describe(value)}")
        return None
    name = value.get("name")
    if name not in SCORE_NAMES:
        errors.add("score.name", f"expected one of {', '.join(SCORE_NAMES)}, got {describe(name)}")
        return None
    check_keys(errors, "score", value, _SCORE_KEYS[name])
    spec: dict[str, Any] = {"name": name}
    if name == "output":
        key = value.get("key")
        if not isinstance(key, (str, int, list)) or isinstance(key, bool) or key == []:
            errors.add("score.key", f"expected a dict key, a tuple index or a list of them, got {describe(key)}")
        spec["key"] = key
    elif name == "region":
        box = value.get("box")
        ok = isinstance(box, list) and box and all(
            isinstance(b, list) and len(b) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in b)
            and 0 <= b[0] < b[1] for b in box
        )
        if not ok:
            errors.add("score.box", f"expected one [start, stop] voxel range per spatial dim of the model "
                       f"output (0 <= start < stop), got {describe(box)}")
        reduce = value.get("reduce", "mean")
        if reduce not in ("mean", "sum"):
            errors.add("score.reduce", f"expected mean or sum, got {describe(reduce)}")
        spec.update(box=box, reduce=reduce)
    elif name == "similarity":
        ref = value.get("reference")
        if not (isinstance(ref, str) and ref.strip()) and not isinstance(ref, list):
            errors.add("score.reference", f"expected a list of numbers or a .pt/.npy file, got {describe(ref)}")
        kind = value.get("kind", "cosine")
        if kind not in ("cosine", "dot"):
            errors.add("score.kind", f"expected cosine or dot, got {describe(kind)}")
        spec.update(reference=ref, kind=kind)
    return spec


def _read_reference(ref: str | list, base_dir: Path) -> tuple[torch.Tensor, str | None]:
    import torch

    if isinstance(ref, list):
        try:
            return torch.tensor(ref, dtype=torch.float32), None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"score.reference: not a (D,) or (R, D) list of numbers ({exc})") from exc
    path = Path(ref).expanduser()
    path = path if path.is_absolute() else (base_dir / path).resolve()
    try:
        data = path.read_bytes()
        if path.suffix == ".npy":
            import numpy as np

            tensor = torch.from_numpy(np.load(path, allow_pickle=False)).float()
        elif path.suffix in (".pt", ".pth"):
            tensor = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ConfigError(f"score.reference: {str(path)!r} must be a .pt, .pth or .npy file")
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"score.reference: cannot read {str(path)!r} ({exc})") from exc
    if not isinstance(tensor, torch.Tensor):
        raise ConfigError(f"score.reference: {str(path)!r} holds a {type(tensor).__name__}, not a tensor")
    return tensor.float(), hashlib.sha256(data).hexdigest()


def build_score(spec: dict[str, Any] | None, base_dir: Path) -> Any:
    """The engine score object for a parsed ``score`` spec (None for class logits). A reference
    file's SHA-256 is recorded in ``spec`` so a changed file changes the run's fingerprint."""
    from medcam3d.engine import OutputKey, RegionScore, Similarity

    if spec is None or spec["name"] == "logits":
        return None
    try:
        if spec["name"] == "output":
            return OutputKey(spec["key"])
        if spec["name"] == "region":
            return RegionScore(box=[tuple(b) for b in spec["box"]], reduce=spec["reduce"])
        reference, digest = _read_reference(spec["reference"], base_dir)
        if digest is not None:
            spec["reference_sha256"] = digest
        return Similarity(reference, kind=spec["kind"])
    except ConfigError:
        raise
    except Medcam3dError as exc:
        raise ConfigError(f"score: {exc}") from exc


def parse_forward_kwargs(errors: Errors, value: Any) -> dict[str, Any]:
    """Validate ``forward_kwargs``: names -> numbers, strings, bools or (nested) lists of numbers."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        errors.add("forward_kwargs", f"expected a mapping of argument names to values, got {describe(value)}")
        return {}
    out: dict[str, Any] = {}
    for name, v in value.items():
        if not (isinstance(name, str) and name.isidentifier()):
            errors.add("forward_kwargs", f"{name!r} is not a valid argument name")
            continue
        if isinstance(v, list):
            import torch

            try:
                torch.tensor(v, dtype=torch.float32)
            except (TypeError, ValueError):
                errors.add(join("forward_kwargs", name), f"expected a (nested) list of numbers, got {describe(v)}")
                continue
        elif not isinstance(v, (int, float, str, bool)):
            errors.add(join("forward_kwargs", name), f"expected a number, string, bool or list of numbers, got {describe(v)}")
            continue
        out[name] = v
    return out


def forward_values(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Config values -> model inputs: lists become float32 tensors with a batch dim of 1."""
    import torch

    return {k: torch.tensor(v, dtype=torch.float32)[None] if isinstance(v, list) else v for k, v in spec.items()}

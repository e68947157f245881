"""Which activation to explain: resolve a layer name, a module, or a sensible default.

A target is a module plus where to read it: its ``output`` (the usual case) or its ``input``
(written ``"name:input"``). Reading a module's input is what makes EfficientNet work: its last
activation module (``_swish``) is also used in the stem, so the only unambiguous hook point is the
input of ``_avg_pooling``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from medcam3d.errors import TargetLayerError

Where = Literal["output", "input"]

#: Share of parameters that may run after an automatically chosen layer. A larger share means the
#: "last spatial map" is near the input of a network that works on tokens (a ViT's patch embedding),
#: where a class activation map means nothing.
MAX_DOWNSTREAM_PARAM_SHARE = 0.5


@dataclass(frozen=True)
class Target:
    """A resolved hook point: ``module`` and whether its ``output`` or ``input`` is explained."""

    name: str
    module: nn.Module
    where: Where = "output"

    @property
    def label(self) -> str:
        return self.name if self.where == "output" else f"{self.name}:input"


def _monai_default_name(model: nn.Module) -> str | None:
    """Known-good target layers for MONAI's classification networks (None when not one of them)."""
    try:
        from monai.networks import nets
    except ImportError:  # pragma: no cover - monai is a dependency, but the engine does not need it
        return None
    # Order matters: subclasses before their bases.
    rules: list[tuple[str, str]] = [
        ("DenseNet", "class_layers.relu"),  # ReLU -> GAP -> FC: the map is exactly CAM / positions
        ("SENet", "layer4"),  # SEResNet50/101/152, SENet154, SEResNext
        ("ResNet", "layer4"),  # ResNet10..200
        ("EfficientNet", "_avg_pooling:input"),  # _swish runs twice per forward (stem and head)
        ("Classifier", "net"),  # Classifier/Discriminator: conv stack -> flatten -> FC
    ]
    for class_name, layer in rules:
        cls = getattr(nets, class_name, None)
        if cls is not None and isinstance(model, cls):
            return layer
    return None


def _split_where(spec: str) -> tuple[str, Where]:
    if spec.endswith(":input"):
        return spec[: -len(":input")], "input"
    if spec.endswith(":output"):
        return spec[: -len(":output")], "output"
    return spec, "output"


def _by_name(model: nn.Module, spec: str) -> Target:
    name, where = _split_where(spec)
    modules = dict(model.named_modules())
    if name not in modules:
        candidates = [n for n in modules if n and (name in n or n.endswith(name.split(".")[-1]))]
        hint = f" Close matches: {', '.join(candidates[:8])}." if candidates else ""
        raise TargetLayerError(
            f"target_layer {spec!r} is not a module of {type(model).__name__}.{hint} "
            "Use a name from model.named_modules(), a module object, or None for the default."
        )
    return Target(name=name, module=modules[name], where=where)


def _by_module(model: nn.Module, module: nn.Module) -> Target:
    for name, candidate in model.named_modules():
        if candidate is module:
            return Target(name=name or "<model>", module=module)
    raise TargetLayerError(
        f"target_layer is a {type(module).__name__} that is not part of {type(model).__name__}; "
        "pass a submodule of the model (or its name)."
    )


def _is_spatial_map(value: object, batch: int, spatial_rank: int) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.ndim == spatial_rank + 2
        and value.shape[0] == batch
        and any(s > 1 for s in value.shape[2:])
    )


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The original module of a ``torch.compile``-d model (``OptimizedModule._orig_mod``), else ``model``.

    The engine hooks and runs the original module: hooks on a compiled module would be traced by
    Dynamo (a recompilation per call, and memory that grows with it).
    """
    while isinstance(getattr(model, "_orig_mod", None), nn.Module) and type(model).__name__ == "OptimizedModule":
        model = model._orig_mod  # type: ignore[assignment]
    return model


def probe_last_spatial_layer(
    model: nn.Module,
    x: torch.Tensor,
    forward_args: Sequence[Any] = (),
    forward_kwargs: Mapping[str, Any] | None = None,
) -> Target:
    """Run one no-grad forward (on the first sample, or on the whole batch when extra forward
    inputs are given) and return the last module (in execution order) whose output is a
    (B, C, *spatial) map with x's spatial rank.

    Refuses when most parameters run after that module: then the network is not a CNN with a
    head (e.g. a ViT, whose only spatial map is the patch embedding).
    """
    spatial_rank = x.ndim - 2
    extra = bool(forward_args) or bool(forward_kwargs)
    probe_batch = x.shape[0] if extra else 1
    named = dict((n, m) for n, m in model.named_modules() if n)
    first_start: dict[str, int] = {}
    spatial_finishes: list[tuple[int, str]] = []
    clock = iter(range(1 << 62))
    handles = []

    def make_hooks(name: str):
        def pre(_module, _inputs):
            first_start.setdefault(name, next(clock))

        def post(_module, _inputs, output):
            tick = next(clock)
            if _is_spatial_map(output, probe_batch, spatial_rank):
                spatial_finishes.append((tick, name))

        return pre, post

    try:
        for name, module in named.items():
            pre, post = make_hooks(name)
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
        with torch.no_grad():
            if extra:
                model(x, *forward_args, **(forward_kwargs or {}))
            else:
                model(x[:1])
    finally:
        for h in handles:
            h.remove()

    if not spatial_finishes:
        raise TargetLayerError(
            f"{type(model).__name__} has no layer that emits a (B, C, *spatial) map with "
            f"{spatial_rank} spatial dims for this input, so there is nothing to build a class "
            "activation map on (transformers and MLPs are not supported). Pass target_layer= "
            "explicitly if the model has such a layer."
        )
    finish_tick, chosen = max(spatial_finishes)
    total = sum(p.numel() for p in model.parameters()) or 1
    downstream = sum(
        p.numel()
        for name, start in first_start.items()
        if start > finish_tick
        for p in named[name].parameters(recurse=False)
    )
    if downstream / total > MAX_DOWNSTREAM_PARAM_SHARE:
        raise TargetLayerError(
            f"The last layer of {type(model).__name__} that emits a spatial map is {chosen!r}, but "
            f"{downstream / total:.0%} of the parameters run after it (this looks like a transformer "
            "or another non-CNN). A class activation map there would not explain the model. Pass "
            "target_layer= explicitly if you really mean that layer."
        )
    return Target(name=chosen, module=named[chosen])


def resolve_target(
    model: nn.Module,
    target_layer: str | nn.Module | None,
    x: torch.Tensor | None = None,
    forward_args: Sequence[Any] = (),
    forward_kwargs: Mapping[str, Any] | None = None,
) -> Target:
    """Turn the user's ``target_layer`` into a :class:`Target`.

    None picks MONAI's known layer for DenseNet/ResNet/SENet/EfficientNetBN/Classifier, otherwise
    the last module emitting a (B, C, *spatial) map (found with one probe forward on ``x``).
    """
    if isinstance(target_layer, str):
        return _by_name(model, target_layer)
    if isinstance(target_layer, nn.Module):
        return _by_module(model, target_layer)
    if target_layer is not None:
        raise TargetLayerError(
            f"target_layer must be a module name, an nn.Module or None, not {type(target_layer).__name__}."
        )
    default = _monai_default_name(model)
    if default is not None:
        return _by_name(model, default)
    if x is None:
        raise TargetLayerError("target_layer=None needs an input to find the last spatial layer.")
    return probe_last_spatial_layer(model, x, forward_args, forward_kwargs)

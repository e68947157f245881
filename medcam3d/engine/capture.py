"""Replace the target activation during a forward pass (a detached leaf, or zeros)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from medcam3d.errors import TargetLayerError
from medcam3d.engine.targets import Target


def _shape_error(target: Target, value: object, spatial_rank: int) -> TargetLayerError:
    what = (
        f"a tensor of shape {tuple(value.shape)}"
        if isinstance(value, torch.Tensor)
        else f"a {type(value).__name__}"
    )
    return TargetLayerError(
        f"target layer {target.label!r} emits {what}, not a (B, C, *spatial) map with "
        f"{spatial_rank} spatial dims like the input. Pick a convolutional layer before global "
        "pooling/flattening (e.g. 'layer4' for ResNet, 'class_layers.relu' for DenseNet)."
    )


@contextmanager
def replace_target(
    target: Target, spatial_rank: int, replace: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[list[torch.Tensor]]:
    """Within the block, each forward feeds ``replace(activation)`` onward instead of the activation.

    Yields a list that receives the original activation of the call. The module must run exactly
    once per forward: a module reused inside the network (like EfficientNet's ``_swish``) is
    ambiguous and is refused with a clear message. The hook is removed in ``finally``.
    """
    seen: list[torch.Tensor] = []

    def swap(value: object) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or value.ndim != spatial_rank + 2:
            raise _shape_error(target, value, spatial_rank)
        if seen:
            raise TargetLayerError(
                f"target layer {target.label!r} runs more than once per forward pass, so its "
                "activation is ambiguous. Choose a module that runs once, or the input of the "
                "module that follows it (write 'name:input')."
            )
        seen.append(value)
        return replace(value)

    if target.where == "output":
        handle = target.module.register_forward_hook(lambda _m, _i, out: swap(out))
    else:

        def pre_hook(_module, args):
            if not args:
                raise _shape_error(target, None, spatial_rank)
            return (swap(args[0]), *args[1:])

        handle = target.module.register_forward_pre_hook(pre_hook)
    try:
        yield seen
    finally:
        handle.remove()

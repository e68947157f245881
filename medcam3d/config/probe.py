"""One probe forward before a cohort starts: does the model run on what the preprocessing makes,
is the target layer a spatial map that runs once, and which weights does the forward use?

The probe input is the preprocessing applied to a synthetic CT-like volume (a 0 HU sphere in
-1000 HU air, RAS, 128 x 128 x 64 voxels of 2.7 x 2.7 x 5 mm, about a chest CT's field of view). The
chain is also run on a second, differently shaped dummy: when both come out the same shape the
chain has a fixed output shape and a model that fails on it would fail on every scan, so that is
refused. When the shape depends on the scan, a probe failure is reported by the caller instead of
refused (real scans may still fit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from medcam3d.errors import ConfigError, TargetLayerError

_DUMMIES = (((128, 128, 64), (2.7, 2.7, 5.0)), ((110, 100, 56), (3.1, 2.9, 5.5)))


@dataclass
class ProbeResult:
    """Outcome of :func:`probe_model`.

    Attributes:
        ran: the forward ran (False: ``error`` says why; nothing else was learned).
        input_shape: the model input, (1, C, *spatial).
        fixed_shape: the preprocessing emits this shape for any scan.
        target_layer: the resolved layer label (``"features"``, ``"layer4"``...).
        used: state-dict keys (parameters and buffers) of every module that ran in the forward.
        error: the failure, one line (when ``ran`` is False).
    """

    ran: bool
    input_shape: tuple[int, ...] = ()
    fixed_shape: bool = False
    target_layer: str | None = None
    used: set[str] = field(default_factory=set)
    error: str | None = None


def _dummy(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Any:
    from monai.data import MetaTensor

    idx = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape, dtype=np.float32) - 1) / 2
    r2 = sum(((idx[i] - centre[i]) / (shape[i] / 3)) ** 2 for i in range(3))
    vol = np.where(r2 <= 1.0, 0.0, -1000.0).astype(np.float32)[None]
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    return MetaTensor(torch.from_numpy(vol), affine=affine, meta={"space": "RAS"})


def probe_input(preprocess: Any) -> tuple[torch.Tensor, bool]:
    """(model input of shape (1, C, *spatial) float32, whether the chain's output shape is fixed).

    Raises:
        ConfigError: the preprocessing fails on a plain CT-like volume.
    """
    outs = []
    for shape, spacing in _DUMMIES:
        try:
            out = preprocess(_dummy(shape, spacing))
        except Exception as exc:
            raise ConfigError(
                f"preprocess: fails on a synthetic {shape} CT volume: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        outs.append(torch.as_tensor(out).float())
    return outs[0].unsqueeze(0), outs[0].shape == outs[1].shape


def _module_keys(model: nn.Module, names: set[str]) -> set[str]:
    keys: set[str] = set()
    for name, module in model.named_modules():
        if name not in names:
            continue
        prefix = f"{name}." if name else ""
        keys.update(prefix + k for k, _ in module.named_parameters(recurse=False))
        keys.update(prefix + k for k, _ in module.named_buffers(recurse=False))
    return keys


def probe_model(
    model: nn.Module,
    preprocess: Any,
    target_layer: str | None,
    forward_kwargs: dict[str, Any] | None = None,
) -> ProbeResult:
    """Run one no-grad forward of ``model`` (on CPU, eval) on the preprocessed dummy with the
    target layer hooked exactly as the engine hooks it; the model's hooks, flags and modes are
    restored afterwards. ``forward_kwargs`` are the model's extra inputs (batch of one).

    Raises:
        ConfigError: the preprocessing fails on the dummy; the output shape is fixed and the
            model cannot run on it.
        TargetLayerError: the target layer is unknown, never runs, runs more than once per
            forward, or does not emit a (B, C, *spatial) map (the engine's own checks and messages).
    """
    from medcam3d.engine.capture import replace_target
    from medcam3d.engine.guard import frozen_eval
    from medcam3d.engine.targets import resolve_target, unwrap_compiled

    model = unwrap_compiled(model)  # hooks on a compiled module would make Dynamo trace them
    x, fixed = probe_input(preprocess)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = x.to(dtype)  # a bf16/fp16 model gets an input of its own dtype, as explain_volume does
    ran: set[str] = set()
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda *_a, _n=name: ran.add(_n)))
    try:
        with frozen_eval(model), torch.no_grad():
            try:
                target = resolve_target(model, target_layer, x, forward_kwargs=forward_kwargs)
                with replace_target(target, x.ndim - 2, lambda a: a) as seen:
                    model(x, **(forward_kwargs or {}))
                if not seen:
                    raise TargetLayerError(
                        f"target layer {target.label!r} does not run in the model's forward pass, "
                        "so nothing it computes reaches the output; pick a layer that runs"
                    )
            except TargetLayerError:
                raise
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                message = f"{type(exc).__name__}: {first}"
                if fixed:
                    raise ConfigError(
                        f"model: cannot run on the preprocessing's output (input shape "
                        f"{tuple(x.shape)}, the same for every scan): {message}; check model.kwargs "
                        "and preprocess"
                    ) from exc
                return ProbeResult(False, tuple(x.shape), fixed, error=message)
    finally:
        for h in handles:
            h.remove()
    return ProbeResult(True, tuple(x.shape), fixed, target.label, _module_keys(model, ran))

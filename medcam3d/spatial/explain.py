"""Explain one scan end to end: preprocess, run the engine, map the maps back onto the scan's grid."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import Any, overload

import torch
from torch import nn

from medcam3d.engine import ClassSpec, FeatureGeometry, MultiCAM, ScoreSpec
from medcam3d.errors import ClassIndexError, InputError
from medcam3d.explanation import ACTIVATIONS, Explanation
from medcam3d.spatial.coverage import outside_scan_fraction
from medcam3d.spatial.inverse import iter_maps_to_volume, maps_to_volume
from medcam3d.spatial.preprocess import build_preprocessing, model_input
from medcam3d.spatial.volume import as_volume


def _device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    param = next(model.parameters(), None)
    if device is None:
        return param.device if param is not None else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device {device!r} is not a torch device ({e}); use e.g. 'cpu' or 'cuda:0'.") from e
    if param is not None and param.device != dev:
        model.to(dev)
    return dev


def _names(class_names: Sequence[str] | None, n_outputs: int, idx: list[int]) -> list[str]:
    if class_names is None:
        return [f"class_{i}" for i in idx]
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise InputError(
            f"class_names must be a list of {n_outputs} strings, got {type(class_names).__name__}."
        )
    names = list(class_names)
    if len(names) != n_outputs:
        raise InputError(
            f"class_names has {len(names)} name(s) but the model has {n_outputs} output(s); give one "
            "name per model output, in output order."
        )
    if not all(isinstance(n, str) and n for n in names):
        raise InputError(f"class_names must be non-empty strings, got {names!r}.")
    return [names[i] for i in idx]


def _autocast(amp: bool, dev: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CPU and on CUDA with bf16 support, float16 on other CUDA devices."""
    if not amp:
        return contextlib.nullcontext()
    if dev.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if dev.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    raise InputError(f"amp is supported on CPU and CUDA only, not on {dev.type}; set amp to false.")


def _input_dtype(model: nn.Module) -> torch.dtype:
    """The model's floating parameter dtype (a bf16/fp16 model gets its input in that dtype)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _to_device(value: Any, dev: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dev)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, dev) for v in value)
    if isinstance(value, Mapping):
        return {k: _to_device(v, dev) for k, v in value.items()}
    return value


def class_indices_by_name(class_idx: Any, class_names: Sequence[str] | None) -> Any:
    """``class_idx`` with class names replaced by their output index in ``class_names``.

    "all" stays "all"; ints, tensors and None pass through.

    Raises:
        ClassIndexError: a name that is not in ``class_names`` (the message lists them).
    """

    def one(v: Any) -> Any:
        if not isinstance(v, str):
            return v
        if class_names is not None and v in list(class_names):
            return list(class_names).index(v)
        known = f"known names: {', '.join(class_names)}" if class_names else "no class_names were given"
        raise ClassIndexError(f"class_idx: {v!r} is not a class name ({known}); give names from "
                              "class_names or output indices.")

    if isinstance(class_idx, str):
        return class_idx if class_idx == "all" else one(class_idx)
    if isinstance(class_idx, (list, tuple)) and any(isinstance(v, str) for v in class_idx):
        return [one(v) for v in class_idx]
    return class_idx


@overload
def explain_volume(
    model: nn.Module, volume: Any, preprocess: Any = ..., method: str = ..., target_layer: str | nn.Module | None = ...,
    class_idx: ClassSpec = ..., class_names: Sequence[str] | None = ..., activation: str = ...,
    device: str | torch.device | None = ..., amp: bool = ..., stream: bool = ..., *, methods: None = ..., score: ScoreSpec = ...,
    forward_args: Sequence[Any] = ..., forward_kwargs: Mapping[str, Any] | None = ...,
) -> Explanation: ...


@overload
def explain_volume(
    model: nn.Module, volume: Any, preprocess: Any = ..., method: str = ..., target_layer: str | nn.Module | None = ...,
    class_idx: ClassSpec = ..., class_names: Sequence[str] | None = ..., activation: str = ...,
    device: str | torch.device | None = ..., amp: bool = ..., stream: bool = ..., *, methods: Sequence[str], score: ScoreSpec = ...,
    forward_args: Sequence[Any] = ..., forward_kwargs: Mapping[str, Any] | None = ...,
) -> dict[str, Explanation]: ...


def explain_volume(
    model: nn.Module,
    volume: Any,
    preprocess: Any = None,
    method: str = "hirescam",
    target_layer: str | nn.Module | None = None,
    class_idx: ClassSpec = "all",
    class_names: Sequence[str] | None = None,
    activation: str = "sigmoid",
    device: str | torch.device | None = None,
    amp: bool = False,
    stream: bool = False,
    *,
    methods: Sequence[str] | None = None,
    score: ScoreSpec = None,
    forward_args: Sequence[Any] = (),
    forward_kwargs: Mapping[str, Any] | None = None,
    feature_geometry: FeatureGeometry | None = None,
) -> Explanation | dict[str, Explanation]:
    """Explain ``model`` on one scan; the maps come back on the scan's own grid and affine.

    Args:
        model: nn.Module mapping (1, C, *model_spatial) to (1, N) raw class scores (or any output,
            with ``score``). A bfloat16/float16 model gets its input in that dtype.
        volume: MetaTensor (1, X, Y, Z) with its affine (``medcam3d.load_volume``), or a path.
        preprocess: what the model expects, as for :func:`build_preprocessing` (None: the volume as is).
        method: one method name (see ``medcam3d.engine.METHODS``) when ``methods`` is None.
        target_layer: layer name, module, or None for the engine's default.
        class_idx: which score columns to explain (every form of ``medcam3d.engine.ClassSpec``:
            "all", None for the top class, an int, a list of ints), or class names from
            ``class_names`` ("nodule" or ["nodule", 2]), as the YAML config accepts them.
        class_names: one name per MODEL OUTPUT (N of them); the explained ones are picked out.
        activation: "sigmoid" (multi-label) or "softmax" (over all N outputs) for ``probabilities``.
        device: where the model runs (the model is moved there); None: where its parameters are.
        amp: autocast, bfloat16 on CPU (and on CUDA where supported, else float16). Maps stay
            float32; check completeness with the dtype's tolerance (``engine.RTOL_BY_DTYPE``).
        stream: do not hold the K scan-grid maps: ``maps`` is None and ``iter_maps()`` maps them
            back one class at a time (on the model's device); ``grid`` is the scan.
        methods: several method names: ONE forward and ONE backward serve them all, and the
            result is ``{method: Explanation}`` in the order given.
        score: what is explained (``medcam3d.engine.OutputKey``, ``RegionScore``, ``Similarity`` or
            any callable output -> (1, N)); None: the model's (1, N) logits.
        forward_args / forward_kwargs: extra model inputs (``model(x, *forward_args,
            **forward_kwargs)``), batched like x (a batch of 1); tensors are moved to ``device``.
        feature_geometry: where the target layer's cells sit in the model input; None measures it
            (see :class:`medcam3d.FeatureGeometry`). The model-grid maps are placed with it before
            the inverse.

    Returns:
        :class:`Explanation` (or a dict of them with ``methods``); ``extra`` holds ``model_maps``
        (K, *model_spatial) and ``model_affine`` (the model grid, for debugging), ``preprocessing``
        (step names) and ``seconds`` (preprocess, engine and inverse; with ``methods`` the shared
        preprocess and engine times are reported on each).

    Raises:
        InputError / ClassIndexError / TargetLayerError: bad volume, names, method, classes, layer.
        FeatureGeometryError (a TargetLayerError): where the layer's cells sit could not be measured.
        ConfigError: the preprocessing is invalid or fails on this volume.
        VolumeLoadError: ``volume`` is a path that cannot be read.
    """
    t0 = time.perf_counter()
    if activation not in ACTIVATIONS:
        raise InputError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}.")
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, not {type(model).__name__}.")
    if methods is not None and method != "hirescam":
        raise InputError(f"give method= (one Explanation) or methods= (a dict of them), not both; got "
                         f"method={method!r} and methods={list(methods)!r}.")
    class_idx = class_indices_by_name(class_idx, class_names)
    multi = MultiCAM(model, [method] if methods is None else methods, target_layer,
                     feature_geometry=feature_geometry)
    vol = as_volume(volume)
    compose = build_preprocessing(preprocess)
    x = model_input(vol, compose)
    t1 = time.perf_counter()
    dev = _device(model, device)
    xin = x.as_tensor()[None].to(dev, _input_dtype(model))
    with _autocast(amp, dev):
        results = multi(
            xin, class_idx, score=score, forward_args=_to_device(tuple(forward_args), dev),
            forward_kwargs=_to_device(dict(forward_kwargs or {}), dev),
        )
    t2 = time.perf_counter()
    explained = {m: _on_scan(res, x, compose, vol, class_names, activation, t1 - t0, t2 - t1, stream)
                 for m, res in results.items()}
    return explained if methods is not None else explained[multi.methods[0]]


def _on_scan(
    res: Any, x: Any, compose: Any, vol: Any, class_names: Sequence[str] | None, activation: str,
    t_pre: float, t_engine: float, stream: bool,
) -> Explanation:
    """One method's :class:`CAMResult` (batch of 1) -> an Explanation on the scan's grid."""
    t2 = time.perf_counter()
    idx = res.class_idx[0].cpu()
    outputs = res.outputs[0].cpu()
    names = _names(class_names, int(outputs.shape[0]), idx.tolist())
    probs = torch.sigmoid(outputs) if activation == "sigmoid" else torch.softmax(outputs, dim=0)
    device_maps = res.maps[0].detach().to(torch.float32)
    model_maps = device_maps.to("cpu")
    outside = outside_scan_fraction(model_maps, x, vol)  # measured before the inverse drops it
    maps = None if stream else maps_to_volume(device_maps, x, compose, vol)
    t3 = time.perf_counter()
    return Explanation(
        maps=maps,
        logits=res.logits[0].detach().cpu().float(),
        probabilities=probs[idx].float(),
        class_idx=idx.long(),
        class_names=names,
        method=res.method,
        target_layer=res.target_layer,
        raw=res.raw[0].detach().cpu().float(),
        activation=activation,
        outside_scan_fraction=outside,
        extra={
            "model_maps": model_maps,
            "model_affine": torch.as_tensor(x.affine, dtype=torch.float64).clone(),
            "model_input_shape": tuple(int(s) for s in x.shape),
            "preprocessing": [type(t).__name__ for t in compose.transforms],
            "outputs": outputs.float(),
            "seconds": {"preprocess": t_pre, "engine": t_engine, "inverse": t3 - t2},
        },
        grid=vol if stream else None,
        stream=(lambda grid=vol: iter_maps_to_volume(device_maps, x, compose, grid)) if stream else None,
    )

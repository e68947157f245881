"""Take maps from the model's grid back onto the scan's grid through MONAI's own inverses.

How: the K maps become one K-channel MetaTensor carrying the model input's affine and a copy of its
``applied_operations``; ``Compose.inverse`` then undoes exactly the recorded steps, last first
(crop -> pad back, pad -> crop, Spacing -> resample onto the recorded source affine and size,
Orientation -> flip/permute back). Nothing is resampled by hand.

Two adjustments, both still MONAI machinery:
- Interpolation: a recorded step replays the image's own mode (Resize defaults to "area", a Spacing
  may have been "nearest"). Maps are continuous, so in our copy of the record every resampling mode
  is switched to (tri)linear before inverting; the image's record is untouched.
- Grid check: after the inverse the maps must sit on the scan's grid. MONAI restores the affine up to
  float32 round-off (~1e-7 mm after Rotate, for instance); that is accepted and the scan's exact affine
  is stamped on. A larger offset or a shape mismatch (a custom invertible step whose inverse does not
  restore its input's grid exactly) is fixed by resampling with ``SpatialResample`` onto
  ``dst_affine`` = the scan's affine and the scan's shape, which places every value by world position.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch

from medcam3d.errors import InputError

# world-space tolerance (mm) below which an affine difference is float round-off, not an offset
AFFINE_ATOL_MM = 1e-3
_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


def _linear_modes(op: Any, rank: int) -> None:
    """In place: make every resampling step of one recorded operation (and nested ones) linear."""
    if not isinstance(op, dict):
        return
    extra = op.get("extra_info")
    if isinstance(extra, dict):
        # Resampling steps record "mode" together with "align_corners"; pad steps record a "mode"
        # that is a padding mode and no "align_corners", so they are left alone.
        if "mode" in extra and "align_corners" in extra:
            mode = extra["mode"]
            if "padding_mode" in extra:  # grid-sample family: SpatialResample/Spacing, Rotate, Affine
                extra["mode"] = 1 if isinstance(mode, int) and not isinstance(mode, bool) else "bilinear"
            else:  # torch.nn.functional.interpolate family: Resize, Zoom
                extra["mode"] = _LINEAR[rank]
        for value in extra.values():
            if isinstance(value, dict):
                _linear_modes(value, rank)


def _map_record(x: Any, rank: int) -> list[Any]:
    ops = copy.deepcopy(list(x.applied_operations))
    for op in ops:
        _linear_modes(op, rank)
    return ops


def on_grid(maps: Any, affine: torch.Tensor, shape: tuple[int, ...]) -> Any:
    """Resample (K, *s) MetaTensor ``maps`` onto the grid (``affine``, ``shape``) by world position.

    Trilinear, zeros outside the maps' field of view. Used only when an inverse did not land exactly
    on the scan's grid (see the module docstring).
    """
    from monai.transforms import SpatialResample

    resample = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float64)
    with resample.trace_transform(False):
        return resample(maps, dst_affine=torch.as_tensor(affine, dtype=torch.float64), spatial_size=shape)


def maps_to_volume_monai(maps: torch.Tensor, x: Any, preprocess: Any, volume: Any, *, chunk: int = 4) -> Any:
    """Map (K, *model_spatial) maps back onto ``volume``'s grid through MONAI's ``Compose.inverse``.

    The reference path (every recorded step undone in turn, float64 resampling); used by
    :func:`maps_to_volume` whenever the recorded preprocessing is not a chain it can compose exactly.

    Args:
        maps: (K, *model_spatial) tensor of non-negative maps on the model input's grid.
        x: the model input from :func:`medcam3d.spatial.model_input` (its record of operations).
        preprocess: the SAME Compose object that produced ``x``.
        volume: the MetaTensor (1, *spatial) that was preprocessed.
        chunk: classes inverted at a time (bounds the peak memory of the float64 resampling).

    Returns:
        MetaTensor (K, *volume_spatial), float32, >= 0, with ``volume``'s affine and a copy of its meta.

    Raises:
        InputError: shapes do not match, or ``x`` was not produced by ``preprocess``.
    """
    from monai.data import MetaTensor

    spatial = tuple(x.shape[1:])
    if maps.ndim != len(spatial) + 1 or tuple(maps.shape[1:]) != spatial:
        raise InputError(
            f"maps have shape {tuple(maps.shape)}; expected (K, {', '.join(map(str, spatial))}) to match "
            "the model input."
        )
    rank = len(spatial)
    target_shape = tuple(int(s) for s in volume.shape[1:])
    target_affine = torch.as_tensor(volume.affine, dtype=torch.float64)
    maps = torch.as_tensor(maps).detach().to("cpu", torch.float32)
    out = torch.empty((maps.shape[0], *target_shape), dtype=torch.float32)
    for start in range(0, maps.shape[0], max(1, chunk)):
        part = MetaTensor(
            maps[start : start + chunk].clone(),
            affine=torch.as_tensor(x.affine, dtype=torch.float64).clone(),
            meta={k: v for k, v in x.meta.items() if k != "affine"},
            applied_operations=_map_record(x, rank),
        )
        if not part.applied_operations:
            back = part  # nothing geometric was recorded (e.g. only an intensity window)
        else:
            try:
                back = preprocess.inverse(part)
            except Exception as e:
                raise InputError(
                    f"could not invert the preprocessing ({type(e).__name__}: {e}); pass the same "
                    "Compose object that produced the model input."
                ) from e
        back_affine = torch.as_tensor(back.affine, dtype=torch.float64)
        exact = tuple(back.shape[1:]) == target_shape and torch.allclose(
            back_affine, target_affine, rtol=0, atol=AFFINE_ATOL_MM
        )
        if not exact:
            back = on_grid(back, target_affine, target_shape)
        out[start : start + chunk] = torch.as_tensor(back.as_tensor() if hasattr(back, "as_tensor") else back)
        del part, back
    out.clamp_(min=0)
    meta = copy.deepcopy({k: v for k, v in volume.meta.items() if k != "affine"})
    return MetaTensor(
        out,
        affine=target_affine.clone(),
        meta=meta,
        applied_operations=copy.deepcopy(list(volume.applied_operations)),
    )


def iter_maps_to_volume(maps: torch.Tensor, x: Any, preprocess: Any, volume: Any) -> Iterator[torch.Tensor]:
    """Class by class, each (X, Y, Z) float32 map of ``maps`` (K, *model_spatial) on ``volume``'s grid.

    One resampling per class through the composed preprocessing (:mod:`medcam3d.spatial.composed`)
    on the maps' own device when the record allows it exactly; otherwise MONAI's ``Compose.inverse``
    (:func:`maps_to_volume_monai`), one class at a time. Only one full-size map is alive per step.

    Raises:
        InputError: as :func:`maps_to_volume`.
    """
    from medcam3d.spatial.composed import composed_mapping, iter_resampled

    spatial = tuple(x.shape[1:])
    if maps.ndim != len(spatial) + 1 or tuple(maps.shape[1:]) != spatial:
        raise InputError(
            f"maps have shape {tuple(maps.shape)}; expected (K, {', '.join(map(str, spatial))}) to match "
            "the model input."
        )
    maps = torch.as_tensor(maps).detach()
    mapping = composed_mapping(x, preprocess, volume)
    if mapping is not None:
        yield from iter_resampled(maps, mapping)
        return
    for k in range(maps.shape[0]):
        yield maps_to_volume_monai(maps[k : k + 1], x, preprocess, volume).as_tensor()[0]


def maps_to_volume(maps: torch.Tensor, x: Any, preprocess: Any, volume: Any) -> Any:
    """Map (K, *model_spatial) maps computed on ``x`` back onto ``volume``'s grid.

    One composed resampling when the recorded preprocessing is a pure grid change (Orientation,
    Spacing, crop, pad; see :mod:`medcam3d.spatial.composed`), else MONAI's ``Compose.inverse``; both
    agree within interpolation error (tests/test_spatial_composed.py).

    Args:
        maps: (K, *model_spatial) tensor of non-negative maps on the model input's grid (any device).
        x: the model input from :func:`medcam3d.spatial.model_input` (its record of operations).
        preprocess: the SAME Compose object that produced ``x``.
        volume: the MetaTensor (1, *spatial) that was preprocessed.

    Returns:
        MetaTensor (K, *volume_spatial), float32 on the CPU, >= 0, with ``volume``'s affine and a copy
        of its meta.

    Raises:
        InputError: shapes do not match, or ``x`` was not produced by ``preprocess``.
    """
    from monai.data import MetaTensor

    target_shape = tuple(int(s) for s in volume.shape[1:])
    out = torch.empty((int(maps.shape[0]), *target_shape), dtype=torch.float32)
    for k, m in enumerate(iter_maps_to_volume(maps, x, preprocess, volume)):
        out[k] = m.to("cpu")
    meta = copy.deepcopy({k: v for k, v in volume.meta.items() if k != "affine"})
    return MetaTensor(
        out,
        affine=torch.as_tensor(volume.affine, dtype=torch.float64).clone(),
        meta=meta,
        applied_operations=copy.deepcopy(list(volume.applied_operations)),
    )

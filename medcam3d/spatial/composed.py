"""Maps back onto the scan in ONE resampling: the recorded preprocessing composed into one mapping.

Why: undoing the recorded steps one by one (``Compose.inverse``) resamples K full-size float64
volumes per step. When every recorded step is a pure change of voxel grid that keeps world
positions (reorientation, resampling to a spacing, crop, pad), the model grid and the scan grid are
both described completely by their affines, and the whole inverse is one mapping

    model index = inv(A_model) @ A_scan @ scan index,

where ``A_model`` is the model input's affine (MONAI updates it at every such step) and ``A_scan``
the scan's. Sampling the model-grid map there, trilinearly with zeros outside the model grid, is what
``Compose.inverse`` computes up to interpolation error (it interpolates linearly at every step; a
crop comes back as zeros). Measured: equal to float round-off (~1e-7 of the maximum) everywhere except
in a band at most one model voxel wide at the scan's field-of-view edge, where the scan's outermost
voxel centres lie beyond the outermost Spacing-grid voxel centre: there MONAI's recorded
``padding_mode="border"`` repeats the edge value, while this path interpolates towards the model
grid's next voxel (a padded voxel's map value, or zero outside the model grid). On the tests/data
abdominal CT (3 mm slices, 6 mm model voxels) that is the last slice, up to 4 % of the map's maximum;
on lung1 (512x512x48) nowhere (1.8e-7). tests/test_spatial_composed.py pins peaks, centres of mass
(<= 0.2 mm) and the interior values against MONAI's inverse.

When the mapping is axis-aligned (each scan axis feeds exactly one model axis: any Orientation,
Spacing, crop or pad of a scan, oblique ones included, because Spacing keeps the scan's directions),
trilinear sampling is a product of three 1D linear interpolations, done axis by axis in float32 on
the maps' device as matrix products, the last one written straight into the output, so one class
needs one full-size output plus a smaller intermediate. Anything else (a step outside
:data:`COMPOSABLE`, a record from a different Compose, a non-axis-aligned composition, lazy steps)
returns ``None`` from :func:`composed_mapping` and the caller falls back to MONAI's inverse: never a
guess.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

# recorded operation class names whose inverse is a pure change of grid (world positions kept)
COMPOSABLE = frozenset(
    {
        "Orientation",
        "Spacing",
        "SpatialResample",
        "Flip",
        "SpatialPad",
        "BorderPad",
        "DivisiblePad",
        "SpatialCrop",
        "CenterSpatialCrop",
        "CropForeground",
        "ResizeWithPadOrCrop",
    }
)
# an off-axis coefficient moving a sample by less than this (model voxels) over the scan is round-off
OFF_AXIS_TOL_VOXELS = 1e-3


@dataclass(frozen=True)
class AxisMapping:
    """Model index along ``source_axis[c]`` = ``scale[c] * scan index along c + offset[c]``.

    Attributes:
        source_axis: for each scan axis c (0..2), the model axis it samples.
        scale: model voxels per scan voxel along scan axis c (signed; float64).
        offset: model index of scan index 0 along scan axis c (float64).
        scan_shape: the scan's (X, Y, Z).
    """

    source_axis: tuple[int, ...]
    scale: tuple[float, ...]
    offset: tuple[float, ...]
    scan_shape: tuple[int, ...]


def _op_names(op: Any) -> Iterator[tuple[str, Any]]:
    """(class name, op) of a recorded operation and of the operations nested in its extra_info."""
    if not isinstance(op, dict):
        return
    yield str(op.get("class", "")), op
    extra = op.get("extra_info")
    if isinstance(extra, dict):
        for value in extra.values():
            if isinstance(value, dict) and "class" in value:
                yield from _op_names(value)


def composed_mapping(x: Any, preprocess: Any, volume: Any) -> AxisMapping | None:
    """The scan-grid -> model-grid mapping of ``x`` as one axis-aligned affine, or None.

    Args:
        x: the model input MetaTensor (C, *model_spatial) from :func:`medcam3d.spatial.model_input`.
        preprocess: the Compose that produced ``x`` (its transforms must be the recorded ones).
        volume: the scan MetaTensor (1, X, Y, Z).

    Returns:
        :class:`AxisMapping`, or None when the record holds a step outside :data:`COMPOSABLE`, a
        pending (lazy) step, a step of another Compose (the caller's MONAI inverse then raises), or
        when the composition is not axis-aligned.
    """
    ops = list(getattr(x, "applied_operations", []))
    transforms = list(getattr(preprocess, "transforms", []))
    # a step records its own id, or its delegate's (Spacing records its SpatialResample)
    ids = [{id(t), id(getattr(t, "sp_resample", t))} for t in transforms]
    pos = 0
    for op in ops:
        if not isinstance(op, dict) or op.get("lazy"):
            return None
        # the recorded steps must be this Compose's transforms, in order
        pos = next((i + 1 for i in range(pos, len(ids)) if op.get("id") in ids[i]), -1)
        if pos < 0:
            return None
        for name, sub in _op_names(op):
            if name not in COMPOSABLE or sub.get("lazy"):
                return None
    a_model = torch.as_tensor(x.affine, dtype=torch.float64).cpu()
    a_scan = torch.as_tensor(volume.affine, dtype=torch.float64).cpu()
    m = torch.linalg.solve(a_model, a_scan)  # scan index -> model index
    scan_shape = tuple(int(s) for s in volume.shape[1:])
    rank = len(scan_shape)
    if m.shape != (rank + 1, rank + 1) or not bool(torch.isfinite(m).all()):
        return None
    lin = m[:rank, :rank]
    source = [int(torch.argmax(lin[:, c].abs())) for c in range(rank)]
    if sorted(source) != list(range(rank)):
        return None
    extent = torch.tensor([max(n - 1, 1) for n in scan_shape], dtype=torch.float64)
    off = lin.abs() * extent[None, :]
    for c, r in enumerate(source):
        off[r, c] = 0.0
    if float(off.sum(dim=1).max()) > OFF_AXIS_TOL_VOXELS:
        return None
    return AxisMapping(
        source_axis=tuple(source),
        scale=tuple(float(lin[r, c]) for c, r in enumerate(source)),
        offset=tuple(float(m[r, rank]) for r in source),
        scan_shape=scan_shape,
    )


def _taps(scale: float, offset: float, n_out: int, n_in: int, device: torch.device):
    """Linear-interpolation taps (i0, i1, w0, w1) for samples at ``scale * j + offset``, j < n_out.

    A tap outside 0..n_in-1 gets weight 0 (zeros outside the model grid, as grid_sample's
    ``padding_mode="zeros"``). Coordinates are float64, weights float32.
    """
    coord = torch.arange(n_out, dtype=torch.float64, device=device) * scale + offset
    i0 = torch.floor(coord)
    w1 = coord - i0
    i0 = i0.long()
    i1 = i0 + 1
    w0 = torch.where((i0 >= 0) & (i0 < n_in), 1.0 - w1, torch.zeros_like(w1))
    w1 = torch.where((i1 >= 0) & (i1 < n_in), w1, torch.zeros_like(w1))
    return i0.clamp(0, n_in - 1), i1.clamp(0, n_in - 1), w0.float(), w1.float()


def _weights(scale: float, offset: float, n_out: int, n_in: int, device: torch.device) -> torch.Tensor:
    """The (n_out, n_in) float32 matrix of 1D linear interpolation at ``scale * j + offset``: row j
    holds the two taps of :func:`_taps` (zeros outside the model grid)."""
    i0, i1, w0, w1 = _taps(scale, offset, n_out, n_in, device)
    w = torch.zeros(n_out, n_in, dtype=torch.float32, device=device)
    rows = torch.arange(n_out, device=device)
    w.index_put_((rows, i0), w0, accumulate=True)
    w.index_put_((rows, i1), w1, accumulate=True)
    return w


def resample_one(model_map: torch.Tensor, mapping: AxisMapping) -> torch.Tensor:
    """One (X', Y', Z') model-grid map -> (X, Y, Z) scan-grid map, float32, on its own device.

    Trilinear at the model index of each scan voxel centre, zeros outside the model grid: a product
    of 1D linear interpolations (the tensor-product form of trilinear interpolation), each applied
    as a matrix product with a (scan voxels x model voxels) matrix of two taps per row. The last
    axis, along which the output is laid out contiguously, is multiplied straight into the output,
    so one class needs the output plus an intermediate of ``1 / magnification`` of its size.
    (Measured against index-gather interpolation on a 64x64x48 -> 512x512x48 map: equal to the
    bit, 4-5x faster on 2 CPU cores.)

    The result is laid out in NIfTI's on-disk order (first axis fastest: strides of a Fortran
    array, ``result.permute(2, 1, 0)`` is contiguous), so writing it to a file needs no transposing
    copy; indexing it is unaffected.
    """
    rank = model_map.dim()
    rev = tuple(reversed(range(rank)))
    # axis j of ``t`` runs along scan axis rank-1-j: the output is C-contiguous in this order, which
    # is Fortran order on (X, Y, Z)
    t = model_map.to(torch.float32).permute(*mapping.source_axis).permute(*rev)
    dev = t.device
    mats = [
        _weights(mapping.scale[c], mapping.offset[c], mapping.scan_shape[c], int(t.shape[rank - 1 - c]), dev)
        for c in rev
    ]
    t = t.contiguous()
    for j in range(rank - 1):  # the slower axes, on tensors smaller than the output
        # (B, n_j, R) -> (B, N_j, R) as one broadcast matmul on contiguous operands (a batched
        # matmul over a strided view was measured 20x slower)
        shape = t.shape
        b, r = math.prod(shape[:j]), math.prod(shape[j + 1:])
        t = torch.matmul(mats[j], t.reshape(b, shape[j], r)).reshape(*shape[:j], mats[j].shape[0], *shape[j + 1:])
    out = torch.empty(tuple(reversed(mapping.scan_shape)), dtype=torch.float32, device=dev)
    torch.matmul(t, mats[rank - 1].T, out=out)  # the fastest axis, written in place
    return out.clamp_(min=0).permute(*rev)


def iter_resampled(maps: torch.Tensor, mapping: AxisMapping) -> Iterator[torch.Tensor]:
    """Class by class: each (X, Y, Z) float32 scan-grid map of ``maps`` (K, *model_spatial)."""
    for k in range(maps.shape[0]):
        yield resample_one(maps[k], mapping)


@dataclass
class Grid:
    """A voxel grid in world space, standing in for a scan where only its geometry is needed.

    Attributes:
        affine: (4, 4) float64 voxel -> world (RAS mm) affine, like a MetaTensor's.
        shape: (1, X, Y, Z), like a scan MetaTensor's shape.
        meta: metadata carried to the written files (the source scan's, minus its NIfTI transform).
    """

    affine: torch.Tensor
    shape: tuple[int, ...]
    meta: dict
    applied_operations: tuple = ()


def coarser_grid(volume: Any, spacing_mm: float) -> Grid:
    """A world-aligned grid over ``volume``'s field of view with voxels of at least ``spacing_mm``.

    Same axes and directions as the scan; along each axis whose voxels are finer than
    ``spacing_mm`` the voxel is stretched by ``f = spacing_mm / voxel size`` and the grid has
    ``ceil(n / f)`` voxels whose first one starts at the scan's first voxel's outer face (the scan's
    extent is covered; the last voxel may reach up to one coarse voxel beyond it). Axes already
    coarser are kept. Viewers that place overlays by their affine (3D Slicer, ITK-SNAP, napari,
    nibabel, SimpleITK) resample such a map onto the scan themselves.

    Raises:
        ValueError: ``spacing_mm`` is not a positive finite number.
    """
    if not (isinstance(spacing_mm, int | float) and 0 < float(spacing_mm) < float("inf")):
        raise ValueError(f"spacing_mm must be a positive number of mm, got {spacing_mm!r}")
    affine = torch.as_tensor(volume.affine, dtype=torch.float64).cpu().clone()
    shape = tuple(int(s) for s in volume.shape[1:])
    voxel = torch.linalg.norm(affine[:3, :3], dim=0)
    factor = torch.clamp(float(spacing_mm) / voxel, min=1.0)
    # ceil(n / f), ignoring float round-off of the voxel size (0.8000001 mm must not add a voxel)
    new_shape = tuple(math.ceil(n / f - 1e-6) if f > 1 else n for n, f in zip(shape, factor.tolist()))
    new = affine.clone()
    new[:3, :3] = affine[:3, :3] * factor[None, :]
    start = -0.5 + factor / 2.0  # scan index of the first coarse voxel's centre
    new[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    meta = {k: v for k, v in dict(getattr(volume, "meta", {}) or {}).items() if k != "affine"}
    return Grid(affine=new, shape=(1, *new_shape), meta=meta)

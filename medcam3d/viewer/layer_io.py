"""From napari layers back to medcam3d objects: the CT as a MetaTensor, a heat layer as a NIfTI file.

A layer medcam3d made keeps the source affine, meta and axis permutation in ``metadata["medcam3d"]``,
so the scan and the maps come back exactly on the source grid. A plain image layer (made by hand or
by another reader) is rebuilt from its napari transform, assuming napari world axes are RAS mm.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medcam3d.errors import ExportError, InputError
from medcam3d.viewer.geometry import inverse_permutation, layer_world_affine
from medcam3d.viewer.layers import CT, HEAT, medcam_meta


def volume_from_layer(layer: Any) -> Any:
    """The CT of an image layer as a MetaTensor (1, X, Y, Z) float32 with its voxel → RAS affine.

    Raises:
        InputError: not a 3D single-channel image layer (RGB, 2D, 4D...).
    """
    from monai.data import MetaTensor

    info = medcam_meta(layer)
    if info.get("kind") == CT and info.get("volume") is not None:
        return info["volume"]
    if getattr(layer, "rgb", False) or getattr(layer, "multiscale", False):
        raise InputError(f"Layer {layer.name!r} is RGB or multiscale; pick a single-channel CT image layer.")
    data = np.asarray(layer.data)
    if data.ndim != 3:
        raise InputError(
            f"Layer {layer.name!r} has {data.ndim} dimensions {data.shape}; a CT layer must be 3D (X, Y, Z)."
        )
    affine = layer_world_affine(layer)
    tensor = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None]
    return MetaTensor(tensor, affine=torch.as_tensor(affine), meta={"space": "RAS"})


def explanation_from_layer(layer: Any) -> Any:
    """A one-class :class:`~medcam3d.spatial.Explanation` for a heat layer, on the source grid."""
    from monai.data import MetaTensor

    from medcam3d.explanation import Explanation

    info = medcam_meta(layer)
    if info.get("kind") != HEAT:
        raise InputError(
            f"Layer {getattr(layer, 'name', layer)!r} is not a medcam3d heat layer; pick a layer named "
            "'<class> (<method>)' made by the Explain widget, medcam3d.view or the medcam3d reader."
        )
    data = np.transpose(np.asarray(layer.data, dtype=np.float32), inverse_permutation(tuple(info["perm"])))
    meta = dict(info.get("meta") or {})
    maps = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(data))[None], affine=torch.as_tensor(info["affine"]), meta=meta
    )

    def scalar(key: str) -> torch.Tensor:
        v = info.get(key)
        return torch.tensor([np.nan if v is None else float(v)], dtype=torch.float32)

    idx = info.get("class_index")
    return Explanation(
        maps=maps,
        logits=scalar("logit"),
        probabilities=scalar("probability"),
        class_idx=torch.tensor([-1 if idx is None else int(idx)], dtype=torch.int64),
        class_names=[str(info.get("class_name", "class"))],
        method=str(info.get("method", "map")),
        target_layer=str(info.get("target_layer", "")),
        raw=torch.empty(0),
    )


def save_heat_layer(
    layer: Any,
    out_dir: str | os.PathLike[str],
    stem: str | None = None,
    *,
    overwrite: bool = False,
    source_paths: Sequence[str | os.PathLike[str]] = (),
) -> list[Path]:
    """Write a heat layer as a float32 NIfTI on the source scan's grid (via :func:`medcam3d.save_nifti`).

    Raises:
        InputError: the layer is not a medcam3d heat layer.
        ExportError: from ``save_nifti`` (existing file, input file, unwritable folder); nothing written.
    """
    from medcam3d.io import save_nifti

    if not out_dir or not str(out_dir).strip():
        raise ExportError("No output folder given; choose a folder to save the map into.")
    expl = explanation_from_layer(layer)
    # one file saved by hand: the exact float32 values (the cohort CLI defaults to uint16)
    return save_nifti(expl, out_dir, stem, overwrite=overwrite, source_paths=source_paths, storage="float32")

"""The result of explaining one scan, as a type every layer can take (imports only torch).

It lives at the bottom of the package (like Captum's ``_utils/typing`` and TorchIO's ``typing``):
``spatial`` builds it, ``io`` writes it, ``viewer`` and ``report`` show it, none of them imports the
others to name it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from medcam3d.names import ACTIVATIONS  # how raw scores become ``probabilities`` (re-exported)

if TYPE_CHECKING:  # pragma: no cover - typing only, monai is not imported at run time
    from monai.data import MetaTensor


@dataclass
class Explanation:
    """Maps of one volume, back on the grid of the image the user gave.

    Attributes:
        maps: MetaTensor (K, *volume_spatial), float32, >= 0, NOT normalised; its ``affine`` and
            ``meta`` are the source volume's (same shape, same affine). None for a streamed
            Explanation (``explain_volume(..., stream=True)``): then :meth:`iter_maps` computes
            the maps one class at a time and ``grid`` is the scan they sit on.
        logits: (K,) float32 raw scores of the explained outputs (the score columns, for a
            non-default score).
        probabilities: (K,) float32, ``sigmoid`` (multi-label) or ``softmax`` of the model's outputs
            at those indices, as named by ``activation``.
        class_idx: (K,) int64, which model output each map explains.
        class_names: K names (``"class_<i>"`` where none were given).
        method: the method's name (see ``medcam3d.engine.METHODS``).
        target_layer: name of the layer the maps were computed at (``"<input>"`` at the input).
        raw: (K, *feature_spatial) signed float32 map before ReLU and upsampling (model space).
        activation: one of :data:`ACTIVATIONS`.
        extra: free-form provenance (preprocessing summary, timings...).
        outside_scan_fraction: (K,) float32 in [0, 1], per class the fraction of the map's positive
            mass that lay, on the model input's grid, outside the scan's field of view (padding added
            by preprocessing, or space beyond the volume); ``maps`` cannot show that mass. See
            :mod:`medcam3d.spatial.coverage`. None when not measured (an Explanation built by hand).
        grid: the scan MetaTensor (1, *volume_spatial) the maps sit on (set when streamed).
        stream: for a streamed Explanation, a callable returning the per-class iterator (optionally
            given another target grid, see :meth:`on_grid`).
    """

    maps: MetaTensor | None
    logits: torch.Tensor
    probabilities: torch.Tensor
    class_idx: torch.Tensor
    class_names: list[str]
    method: str
    target_layer: str
    raw: torch.Tensor
    activation: str = "sigmoid"
    extra: dict[str, Any] = field(default_factory=dict)
    outside_scan_fraction: torch.Tensor | None = None
    grid: MetaTensor | None = None
    stream: Callable[..., Iterator[torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def affine(self) -> torch.Tensor:
        """4x4 RAS affine of the maps (equal to the source volume's)."""
        return self.maps.affine if self.maps is not None else self.grid.affine

    def on_grid(self, grid: Any) -> Explanation:
        """A streamed copy whose maps are mapped from the model grid straight onto ``grid`` (e.g.
        :func:`medcam3d.spatial.composed.coarser_grid`), one resampling per class.

        Raises:
            ValueError: this Explanation was not made with ``stream=True``.
        """
        if self.stream is None:
            raise ValueError("on_grid needs a streamed Explanation (explain_volume(..., stream=True)).")
        stream = self.stream
        return replace(self, maps=None, grid=grid, stream=lambda: stream(grid))

    def iter_maps(self) -> Iterator[torch.Tensor]:
        """Each class's (*volume_spatial) float32 map in class order; a streamed Explanation computes
        each one on the fly (one resampling; call again to recompute), so only one is alive at once."""
        if self.maps is not None:
            for k in range(self.maps.shape[0]):
                yield self.maps[k].as_tensor() if hasattr(self.maps, "as_tensor") else self.maps[k]
        elif self.stream is not None:
            yield from self.stream()

    def __len__(self) -> int:
        return len(self.class_names)

    def class_records(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        """Per explained class: ``{"name", "index", "logit", "probability"}``.

        Shared by the NIfTI export (JSON extension) and the napari heat layers (layer metadata), so
        both describe a map the same way. ``names`` overrides ``class_names`` (K of them). Missing or
        short score vectors give None, not an error.
        """

        def scalar(values: Any, i: int) -> float | None:
            try:
                return float(torch.as_tensor(values).reshape(-1)[i])
            except (TypeError, ValueError, IndexError, RuntimeError):
                return None

        names = list(self.class_names if names is None else names)
        idx = None if self.class_idx is None else torch.as_tensor(self.class_idx).reshape(-1)
        return [
            {
                "name": str(nm),
                "index": int(idx[i]) if idx is not None and i < idx.numel() else i,
                "logit": scalar(self.logits, i),
                "probability": scalar(self.probabilities, i),
            }
            for i, nm in enumerate(names)
        ]

"""What one explainer call returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from medcam3d.engine.geometry import FeatureGeometry, place_maps
from medcam3d.errors import FeatureGeometryError

_INTERP_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}


def upsample_maps(raw: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """ReLU then linear/bilinear/trilinear interpolation (align_corners=False) of (B, K, *s) maps.

    Runs on the device of ``raw`` and always in float32, outside any autocast region, so a map
    computed under bf16/fp16 autocast is not rounded again here.
    """
    spatial_rank = raw.ndim - 2
    mode = _INTERP_MODE[spatial_rank]
    with torch.autocast(device_type=raw.device.type, enabled=False):
        positive = torch.relu(raw.float())
        if tuple(positive.shape[2:]) == tuple(size):
            return positive
        return F.interpolate(positive, size=tuple(size), mode=mode, align_corners=False)


@dataclass
class CAMResult:
    """Maps and scores from one explainer call on a batch.

    Attributes:
        raw: (B, K, *feature_spatial) float32, SIGNED map at the target layer, before ReLU and
            upsampling. HiResCAM: sum over channels of grad * activation. Grad-CAM: sum over
            channels of spatial-mean(grad) * activation. Summed over space, HiResCAM's raw map equals
            y_k(A) - y_k(0) whenever the head after the target layer is linear in A.
        logits: (B, K) float32 raw scores (before sigmoid/softmax) of the explained outputs.
        class_idx: (B, K) int64, which model output each of the K maps explains.
        outputs: (B, N) float32, every score column (by default every raw model output; useful
            for softmax over all classes).
        method: the method's name (see ``medcam3d.engine.METHODS``).
        target_layer: the resolved target layer name (``"name:input"`` for a module's input,
            ``"<input>"`` for methods that explain at the model input).
        input_size: spatial size of the model input; ``maps`` are interpolated to it.
        batched_backward: True when all K gradients came from one batched vector-Jacobian product,
            False when an operation in the head forced the per-class fallback loop.
        activation_dtype: dtype the explained activation was computed in (bfloat16/float16 under
            autocast or for a half-precision model); it sets the tolerance of completeness checks.
        geometry: where each feature cell sits in the input (:class:`FeatureGeometry`: input axis,
            stride and offset per feature axis; ``geometry.affine`` is the (rank+1)^2 feature-index ->
            input-index matrix), measured by the explainer's probe or declared with
            ``feature_geometry=``. None (results built by hand) falls back to the
            ``interpolate(align_corners=False)`` placement of :func:`upsample_maps`.
    """

    raw: torch.Tensor
    logits: torch.Tensor
    class_idx: torch.Tensor
    outputs: torch.Tensor
    method: str
    target_layer: str
    input_size: tuple[int, ...]
    batched_backward: bool = True
    activation_dtype: torch.dtype | None = None
    geometry: FeatureGeometry | None = None
    _maps: torch.Tensor | None = field(default=None, repr=False)
    _geometry_error: str | None = field(default=None, repr=False)

    @property
    def maps(self) -> torch.Tensor:
        """(B, K, *input_spatial) float32: ReLU(raw) placed on the input grid. Not normalised.

        Each input voxel v reads ReLU(raw) at its feature coordinate u = (v - offset) / stride
        (``geometry``; axes permuted back when a feature axis follows another input axis), linearly
        interpolated between cell centres, the edge cell's value beyond them.

        Computed on first access (on raw's device) and cached, so a caller that only needs ``raw``
        or ``logits`` never pays for K full-resolution volumes.

        Raises:
            FeatureGeometryError: the explainer could not tell where the cells sit in the input
                (the message says what it found and how to declare ``feature_geometry=``).
        """
        if self._geometry_error is not None:
            raise FeatureGeometryError(self._geometry_error)
        if self._maps is None:
            if self.geometry is None:
                self._maps = upsample_maps(self.raw, self.input_size)
            else:
                self._maps = place_maps(self.raw, self.geometry, self.input_size)
        return self._maps

    @property
    def num_classes_explained(self) -> int:
        return int(self.raw.shape[1])

    def to(self, device: torch.device | str) -> "CAMResult":
        """A copy with every tensor moved to ``device``."""
        return CAMResult(
            raw=self.raw.to(device),
            logits=self.logits.to(device),
            class_idx=self.class_idx.to(device),
            outputs=self.outputs.to(device),
            method=self.method,
            target_layer=self.target_layer,
            input_size=self.input_size,
            batched_backward=self.batched_backward,
            activation_dtype=self.activation_dtype,
            geometry=self.geometry,
            _maps=None if self._maps is None else self._maps.to(device),
            _geometry_error=self._geometry_error,
        )

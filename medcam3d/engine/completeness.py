"""Is the faithfulness guarantee in force for this model? Check HiResCAM's completeness identity.

For a head that is linear in the target activation A (global-average-pool + FC, flatten + FC),
y_k(A) = <W_k, A> + b_k, so the signed HiResCAM map, summed over space, equals
<dy_k/dA, A> = y_k(A) - y_k(0). This module measures both sides: the map sum from one explainer
call, and y_k(0) from one extra no-grad forward with the target activation replaced by zeros.
A gap near zero means the map is an exact decomposition of the score; a large gap means the head
is non-linear in A (the map is then a first-order approximation, as all gradient maps are).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from medcam3d.engine.cam import BaseCAM
from medcam3d.engine.capture import replace_target
from medcam3d.engine.guard import frozen_eval
from medcam3d.engine.scores import ScoreSpec, resolve_score, scores_of
from medcam3d.engine.selection import ClassSpec


#: Default relative tolerance of :meth:`Completeness.holds` by the dtype the activation was computed
#: in. float32 sums of ~1e5 terms keep ~1e-6 relative error, 1e-4 leaves room for cancellation.
#: bfloat16 keeps 8 significant bits (unit roundoff 2^-8 ~ 3.9e-3) and float16 11 bits (2^-11 ~
#: 4.9e-4); the activation, the head's products and the score are each rounded once, so the gap can
#: reach a few units of roundoff: we allow ~8 units (3e-2 and 4e-3).
RTOL_BY_DTYPE: dict[torch.dtype, float] = {
    torch.float64: 1e-8,
    torch.float32: 1e-4,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


@dataclass
class Completeness:
    """Per sample and class (each (B, K)): the two sides of sum(raw) = y_k(A) - y_k(A=0)."""

    map_sum: torch.Tensor
    score: torch.Tensor
    score_at_zero: torch.Tensor
    class_idx: torch.Tensor
    dtype: torch.dtype = torch.float32

    @property
    def score_change(self) -> torch.Tensor:
        """y_k(A) - y_k(A=0): what the activation contributes to the score."""
        return self.score - self.score_at_zero

    @property
    def gap(self) -> torch.Tensor:
        """sum(raw) - (y_k(A) - y_k(0)); ~0 for HiResCAM on a head linear in A."""
        return self.map_sum - self.score_change

    @property
    def relative_gap(self) -> torch.Tensor:
        """|gap| / max(|y_k(A) - y_k(0)|, 1e-12)."""
        return self.gap.abs() / self.score_change.abs().clamp_min(1e-12)

    def holds(self, rtol: float | None = None) -> bool:
        """True when every relative gap is below ``rtol`` (None: :data:`RTOL_BY_DTYPE` for the dtype
        the activation was computed in, e.g. 1e-4 in float32, 3e-2 under bfloat16 autocast)."""
        tol = RTOL_BY_DTYPE.get(self.dtype, 1e-4) if rtol is None else rtol
        return bool((self.relative_gap <= tol).all())


def completeness_gap(
    cam: BaseCAM,
    x: torch.Tensor,
    class_idx: ClassSpec = None,
    *,
    score: ScoreSpec = None,
    forward_args: Sequence[Any] = (),
    forward_kwargs: Mapping[str, Any] | None = None,
) -> Completeness:
    """Compare the signed map sum with y_k(A) - y_k(A=0) for each sample and explained class.

    Costs one explainer call plus one no-grad forward with the target activation (the input, for
    Gradient x Input) zeroed. Works for every gradient method (the identity is HiResCAM's; see
    :mod:`medcam3d.engine.scores` for what it means for each score). Run it under the same autocast
    as the explanation; the default tolerance follows the activation's dtype.
    """
    kwargs = dict(forward_kwargs or {})
    result = cam(x, class_idx, score=score, forward_args=forward_args, forward_kwargs=kwargs)
    score_fn = resolve_score(score)
    with frozen_eval(cam.module), torch.no_grad():
        if cam.at_input:
            out = cam.module(torch.zeros_like(x), *forward_args, **kwargs)
        else:
            target = cam.target_for(x, forward_args, kwargs)
            with replace_target(target, x.ndim - 2, torch.zeros_like):
                out = cam.module(x, *forward_args, **kwargs)
        zeroed = scores_of(score_fn, out, x.shape[0]).float()
    spatial = tuple(range(2, result.raw.ndim))
    return Completeness(
        map_sum=result.raw.sum(dim=spatial),
        score=result.logits,
        score_at_zero=zeroed.gather(1, result.class_idx),
        class_idx=result.class_idx,
        dtype=result.activation_dtype or torch.float32,
    )

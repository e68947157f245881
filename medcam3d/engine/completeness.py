"""Is the faithfulness guarantee in force for this model? Check HiResCAM's completeness identity.

For a head that is linear in the target activation A (global-average-pool + FC, flatten + FC),
y_k(A) = <W_k, A> + b_k, so the signed HiResCAM map, summed over space, equals
<dy_k/dA, A> = y_k(A) - y_k(0). This module measures both sides: the map sum from one explainer
call, and y_k(0) from one extra no-grad forward with the target activation replaced by zeros.
A gap near zero means the map is an exact decomposition of the score; a large gap means the head
is non-linear in A (the map is then a first-order approximation, as all gradient maps are).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medcam3d.engine.cam import BaseCAM
from medcam3d.engine.capture import replace_target
from medcam3d.engine.guard import frozen_eval
from medcam3d.engine.selection import ClassSpec, check_output


@dataclass
class Completeness:
    """Per sample and class (each (B, K)): the two sides of sum(raw) = y_k(A) - y_k(A=0)."""

    map_sum: torch.Tensor
    score: torch.Tensor
    score_at_zero: torch.Tensor
    class_idx: torch.Tensor

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

    def holds(self, rtol: float = 1e-4) -> bool:
        """True when every relative gap is below ``rtol``."""
        return bool((self.relative_gap <= rtol).all())


def completeness_gap(cam: BaseCAM, x: torch.Tensor, class_idx: ClassSpec = None) -> Completeness:
    """Compare the signed map sum with y_k(A) - y_k(A=0) for each sample and explained class.

    Costs one explainer call plus one no-grad forward with the target activation zeroed.
    Works for Grad-CAM too (where the identity generally does not hold, except for a GAP head).
    """
    result = cam(x, class_idx)  # validates x
    target = cam.target_for(x)
    with frozen_eval(cam.model), torch.no_grad():
        with replace_target(target, x.ndim - 2, torch.zeros_like):
            zeroed = check_output(cam.model(x), x.shape[0]).float()
    spatial = tuple(range(2, result.raw.ndim))
    return Completeness(
        map_sum=result.raw.sum(dim=spatial),
        score=result.logits,
        score_at_zero=zeroed.gather(1, result.class_idx),
        class_idx=result.class_idx,
    )

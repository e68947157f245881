"""Where a class score comes from: the map's evidence versus the head's bias.

HiResCAM's signed feature map sums to the part of the score that the target layer's activations
explain: for a head that is linear in them (flatten/GAP + linear) sum(raw) = y_k(A) - y_k(A=0) =
logit - bias (Draelos & Carin 2020, "Use HiResCAM instead of Grad-CAM...", Sec. 3; checked here by
:func:`medcam3d.completeness_gap`). What is left, ``logit - sum(raw)``, is the bias' part. When every
cell's evidence is negative the ReLU'd map is all zero although the class may still be predicted
with high probability: the score then comes from the bias, and an empty map must say so instead of
opening as a blank image. For Grad-CAM the same split holds only at a GAP + linear head, where the
two methods coincide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from medcam3d.metrics._validate import as_map, map_range


@dataclass(frozen=True)
class EvidenceBalance:
    """One class of one explanation.

    Attributes:
        evidence_sum: sum of the signed feature-resolution map (evidence for minus against).
        positive_evidence: sum of its positive cells (what the ReLU'd map shows).
        bias_part: ``logit - evidence_sum``: the score not explained by the layer's activations.
        bias_share: ``bias_part / logit`` (NaN when the logit is 0): 1.0 = all of the score.
        no_positive_evidence: the map shown on the scan is all zero (nothing argues for the class).
    """

    evidence_sum: float
    positive_evidence: float
    bias_part: float
    bias_share: float
    no_positive_evidence: bool

    def flag(self) -> str | None:
        """``"no positive evidence (bias 98% of logit)"`` when the map is empty, else None."""
        if not self.no_positive_evidence:
            return None
        share = "n/a" if math.isnan(self.bias_share) else f"{self.bias_share:.0%}"
        return f"no positive evidence (bias {share} of logit)"


def evidence_balance(raw: Any, logit: float, shown_map: Any) -> EvidenceBalance:
    """Split one class score into map evidence and bias.

    Args:
        raw: the class's signed map before ReLU, any shape (``Explanation.raw[k]``), numpy or torch.
        logit: the explained raw score of that class.
        shown_map: the ReLU'd map as shown on the scan (``Explanation.maps[k]``); all <= 0 means
            "no positive evidence".

    Returns:
        :class:`EvidenceBalance` with plain Python numbers.
    """
    r = as_map(raw, "raw").astype(np.float64)
    _, shown_max = map_range(shown_map, "shown_map")  # only "any voxel > 0" is needed: no copy
    total = float(r.sum())
    logit = float(logit)
    bias = logit - total
    return EvidenceBalance(
        evidence_sum=total,
        positive_evidence=float(np.maximum(r, 0.0).sum()),
        bias_part=bias,
        bias_share=(bias / logit) if logit != 0.0 else float("nan"),
        no_positive_evidence=not shown_max > 0,
    )

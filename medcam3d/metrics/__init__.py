"""Localisation and faithfulness scores on maps + masks (any rank; numpy arrays or torch tensors).

- localisation: :func:`pointing_game`, :func:`mass_in_mask`, :func:`fraction_inside_allowed`,
  :func:`iou_at_threshold`
- faithfulness: :func:`deletion_auc`, :func:`insertion_auc` (-> :class:`PerturbationCurve`)
- sanity: :func:`spearman`, :func:`randomisation_sanity_check`
- evidence vs bias of a score: :func:`evidence_balance` (empty maps flagged)

Each function's docstring states its exact definition and edge cases. Bad input raises
:class:`medcam3d.errors.InputError`.
"""

from medcam3d.metrics.evidence import EvidenceBalance, evidence_balance
from medcam3d.metrics.localisation import (
    fraction_inside_allowed,
    iou_at_threshold,
    mass_in_mask,
    pointing_game,
)
from medcam3d.metrics.perturbation import PerturbationCurve, deletion_auc, gaussian_blur, insertion_auc
from medcam3d.metrics.rank import randomisation_sanity_check, rankdata, spearman

__all__ = [
    "EvidenceBalance",
    "evidence_balance",
    "PerturbationCurve",
    "deletion_auc",
    "fraction_inside_allowed",
    "gaussian_blur",
    "insertion_auc",
    "iou_at_threshold",
    "mass_in_mask",
    "pointing_game",
    "randomisation_sanity_check",
    "rankdata",
    "spearman",
]

"""AUROC by the rank statistic (Mann-Whitney U), without scikit-learn.

AUROC = P(score of a random positive > score of a random negative), ties counting one half,
= (sum of the positives' average ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg).
"""

from __future__ import annotations

import numpy as np

from medcam3d.errors import InputError
from medcam3d.metrics import rankdata


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1D, same length).

    Raises InputError when the lengths differ or only one class is present (AUROC undefined).
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise InputError(f"scores and labels must have the same length, got {s.size} and {y.size}")
    pos = y > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise InputError(f"AUROC needs both classes; got {n_pos} positive and {n_neg} negative labels")
    r = rankdata(s)
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def per_class_auroc(scores: np.ndarray, labels: np.ndarray, names: tuple[str, ...] | list[str]
                    ) -> dict[str, float]:
    """``{name: auroc(scores[:, k], labels[:, k])}`` for (N, K) arrays."""
    s, y = np.asarray(scores), np.asarray(labels)
    if s.ndim != 2 or s.shape != y.shape or s.shape[1] != len(names):
        raise InputError(f"scores and labels must both be (N, {len(names)}), got {s.shape} and {y.shape}")
    return {n: auroc(s[:, k], y[:, k]) for k, n in enumerate(names)}

"""Rank correlation, and the model-randomisation sanity check built on it (Adebayo et al., 2018).

The check: explain the trained model, re-initialise its weights (caller's job), explain again; a
map that still correlates strongly with the first one does not depend on what the model learned.
"""

from __future__ import annotations

import numpy as np

from medcam3d.errors import InputError
from medcam3d.metrics._validate import ArrayLike, as_map


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1D array; tied values share the average of their positions (float64)."""
    x = np.asarray(x).ravel()
    n = x.size
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new_group = np.empty(n, dtype=bool)
    new_group[:1] = True
    new_group[1:] = xs[1:] != xs[:-1]
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], n)  # exclusive
    avg = (starts + ends + 1) / 2.0  # mean of 1-based positions starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = avg[np.cumsum(new_group) - 1]
    return ranks


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman rank correlation of two same-shape arrays (flattened), ties as average ranks.

    Definition: the Pearson correlation of rankdata(a) and rankdata(b) (equals scipy.stats.spearmanr).
    NaN when either input is constant (its ranks have no variance). Needs at least 2 elements.
    """
    x, y = as_map(a, "a"), as_map(b, "b")
    if x.shape != y.shape:
        raise InputError(f"a and b must have the same shape, got {x.shape} and {y.shape}")
    if x.size < 2:
        raise InputError("spearman needs at least 2 elements per input")
    rx, ry = rankdata(x), rankdata(y)
    rx -= rx.mean()
    ry -= ry.mean()
    den = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    if den == 0.0:
        return float("nan")
    return float(np.clip((rx * ry).sum() / den, -1.0, 1.0))


def randomisation_sanity_check(map_trained: ArrayLike, map_random: ArrayLike, absolute: bool = False
                               ) -> float:
    """Spearman correlation between the map of the trained model and that of a randomised model.

    Low (near 0) is what a faithful method should give; near 1 means the map ignores the weights.
    ``absolute=True`` ranks |map| (Adebayo et al. report both). Maps must have the same shape.
    """
    x, y = as_map(map_trained, "map_trained"), as_map(map_random, "map_random")
    if x.shape != y.shape:
        raise InputError(f"map_trained and map_random must have the same shape, got {x.shape} and {y.shape}")
    if absolute:
        x, y = np.abs(x), np.abs(y)
    return spearman(x, y)

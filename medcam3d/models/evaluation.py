"""Score the demo models: AUROC on generated sets, map localisation/faithfulness, real-scan checks.

Shared by scripts/evaluate_demo_model.py, the notebooks and the tests, so every reported number
comes from one implementation. Synthetic cases are generated on the model's own grid, so maps are
compared with the exact lesion masks voxel for voxel (no resampling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from medcam3d.engine import make_cam
from medcam3d.errors import InputError
from medcam3d.metrics import deletion_auc, mass_in_mask, pointing_game
from medcam3d.metrics.peak import first_max_index
from medcam3d.models.auroc import per_class_auroc
from medcam3d.models.demo import CLASS_NAMES, HU_WINDOW, SPACING
from medcam3d.synthetic import make_dataset

#: Pointing-game tolerance used throughout the reports (two in-plane voxels of the model grid).
POINTING_TOLERANCE_MM = 10.0


@torch.no_grad()
def predict(model: nn.Module, n: int, seed: int, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid probabilities and labels, both (n, K), on ``n`` generated cases with base ``seed``."""
    ds = make_dataset(n, seed=seed, window=HU_WINDOW)
    model.eval()
    probs, labels = [], []
    for s in range(0, n, batch_size):
        items = [ds[i] for i in range(s, min(n, s + batch_size))]
        x = torch.stack([v for v, _, _ in items])
        probs.append(torch.sigmoid(model(x)).numpy())
        labels.append(torch.stack([y for _, y, _ in items]).numpy())
    return np.concatenate(probs), np.concatenate(labels)


def heldout_auroc(model: nn.Module, n: int, seed: int) -> dict[str, float]:
    """Per-class AUROC of ``model`` on ``n`` fresh generated cases (base seed ``seed``)."""
    probs, labels = predict(model, n, seed)
    return per_class_auroc(probs, labels, CLASS_NAMES)


@dataclass
class MapScore:
    """Scores of one map (one case, one positive class, one method)."""

    case: int
    class_name: str
    method: str
    pointing: bool
    mass_in_mask: float
    mask_share: float  # the mask's share of all voxels: what mass-in-mask a uniform map would get
    deletion_auc: float | None
    peak_distance_mm: float = float("nan")  # map peak to the nearest lesion voxel (0 = inside)


def score_case(model: nn.Module, x: torch.Tensor, masks: np.ndarray, layer: str, case: int = 0,
               methods: Sequence[str] = ("hirescam", "gradcam"), deletion_steps: int | None = 10
               ) -> list[MapScore]:
    """Maps of every class present in ``masks`` (K, *spatial) for each method, scored against its mask.

    ``x`` is the model input (1, 1, *spatial) on the masks' grid. Deletion AUC (blur baseline,
    sigmoid probability, ``deletion_steps`` steps) is skipped when ``deletion_steps`` is None.
    """
    if x.ndim != 5 or tuple(x.shape[2:]) != tuple(masks.shape[1:]):
        raise InputError(f"x must be (1, 1, *spatial) matching masks {masks.shape}, got {tuple(x.shape)}")
    present = [k for k in range(masks.shape[0]) if masks[k].any()]
    out: list[MapScore] = []
    if not present:
        return out
    for method in methods:
        res = make_cam(method, model, layer)(x, class_idx=present)
        for j, k in enumerate(present):
            m = res.maps[0, j].numpy()
            dele = None
            if deletion_steps:
                dele = deletion_auc(model, x[0], m, k, steps=deletion_steps,
                                    batch_size=deletion_steps + 1).auc
            out.append(MapScore(case, CLASS_NAMES[k], method,
                                pointing_game(m, masks[k], SPACING, POINTING_TOLERANCE_MM),
                                mass_in_mask(m, masks[k]), float(masks[k].mean()), dele,
                                peak_distance_mm(m, masks[k], np.diag([*SPACING, 1.0]))))
    return out


def score_heldout(model: nn.Module, layer: str, n: int, seed: int,
                  methods: Sequence[str] = ("hirescam", "gradcam"), deletion_steps: int | None = 10
                  ) -> list[MapScore]:
    """:func:`score_case` over ``n`` generated cases (base seed ``seed``), positives only."""
    ds = make_dataset(n, seed=seed, window=HU_WINDOW)
    rows: list[MapScore] = []
    for i in range(n):
        v, _, masks = ds[i]
        rows += score_case(model, v[None], masks.numpy().astype(bool), layer, i, methods, deletion_steps)
    return rows


def summarise(rows: Sequence[MapScore]) -> dict[str, dict[str, float]]:
    """Per method: pointing-game hit rate, mean mass-in-mask, mean mask share, mean deletion AUC,
    median peak-to-lesion distance (mm), n."""
    out: dict[str, dict[str, float]] = {}
    for method in sorted({r.method for r in rows}):
        rs = [r for r in rows if r.method == method]
        dels = [r.deletion_auc for r in rs if r.deletion_auc is not None]
        mims = [r.mass_in_mask for r in rs if not math.isnan(r.mass_in_mask)]
        out[method] = {
            "n_maps": len(rs),
            "pointing": float(np.mean([r.pointing for r in rs])),
            "mass_in_mask": float(np.mean(mims)) if mims else float("nan"),
            "mask_share": float(np.mean([r.mask_share for r in rs])),
            "deletion_auc": float(np.mean(dels)) if dels else float("nan"),
            "median_peak_distance_mm": float(np.median([r.peak_distance_mm for r in rs])),
        }
    return out


def peak_distance_mm(saliency: np.ndarray, mask: np.ndarray, affine: np.ndarray,
                     mask_affine: np.ndarray | None = None) -> float:
    """World distance (mm) from the map's peak voxel (first argmax) to the nearest mask voxel centre.

    ``affine`` maps the map's voxels to world mm; ``mask_affine`` the mask's, when its grid differs
    (default: the same grid).
    """
    s, m = np.asarray(saliency), np.asarray(mask) > 0
    if not m.any():
        raise InputError("mask is empty")
    p = np.array(first_max_index(s), dtype=np.float64)
    aff = np.asarray(affine, dtype=np.float64)
    maff = aff if mask_affine is None else np.asarray(mask_affine, dtype=np.float64)
    pw = aff[:3, :3] @ p + aff[:3, 3]
    q = np.argwhere(m).astype(np.float64) @ maff[:3, :3].T + maff[:3, 3]
    return float(np.sqrt(((q - pw) ** 2).sum(axis=1)).min())


def real_scan_report(model: nn.Module, ct_path: str, mask_path: str, layer: str | None = None,
                     methods: Sequence[str] = ("hirescam", "gradcam")) -> dict[str, Any]:
    """Explain a real CT with the demo preprocessing; compare each class's map with a tumour mask.

    Returns probabilities per class and, per method and class: pointing game (peak in the mask, and
    within :data:`POINTING_TOLERANCE_MM`), mass-in-mask, the mask's voxel share, and the peak's
    distance to the tumour in mm, all on the scan's own grid.
    """
    from medcam3d.io import load_volume
    from medcam3d.models.demo import demo_preprocess
    from medcam3d.spatial import explain_volume

    vol = load_volume(ct_path)
    mask = load_volume(mask_path)
    m = mask[0].numpy() > 0.5
    affine = np.asarray(vol.affine, dtype=np.float64)
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    report: dict[str, Any] = {"shape": tuple(vol.shape[1:]), "spacing_mm": spacing,
                              "tumour_voxels": int(m.sum()), "tumour_share": float(m.mean())}
    for method in methods:
        ex = explain_volume(model, vol, preprocess=demo_preprocess(), method=method, target_layer=layer,
                            class_idx="all", class_names=list(CLASS_NAMES))
        report["probabilities"] = {c: float(p) for c, p in zip(ex.class_names, ex.probabilities)}
        per = {}
        for j, c in enumerate(ex.class_names):
            s = ex.maps[j].numpy()
            per[c] = {"pointing_in_mask": pointing_game(s, m, spacing, 0.0),
                      "pointing_tol": pointing_game(s, m, spacing, POINTING_TOLERANCE_MM),
                      "mass_in_mask": mass_in_mask(s, m),
                      "peak_distance_mm": peak_distance_mm(s, m, affine)}
        report[method] = per
    return report

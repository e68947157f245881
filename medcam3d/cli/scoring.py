"""What each explained case's rows say beyond the files: peaks, empty-map flags, mask scores.

- every class: the map's peak in world RAS mm, and the evidence/bias split with the
  "no positive evidence" flag (:mod:`medcam3d.metrics.evidence`, the same record the NIfTI gets);
- with a mask (CSV ``mask`` column or a label file paired by name): pointing game within
  :data:`POINTING_TOLERANCE_MM`, mass-in-mask, Draelos' fraction inside the mask (threshold 0.5)
  and the peak's distance to the mask in mm (:mod:`medcam3d.metrics`);
- the one line per case the command prints, and the cohort summary next to the manifest (mean,
  median and a 95 % percentile-bootstrap interval of the mean, per class, method and score).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medcam3d.errors import InputError, VolumeLoadError

#: Pointing-game tolerance (mm): a peak this close to the mask counts as a hit.
POINTING_TOLERANCE_MM = 10.0
#: Same grid: affines may differ by at most this much (mm), as in medcam3d.spatial.inverse.
GRID_ATOL_MM = 1e-3
#: Extra manifest columns this module fills (lists have one entry per explained class).
COLUMNS = ("peak_mm", "flags", "evidence_sum", "bias_share", "pointing", "mass_in_mask",
           "inside_fraction", "peak_distance_mm")
SCORES = ("pointing", "mass_in_mask", "inside_fraction", "peak_distance_mm")
BOOTSTRAP_RESAMPLES = 2000


def _np(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        t = t.as_tensor() if hasattr(t, "as_tensor") else t
        return t.float().numpy()
    return np.asarray(t)


def refuse_label_image(volume: Any, path: Path) -> None:
    """Raise if a loaded "scan" is a label image (medcam3d.io.labels), so it is never explained.

    Raises:
        VolumeLoadError: naming the file, its values and what to do.
    """
    from medcam3d.io.labels import label_values

    values = label_values(volume)
    if values is not None:
        shown = ", ".join(str(int(v)) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise VolumeLoadError(
            f"{path} is a label image (only values {shown}; no HU range, no air), not a CT; it was "
            "not explained. Give it as the scan's mask (CSV 'mask' column) instead.")


def load_mask(path: Path, volume: Any) -> np.ndarray:
    """The case's mask as a boolean (X, Y, Z) array on the scan's grid (label > 0).

    Raises:
        InputError: the file is missing or unreadable, its grid (shape or affine) is not the scan's,
            The case then fails; nothing is explained. A mask that marks no voxel is valid (a case
            without the lesion): its scores are left undefined (None), not invented.
    """
    from medcam3d.io import load_volume

    if not Path(path).is_file():
        raise InputError(f"mask {str(path)!r} does not exist; fix the CSV 'mask' column")
    try:
        mask = load_volume(path)
    except Exception as exc:
        raise InputError(f"mask {str(path)!r} cannot be read: {exc}") from exc
    from medcam3d.io.labels import label_values

    if label_values(mask) is None:
        raise InputError(f"mask {str(path)!r} is not a label image (it has negative or non-integer "
                         "values, like a CT); give a mask with 0 = background and lesion labels > 0")
    m, v = _np(mask)[0], _np(volume)[0]
    if m.shape != v.shape:
        raise InputError(f"mask {str(path)!r} has shape {m.shape} but the scan {v.shape}; the mask must "
                         "be on the scan's voxel grid (resample it with nearest neighbour first)")
    ma, va = _np(mask.affine).astype(np.float64), _np(volume.affine).astype(np.float64)
    gap = float(np.abs(ma - va).max())
    if gap > GRID_ATOL_MM:
        raise InputError(f"mask {str(path)!r} has the scan's shape but another affine (differs by up to "
                         f"{gap:.3g} mm); it would score the wrong voxels. Save it on the scan's grid")
    return m > 0


def _peak_mm(m: np.ndarray, affine: np.ndarray) -> list[float]:
    from medcam3d.metrics.peak import first_max_index  # medcam3d.metrics imports torch: not at start-up

    ijk = first_max_index(m)
    return [round(float(v), 2) for v in (affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3])]


def _num(v: float | None, nd: int = 6) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), nd)


def class_extras(m: Any, affine: Any, mask: np.ndarray | None) -> dict[str, Any]:
    """One class's share of :data:`COLUMNS`: its peak (world mm), whether any voxel is positive, and
    with a mask its scores; ``m`` is the (X, Y, Z) map on the scan's grid (``affine``)."""
    from medcam3d.metrics import fraction_inside_allowed, mass_in_mask, pointing_game
    from medcam3d.models.evaluation import peak_distance_mm

    m = _np(m)
    affine = _np(affine).astype(np.float64)
    empty = not m.max() > 0  # a reduction, no boolean copy of a full-size map
    out: dict[str, Any] = {"peak_mm": None if empty else _peak_mm(m, affine), "positive": not empty}
    if mask is None:
        return out
    if not mask.any():  # no lesion in this case: no localisation score is defined
        return {**out, **{k: None for k in SCORES}}
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    out["pointing"] = None if empty else pointing_game(m, mask, spacing, POINTING_TOLERANCE_MM)
    out["mass_in_mask"] = _num(mass_in_mask(m, mask))
    out["inside_fraction"] = _num(fraction_inside_allowed(m, mask, 0.5))
    out["peak_distance_mm"] = None if empty else _num(peak_distance_mm(m, mask, affine), 2)
    return out


def row_extras(expl: Any, mask: np.ndarray | None, per_class: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The :data:`COLUMNS` values of one case and method (lists in class order; scores None without a mask).

    ``per_class``: the :func:`class_extras` of each class when already taken (a streamed
    Explanation, whose maps are not held); otherwise taken from ``expl.maps``.
    """
    from medcam3d.io.export import class_records

    if per_class is None:
        per_class = [class_extras(m, expl.maps.affine, mask) for m in _np(expl.maps)]
    else:
        expl.extra["scan_map_positive"] = [pc["positive"] for pc in per_class]
    records = class_records(expl, list(expl.class_names))
    out: dict[str, Any] = {
        "peak_mm": [pc["peak_mm"] for pc in per_class],
        "flags": [f"{r['name']}: {r['flag']}" for r in records if r.get("flag")],
        "evidence_sum": [_num(r.get("evidence_sum")) for r in records],
        "bias_share": [_num(r.get("bias_share"), 4) for r in records],
    }
    if mask is None:
        return {**out, **{k: None for k in SCORES}}
    return {**out, **{k: [pc[k] for pc in per_class] for k in SCORES}}


def case_line(case_id: str, rows: Sequence[dict[str, Any]], top: int = 3) -> str:
    """One line per case: the ``top`` most probable classes with their peak (first method), flags."""
    ok = [r for r in rows if r.get("status") in ("ok", "skipped") and r.get("class_names")]
    if not ok:
        return f"{case_id}: failed: {rows[0].get('error') if rows else 'no result'}"
    first = ok[0]
    names, probs = first["class_names"], first.get("probabilities") or []
    peaks = first.get("peak_mm") or [None] * len(names)
    order = sorted(range(len(names)), key=lambda i: -(probs[i] if i < len(probs) else 0.0))[:top]
    parts = []
    for i in order:
        where = "no peak" if peaks[i] is None else "peak ({:.0f}, {:.0f}, {:.0f}) mm".format(*peaks[i])
        hit = first.get("pointing")
        hit_txt = "" if not hit or hit[i] is None else (" in mask" if hit[i] else " off mask")
        parts.append(f"{names[i]} P={probs[i]:.3f} {where}{hit_txt}")
    flags = [f"{r['method']} {f}" for r in ok for f in (r.get("flags") or [])]
    return (f"{case_id} [{first['method']}]: " + "; ".join(parts)
            + (" | FLAGS: " + "; ".join(flags) if flags else ""))


def _bootstrap_ci(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the mean (Efron & Tibshirani 1993, ch. 13)."""
    if values.size < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(BOOTSTRAP_RESAMPLES, values.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def cohort_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method, class and score: n, mean, median, 95 % bootstrap CI of the mean (cases with a mask).

    Pointing counts as 1 (hit) / 0 (miss); an empty map's undefined scores are left out (n says how
    many cases each statistic uses).
    """
    groups: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        if r.get("status") not in ("ok", "skipped") or not r.get("class_names"):
            continue
        for score in SCORES:
            vals = r.get(score)
            if not vals:
                continue
            for name, v in zip(r["class_names"], vals):
                if v is not None:
                    groups.setdefault((r["method"], name, score), []).append(float(v))
    out = []
    for (method, name, score), vals in sorted(groups.items()):
        a = np.asarray(vals, dtype=np.float64)
        lo, hi = _bootstrap_ci(a)
        out.append({"method": method, "class": name, "score": score, "n": int(a.size),
                    "mean": round(float(a.mean()), 6), "median": round(float(np.median(a)), 6),
                    "ci95_low": _num(lo), "ci95_high": _num(hi)})
    return out


def write_cohort_summary(rows: Sequence[dict[str, Any]], out_dir: Path) -> Path | None:
    """Write ``summary.csv`` next to the manifest when any case was scored against a mask.

    A summary left from an earlier run without masks is removed, so it never describes other cases.
    """
    path = out_dir / "summary.csv"
    table = cohort_summary(rows)
    if not table:
        path.unlink(missing_ok=True)
        return None
    import io

    from medcam3d.cli.resume import atomic_write_text  # hidden temporary, removed on ENOSPC

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    atomic_write_text(path, buffer.getvalue())
    return path

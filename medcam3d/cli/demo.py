"""``medcam3d demo``: explain the bundled demo scan with the bundled trained demo model.

The scan (medcam3d.data) is a synthetic chest CT with a nodule, a pleural effusion and a
consolidation planted, shipped with their exact masks; the model (medcam3d.models, MONAI DenseNet
with a GAP head) was trained on such scans only. Because the masks are known, the demo can say how
far each class's map peak lies from its lesion, in world millimetres on the scan's own grid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BANNER = ("TRAINED DEMO MODEL on a SYNTHETIC chest CT (synthetic training data only, not for clinical "
          "use; model card: medcam3d/models/MODEL_CARD.md)")


@dataclass
class DemoAssets:
    """What the demo explains: a run config (dict), scans, a label to print, and lesion masks."""

    config: dict[str, Any]
    scans: list[Path]
    banner: str
    lesion_masks: dict[str, Path] = field(default_factory=dict)


def demo_assets() -> DemoAssets:
    """The demo's run config (shipped weights, absolute path) and the bundled scan with its masks."""
    from medcam3d.data import demo_scan_paths
    from medcam3d.models import CLASS_NAMES, demo_run_config

    paths = demo_scan_paths()
    return DemoAssets(config=demo_run_config(), scans=[paths["ct"]], banner=BANNER,
                      lesion_masks={c: paths[c] for c in CLASS_NAMES})


@dataclass
class PeakReport:
    """Where one map peaks relative to its lesion (world RAS mm)."""

    peak_mm: tuple[float, float, float]
    distance_mm: float  # from the peak voxel centre to the nearest lesion voxel centre
    inside: bool  # the peak voxel is a lesion voxel


def peak_vs_lesion(map_path: str | os.PathLike[str], mask_path: str | os.PathLike[str]) -> PeakReport:
    """Compare a map's brightest voxel with a binary lesion mask, both NIfTI, in world coordinates.

    The two files may have different grids: the peak is carried to world mm through the map's
    affine and compared with the mask voxels' world positions through the mask's affine.
    """
    import nibabel as nib
    import numpy as np

    from medcam3d.models.evaluation import peak_distance_mm

    img, msk = nib.load(str(map_path)), nib.load(str(mask_path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    m = np.asarray(msk.dataobj) > 0
    dist = peak_distance_mm(data, m, img.affine, msk.affine)
    peak = (img.affine @ np.array([*np.unravel_index(int(np.argmax(data)), data.shape), 1.0]))[:3]
    mijk = np.rint(np.linalg.solve(msk.affine, np.r_[peak, 1.0])[:3]).astype(int)
    inside = bool(all(0 <= v < n for v, n in zip(mijk, m.shape)) and m[tuple(mijk)])
    return PeakReport(tuple(float(v) for v in peak), dist, inside)  # type: ignore[arg-type]


def lesion_extent_mm(mask_path: str | os.PathLike[str]) -> tuple[int, list[float], list[float], list[float]]:
    """(voxels, centre of mass, lowest corner, highest corner) of a binary NIfTI mask, world RAS mm."""
    import nibabel as nib
    import numpy as np

    img = nib.load(str(mask_path))
    ijk = np.argwhere(np.asarray(img.dataobj) > 0).astype(np.float64)
    xyz = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    return len(ijk), xyz.mean(0).tolist(), xyz.min(0).tolist(), xyz.max(0).tolist()


def open_hint(assets: DemoAssets, rows: list[dict[str, Any]], out: Path) -> str:
    """Where the lesions are and the exact ``medcam3d view`` command for the HiResCAM maps written."""
    import shlex

    lines = ["Lesions planted in the demo scan (world RAS mm):"]
    for name, mask in assets.lesion_masks.items():
        n, c, lo, hi = lesion_extent_mm(mask)
        span = ", ".join(f"{a} {u:.0f}..{v:.0f}" for a, u, v in zip("xyz", lo, hi))
        lines.append(f"  {name}: {n} voxels, {span}; centre of mass ({c[0]:.1f}, {c[1]:.1f}, {c[2]:.1f}); "
                     f"mask {mask}")
    maps = [str(out / f) for r in rows if r.get("status") == "ok" and r.get("method") == "hirescam"
            for f in r.get("outputs") or [] if f.endswith(".nii.gz")]
    if maps:
        cmd = " ".join(shlex.quote(str(p)) for p in [assets.scans[0], *maps])
        lines.append(f"Open them with: medcam3d view {cmd}")
    return "\n".join(lines)

"""``medcam3d demo``: explain a bundled demo scan with a bundled model.

Default: a clearly labelled SYNTHETIC example, a deterministic synthetic chest CT with a planted
nodule (medcam3d.synthetic) and a fixed-weight "bright blob" detector (medcam3d.cli.demo_model)
whose maps land on the nodule. ``--trained``: the trained demo model (medcam3d.models, GAP head)
on the bundled demo scan (medcam3d.data). It classifies the planted findings well but its
last-layer maps do not localise them (docs/results.md), which is why it is not the default yet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEMO_SEED = 3
SYNTHETIC_BANNER = (
    "SYNTHETIC EXAMPLE (fixed-weight bright-blob detector on a synthetic chest CT; "
    "--trained runs the trained demo model)"
)
TRAINED_BANNER = (
    "TRAINED DEMO MODEL (synthetic training data only, not for clinical use; its maps are known "
    "not to localise the lesions well: see docs/results.md)"
)


@dataclass
class DemoAssets:
    """What the demo explains: a config (YAML path or dict), scans, and a label to print."""

    config: Path | dict[str, Any]
    scans: list[Path]
    banner: str | None
    nodule_mask: Path | None = None


def demo_assets(work_dir: str | os.PathLike[str], *, trained: bool = False) -> DemoAssets:
    """Create (in ``work_dir``) and return the demo's config and scan paths."""
    import torch

    if trained:
        from medcam3d.data import demo_scan_paths
        from medcam3d.models import demo_run_config

        paths = demo_scan_paths()
        return DemoAssets(config=demo_run_config(), scans=[paths["ct"]], banner=TRAINED_BANNER,
                          nodule_mask=paths["nodule"])

    from medcam3d.cli.demo_model import BrightBlobDetector
    from medcam3d.synthetic import make_chest_ct, write_case_nifti

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    case = make_chest_ct(DEMO_SEED, present={"nodule": True, "effusion": False, "consolidation": False})
    files = write_case_nifti(case, work, "synthetic_chest", overwrite=True)
    ckpt = work / "bright_blob_detector.pt"
    torch.save(BrightBlobDetector().state_dict(), ckpt)
    config = {
        "model": {
            "_target_": "medcam3d.cli.demo_model.BrightBlobDetector",
            "kwargs": {},
            "checkpoint": str(ckpt),
        },
        "preprocess": [
            {"name": "ScaleIntensityRange", "a_min": -1000, "a_max": 400, "b_min": 0.0, "b_max": 1.0,
             "clip": True},
        ],
        "methods": ["hirescam", "gradcam"],
        "target_layer": "features",
        "class_names": ["nodule"],
        "activation": "sigmoid",
        "output": {"four_d": False, "montage": True, "window": "lung"},
        "device": "cpu",
    }
    return DemoAssets(config=config, scans=[files["ct"]], banner=SYNTHETIC_BANNER,
                      nodule_mask=files["nodule"])


def peak_world_mm(nifti_path: str | os.PathLike[str]) -> tuple[float, float, float]:
    """World (RAS, mm) coordinates of the brightest voxel of a NIfTI map."""
    import nibabel as nib
    import numpy as np

    img = nib.load(str(nifti_path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    ijk = np.unravel_index(int(np.argmax(data)), data.shape)
    return tuple(float(v) for v in (img.affine @ np.array([*ijk, 1.0]))[:3])  # type: ignore[return-value]


def mask_centre_mm(nifti_path: str | os.PathLike[str]) -> tuple[float, float, float]:
    """World (RAS, mm) centroid of a binary NIfTI mask."""
    import nibabel as nib
    import numpy as np

    img = nib.load(str(nifti_path))
    ijk = np.argwhere(np.asarray(img.dataobj) > 0).mean(axis=0)
    return tuple(float(v) for v in (img.affine @ np.array([*ijk, 1.0]))[:3])  # type: ignore[return-value]

"""The bundled demo scan: one synthetic chest CT with all three abnormalities planted, plus masks.

Shipped as small NIfTI files (int16 HU CT, uint8 masks, RAS affine) so ``medcam3d demo``, the napari
plugin and the notebooks have a scan to open without generating one. It is reproducible exactly:
``python -m medcam3d.data`` rewrites the files from :data:`DEMO_SEED` with medcam3d.synthetic.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from medcam3d.errors import VolumeLoadError

#: Seed of the bundled scan (not a training or held-out seed of the demo model: those are hashed
#: from base seeds 1000 / 2000 / 3000 / 4242 by medcam3d.synthetic.case_seed).
DEMO_SEED = 3
DEMO_STEM = "demo"
DEMO_PRESENT = {"nodule": True, "effusion": True, "consolidation": True}


def data_dir() -> Path:
    """Folder of the bundled data inside the installed package."""
    return Path(str(resources.files("medcam3d.data")))


def demo_scan_paths() -> dict[str, Path]:
    """``{"ct": ..., "nodule": ..., "effusion": ..., "consolidation": ..., "labels": ...}`` paths.

    Raises VolumeLoadError when the package was installed without its data files.
    """
    from medcam3d.synthetic import CLASS_NAMES

    d = data_dir()
    paths = {"ct": d / f"{DEMO_STEM}_ct.nii.gz"}
    paths.update({c: d / f"{DEMO_STEM}_{c}.nii.gz" for c in CLASS_NAMES})
    paths["labels"] = d / f"{DEMO_STEM}_labels.json"
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise VolumeLoadError(f"bundled demo data missing: {missing}; reinstall medcam3d or run "
                              "`python -m medcam3d.data` to regenerate it")
    return paths


def write_demo_scan(out_dir: str | Path | None = None, overwrite: bool = False) -> dict[str, Path]:
    """(Re)generate the demo scan files (default: into the package folder)."""
    from medcam3d.synthetic import make_chest_ct, write_case_nifti

    case = make_chest_ct(DEMO_SEED, present=DEMO_PRESENT)
    return write_case_nifti(case, out_dir if out_dir is not None else data_dir(), DEMO_STEM,
                            overwrite=overwrite)


__all__ = ["DEMO_PRESENT", "DEMO_SEED", "DEMO_STEM", "data_dir", "demo_scan_paths", "write_demo_scan"]

"""Render docs/demo_montage.png: README's montage of the bundled demo scan with lesion outlines.

The bundled trained demo model (medcam3d.models, `gap`) explains the bundled synthetic chest CT
(medcam3d.data) with HiResCAM through the same calls a user makes (medcam3d.explain_volume with the
demo run config); each class's planted-lesion mask is outlined on its row (solid where the slice
crosses the lesion, dashed where it is projected from other slices).

Run with:  python scripts/make_readme_montage.py [out.png]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "demo_montage.png"


def main(out: Path = OUT) -> Path:
    import medcam3d
    from medcam3d.config import WINDOWS, load_run_config
    from medcam3d.data import demo_scan_paths
    from medcam3d.models import demo_run_config
    from medcam3d.report import save_montage

    cfg = load_run_config(demo_run_config())
    paths = demo_scan_paths()
    volume = medcam3d.load_volume(paths["ct"])
    (expl,) = medcam3d.explain_volume(cfg.model, volume, **{**cfg.explain_kwargs(), "methods": ["hirescam"]}).values()
    masks = {name: medcam3d.load_volume(paths[name])[0].numpy() > 0 for name in expl.class_names}
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_montage(volume, expl, out, WINDOWS["lung"].limits, title="demo_ct - hirescam", mask=masks)


if __name__ == "__main__":
    print(f"wrote {main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)}")

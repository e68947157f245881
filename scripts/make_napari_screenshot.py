"""Render docs/napari_overlay.png: README's napari screenshot with medcam3d's defaults.

The bundled trained demo model explains the bundled synthetic chest CT (HiResCAM, the real pipeline:
medcam3d.explain_volume with the demo run config) and medcam3d.view shows it with the planted
lesions' masks, in the mediastinum window (fluid grey, so additive heat shows): axial, radiological, fitted, sliders labelled by anatomy, masks drawn as outlines
over the heat. The effusion's heat and outline are shown.

Run headless with:  xvfb-run -a python scripts/make_napari_screenshot.py [out.png]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "napari_overlay.png"


def main(out: Path = OUT) -> Path:
    """The bundled demo scan, explained by the bundled demo model, with the planted lesions' masks, in
    napari with medcam3d's defaults (axial, radiological, fitted, sliders labelled by anatomy, masks
    as outlines over the heat). The whole window is captured, docks and slider included."""
    import napari
    from qtpy.QtWidgets import QApplication

    import medcam3d
    from medcam3d.config import load_run_config
    from medcam3d.data import demo_scan_paths
    from medcam3d.models import demo_run_config

    cfg = load_run_config(demo_run_config())
    paths = demo_scan_paths()
    volume = medcam3d.load_volume(paths["ct"])
    (expl,) = medcam3d.explain_volume(cfg.model, volume, **{**cfg.explain_kwargs(), "methods": ["hirescam"]}).values()
    viewer = napari.Viewer(title="medcam3d")
    viewer.window.resize(1300, 900)
    masks = {name: paths[name] for name in expl.class_names}
    medcam3d.view(volume, expl, masks=masks, viewer=viewer, window="mediastinum", opacity=0.8)
    for layer in viewer.layers:  # show the effusion: its heat and its outline
        if layer.name.startswith(("nodule", "consolidation")):
            layer.visible = False
    viewer.dims.set_point(2, -243.0)  # an axial slice through the effusion (world z, mm)
    QApplication.processEvents()
    viewer.reset_view()
    QApplication.processEvents()
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False, flash=False)
    viewer.close()
    return out


if __name__ == "__main__":
    path = main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
    print(f"wrote {path}")

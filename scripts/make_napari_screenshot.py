"""Render docs/napari_overlay.png: a real abdominal CT with a HiResCAM map on the liver, in napari.

The scan is tests/data/totalseg/example_ct_sm.nii.gz (TotalSegmentator test data, Apache-2.0). The
"model" is a deliberately simple, fully known network: its one feature channel is the scan's
soft-tissue signal times a smoothed liver prior (from example_seg_fast/liver.nii.gz), followed by
global average pooling and a linear layer. Its HiResCAM map is therefore high on the liver, and it is
computed by the real pipeline (medcam3d.explain_volume) and shown by medcam3d.view.

Run headless with:  xvfb-run -a python scripts/make_napari_screenshot.py [out.png]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "totalseg"
OUT = ROOT / "docs" / "napari_overlay.png"


class LiverPriorNet(nn.Module):
    """features = ReLU(soft-tissue window of x) * prior; logit = w * mean(features) + b."""

    def __init__(self, prior: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("prior", torch.as_tensor(prior, dtype=torch.float32)[None, None])
        self.features = nn.ReLU()
        self.fc = nn.Linear(1, 1)
        with torch.no_grad():
            self.fc.weight.fill_(4.0)
            self.fc.bias.fill_(-1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        soft = torch.clamp((x + 100.0) / 250.0, 0.0, 1.0)  # -100..150 HU -> 0..1
        a = self.features(soft * self.prior)
        return self.fc(a.flatten(2).mean(2))


def main(out: Path = OUT) -> Path:
    import napari
    from qtpy.QtWidgets import QApplication
    from scipy import ndimage

    import medcam3d

    volume = medcam3d.load_volume(DATA / "example_ct_sm.nii.gz")
    liver = medcam3d.load_volume(DATA / "example_seg_fast" / "liver.nii.gz").numpy()[0] > 0
    prior = ndimage.gaussian_filter(liver.astype(np.float32), sigma=3.0)
    model = LiverPriorNet(prior / prior.max()).eval()
    expl = medcam3d.explain_volume(model, volume, method="hirescam", target_layer="features", class_names=["liver"])

    viewer = napari.Viewer(title="medcam3d")
    viewer.window.resize(1300, 950)
    medcam3d.view(volume, expl, viewer=viewer, colormap="inferno", opacity=0.75, threshold=0.25)
    QApplication.processEvents()
    viewer.reset_view()
    viewer.scene.camera.zoom *= 0.95
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=True, flash=False)
    viewer.close()
    return out


if __name__ == "__main__":
    path = main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
    print(f"wrote {path}")

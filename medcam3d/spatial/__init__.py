"""medcam3d.spatial: invertible preprocessing and mapping maps back onto the scan's own grid.

Public API: :func:`explain_volume` (scan in, :class:`Explanation` on the scan's grid out),
:func:`build_preprocessing` (config or transforms -> checked Compose), :func:`model_input` (what the
model sees) and :func:`maps_to_volume` (model-grid maps -> scan grid, through MONAI's inverses); :func:`outside_scan_fraction` (map mass
the inverse cannot place because it lies outside the scan).
"""

from medcam3d.spatial.config import AboveThreshold
from medcam3d.spatial.coverage import outside_scan_fraction, scan_coverage
from medcam3d.spatial.explain import explain_volume
from medcam3d.explanation import Explanation
from medcam3d.spatial.inverse import maps_to_volume
from medcam3d.spatial.preprocess import build_preprocessing, model_input
from medcam3d.spatial.volume import as_volume

__all__ = [
    "AboveThreshold",
    "Explanation",
    "as_volume",
    "build_preprocessing",
    "explain_volume",
    "maps_to_volume",
    "model_input",
    "outside_scan_fraction",
    "scan_coverage",
]

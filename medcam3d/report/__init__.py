"""Human-readable reports of explanations (PNG montages)."""

from medcam3d.report.montage import save_montage

__all__ = ["save_montage"]

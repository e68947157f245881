"""Tiny models and builders for the CLI/config tests.

Models are referenced from configs as ``_target_: helpers_models.X``; the builders write small
NIfTI scans with known geometry, checkpoints and YAML configs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import yaml
from torch import nn


class TinyNet(nn.Module):
    """(B, C, X, Y, Z) -> (B, out_channels): conv -> ReLU -> global average pool -> linear."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2, width: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(in_channels, width, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(width, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def tiny_factory(out_channels: int = 2) -> TinyNet:
    """A factory function (not a class), as some users write them."""
    return TinyNet(out_channels=out_channels)


def not_a_model() -> str:
    return "nope"

PREPROCESS = [
    {"name": "ScaleIntensityRange", "a_min": -1000, "a_max": 400, "b_min": 0.0, "b_max": 1.0, "clip": True},
    {"name": "Resize", "spatial_size": [12, 12, 12]},
]
# anisotropic, non-RAS (x flipped), non-zero origin: outputs must carry exactly this affine
AFFINE = np.array(
    [[-2.0, 0.0, 0.0, 40.0], [0.0, 1.5, 0.0, -30.0], [0.0, 0.0, 3.0, -100.0], [0.0, 0.0, 0.0, 1.0]]
)


def write_scan(path: Path, shape: tuple[int, int, int] = (20, 18, 10), seed: int = 0) -> Path:
    """A small int16 HU volume with a bright sphere; returns the path."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(-800, 30, size=shape)
    idx = np.indices(shape)
    centre = np.array(shape) // 2 + seed % 3
    vol[((idx - centre[:, None, None, None]) ** 2).sum(0) <= 9] = 40
    img = nib.Nifti1Image(vol.astype(np.int16), AFFINE)
    img.set_qform(AFFINE, code=1)
    img.set_sform(AFFINE, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def write_mask(path: Path, shape: tuple[int, int, int], box: tuple[slice, slice, slice],
               affine: np.ndarray | None = None) -> Path:
    """A uint8 {0,1} mask with ``box`` set, on the scans' grid (``AFFINE``) unless told otherwise."""
    m = np.zeros(shape, np.uint8)
    m[box] = 1
    aff = AFFINE if affine is None else affine
    img = nib.Nifti1Image(m, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def write_checkpoint(path: Path, out_channels: int = 2, wrap: str | None = None) -> Path:
    torch.manual_seed(1)
    state = TinyNet(out_channels=out_channels).state_dict()
    if wrap == "module":
        state = {f"module.{k}": v for k, v in state.items()}
    obj: Any = {wrap: state, "epoch": 3} if wrap in ("state_dict", "model") else state
    torch.save(obj, path)
    return path


def config_dict(checkpoint: str | None = "tiny.pt", **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model": {"_target_": "helpers_models.TinyNet", "kwargs": {"in_channels": 1, "out_channels": 2},
                  "checkpoint": checkpoint},
        "preprocess": PREPROCESS,
        "methods": ["hirescam"],
        "target_layer": "features",
        "class_names": ["nodule", "effusion"],
        "activation": "sigmoid",
        "output": {"montage": False},
        "device": "cpu",
    }
    cfg.update(overrides)
    return cfg


def write_config(folder: Path, name: str = "run.yaml", **overrides: Any) -> Path:
    """YAML config + its checkpoint (tiny.pt, relative to the config) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "tiny.pt").exists():
        write_checkpoint(folder / "tiny.pt")
    path = folder / name
    path.write_text(yaml.safe_dump(config_dict(**overrides), sort_keys=False))
    return path


class BoxNet(nn.Module):
    """Known evidence: class 0 = (voxels in ``box``) / (all voxels) (evidence only inside the box, equal
    everywhere in it); class 1 = ``bias1`` - that score (all evidence negative: its HiResCAM map is
    empty and the logit comes from the bias). Input grid = feature grid (1x1x1 conv)."""

    def __init__(self, shape: list[int], box: list[list[int]], bias1: float = 2.0) -> None:
        super().__init__()
        self.features = nn.Conv3d(1, 1, 1)
        mask = torch.zeros(1, 1, *shape)
        mask[(0, 0, *[slice(a, b) for a, b in box])] = 1.0
        self.register_buffer("mask", mask)
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.features.weight.zero_()
            self.features.bias.fill_(1.0)
            self.head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.head.bias.copy_(torch.tensor([0.0, bias1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.features(x)) * self.mask
        return self.head(a.mean(dim=(2, 3, 4)).reshape(x.shape[0], 1))


class ClinicalNet(TinyNet):
    """TinyNet whose logits also take a per-case clinical vector: ``forward(x, clinical)``, with
    ``clinical`` (B, 2) added to the logits through a fixed linear map (logit_k += 2 * clinical[:, k])."""

    def forward(self, x: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        if clinical is None:
            raise TypeError("ClinicalNet.forward() needs the keyword input 'clinical'")
        return super().forward(x) + 2.0 * clinical.to(x.dtype)


def run_explain(*argv: Any) -> int:
    """``medcam3d explain ARGV...`` in this process; the exit code."""
    from medcam3d.cli.main import main

    return main(["explain", *map(str, argv)])


def read_manifest(out: Path) -> list[dict]:
    """The rows of ``out/manifest.csv`` as dicts of strings."""
    import csv

    with open(out / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))

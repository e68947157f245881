"""The shipped demo model: weights load safely, it classifies fresh generated scans, and its
HiResCAM maps land on the planted lesions of the bundled demo scan (checked in world mm)."""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest
import torch

import medcam3d
from medcam3d.data import DEMO_SEED, demo_scan_paths, write_demo_scan
from medcam3d.errors import ConfigError, ExportError, InputError, VolumeLoadError
from medcam3d.metrics import mass_in_mask, pointing_game
from medcam3d.models import (
    CELL_HALF_DIAGONAL_MM,
    CLASS_NAMES,
    HU_WINDOW,
    KINDS,
    TARGET_LAYERS,
    auroc,
    build_demo_model,
    demo_preprocess,
    load_demo_model,
    per_class_auroc,
    weights_path,
)
from medcam3d.models.evaluation import heldout_auroc

#: Fresh held-out base seed (training uses 1000, its validation 2000, the evaluation script 3000).
TEST_SEED = 4242


@pytest.fixture(scope="module")
def gap_model() -> torch.nn.Module:
    return load_demo_model("gap")


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_weights_are_small_and_load_with_weights_only(kind: str) -> None:
    path = weights_path(kind)
    assert path.stat().st_size <= 5 * 1024 * 1024
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = build_demo_model(kind)
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state, strict=True)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.fixture(scope="module")
def fresh_aurocs(gap_model: torch.nn.Module) -> dict[str, float]:
    # n=100: with 40 cases (about 20 nodules) the AUROC's standard error is ~0.04, too noisy for a 0.9 bar
    return heldout_auroc(gap_model, n=100, seed=TEST_SEED)


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_gap_model_auroc_on_fresh_heldout_set(fresh_aurocs: dict[str, float], name: str) -> None:
    assert set(fresh_aurocs) == set(CLASS_NAMES)
    value = fresh_aurocs[name]
    assert value >= 0.9, f"{name}: AUROC {value:.3f} < 0.9 on 100 fresh cases (seed {TEST_SEED})"


def _world(ijk: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def test_hirescam_maps_land_on_each_planted_lesion_in_world_mm(gap_model: torch.nn.Module) -> None:
    paths = demo_scan_paths()
    vol = medcam3d.load_volume(paths["ct"])
    ex = medcam3d.explain_volume(gap_model, vol, preprocess=demo_preprocess(), method="hirescam",
                                 target_layer=TARGET_LAYERS["gap"], class_idx="all",
                                 class_names=list(CLASS_NAMES))
    assert list(ex.class_names) == list(CLASS_NAMES)
    assert (ex.probabilities > 0.5).all(), ex.probabilities  # every class is present in the scan
    for j, name in enumerate(CLASS_NAMES):
        img = nib.load(str(paths[name]))
        mask = np.asarray(img.dataobj) > 0
        np.testing.assert_allclose(np.asarray(ex.maps.affine), img.affine, atol=1e-4)
        s = ex.maps[j].numpy()
        spacing = np.linalg.norm(img.affine[:3, :3], axis=0)
        # the map's positive mass is concentrated on the lesion: many times a uniform map's share
        assert mass_in_mask(s, mask) >= 5 * mask.mean(), name
        # the peak lies within the lesion's feature cell: at most half a cell diagonal (37 mm) from it in
        # world mm; the last layer has 40 x 40 x 48 mm cells, and the upsampled peak sits at a cell centre
        peak = np.array(np.unravel_index(int(np.argmax(s)), s.shape), dtype=float)
        d = np.sqrt(((_world(np.argwhere(mask).astype(float), img.affine)
                      - _world(peak[None], img.affine)) ** 2).sum(1)).min()
        assert d <= CELL_HALF_DIAGONAL_MM, f"{name}: peak {d:.1f} mm from the lesion"
        assert pointing_game(s, mask, spacing, CELL_HALF_DIAGONAL_MM)


def test_hottest_feature_cell_holds_the_lesion(gap_model: torch.nn.Module) -> None:
    # cell-level truth with no upsampling involved: on the bundled scan (already on the model grid)
    # the raw last-layer map's largest cell contains voxels of each planted lesion
    paths = demo_scan_paths()
    ct = np.asarray(nib.load(str(paths["ct"])).dataobj).astype(np.float32)
    x = torch.from_numpy(np.clip((ct - HU_WINDOW[0]) / (HU_WINDOW[1] - HU_WINDOW[0]), 0, 1))[None, None]
    raw = medcam3d.HiResCAM(gap_model, TARGET_LAYERS["gap"])(x, class_idx="all").raw[0]
    stride = np.array(ct.shape) // np.array(raw.shape[1:])
    assert tuple(stride) == (8, 8, 8)
    for k, name in enumerate(CLASS_NAMES):
        mask = np.asarray(nib.load(str(paths[name])).dataobj) > 0
        cell = np.array(np.unravel_index(int(raw[k].argmax()), raw.shape[1:]))
        box = tuple(slice(c * s, (c + 1) * s) for c, s in zip(cell, stride))
        assert mask[box].any(), f"{name}: hottest cell {cell} holds no lesion voxel"


def test_auroc_hand_computed_values() -> None:
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered correctly
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)  # a tie counts 1/2
    assert auroc(np.array([3.0, 1.0]), np.array([0, 1])) == 0.0
    got = per_class_auroc(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([[1, 0], [0, 1]]), ("a", "b"))
    assert got == {"a": 1.0, "b": 1.0}


def test_auroc_bad_input() -> None:
    with pytest.raises(InputError, match="needs both classes"):
        auroc(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(InputError, match="same length"):
        auroc(np.array([0.1, 0.2, 0.3]), np.array([0, 1]))
    with pytest.raises(InputError, match=r"must both be \(N, 2\)"):
        per_class_auroc(np.zeros((3, 3)), np.zeros((3, 3)), ("a", "b"))


def test_load_demo_model_bad_input(tmp_path) -> None:
    with pytest.raises(InputError, match="kind must be one of gap, flatten, axialnet; got 'densenet'"):
        load_demo_model("densenet")
    with pytest.raises(ConfigError, match="weights not found"):
        load_demo_model("gap", weights=tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="do not fit the 'flatten' demo model"):
        load_demo_model("flatten", weights=weights_path("gap"))
    assert list(tmp_path.iterdir()) == []


def test_bundled_scan_is_the_documented_seed_and_regenerates_exactly(tmp_path) -> None:
    paths = demo_scan_paths()
    fresh = write_demo_scan(tmp_path)
    for key in ("ct", *CLASS_NAMES):
        shipped, again = nib.load(str(paths[key])), nib.load(str(fresh[key]))
        np.testing.assert_array_equal(np.asarray(shipped.dataobj), np.asarray(again.dataobj))
        np.testing.assert_array_equal(shipped.affine, again.affine)
    for name in CLASS_NAMES:  # all three abnormalities are planted
        assert np.asarray(nib.load(str(paths[name])).dataobj).any()
    assert f'"seed": {DEMO_SEED}' in paths["labels"].read_text()


def test_write_demo_scan_refuses_to_overwrite(tmp_path) -> None:
    first = write_demo_scan(tmp_path)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in first.values()}
    with pytest.raises(ExportError, match="refusing to overwrite"):
        write_demo_scan(tmp_path)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in first.values()} == before
    assert sorted(tmp_path.iterdir()) == sorted(first.values())


def test_demo_scan_paths_missing_data(monkeypatch, tmp_path) -> None:
    import medcam3d.data as data

    monkeypatch.setattr(data, "data_dir", lambda: tmp_path)
    with pytest.raises(VolumeLoadError, match="bundled demo data missing"):
        data.demo_scan_paths()
    assert list(tmp_path.iterdir()) == []


def test_sample_demo_config_uses_the_shipped_model() -> None:
    from pathlib import Path

    from medcam3d.config import load_run_config

    cfg_path = Path(__file__).resolve().parents[1] / "sample_configs" / "demo.yaml"
    cfg = load_run_config(cfg_path)
    shipped = load_demo_model("gap").state_dict()
    for k, v in cfg.model.state_dict().items():
        assert torch.equal(v, shipped[k]), k
    assert list(cfg.class_names) == list(CLASS_NAMES)

"""Console entry point, argument parsing, ``view`` without napari, case ids, and the demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers_models import write_scan
from medcam3d.cli import main as cli_main
from medcam3d.cli.inputs import collect_cases, sanitize_case_id
from medcam3d.cli.main import build_parser, main, parse_window
from medcam3d.errors import ConfigError


def test_python_m_help():
    proc = subprocess.run([sys.executable, "-m", "medcam3d", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0
    assert "explain" in proc.stdout and "view" in proc.stdout and "demo" in proc.stdout


def test_usage_error_exit_2(capsys):
    assert main(["explain", "--config", "x.yaml"]) == 2
    assert "required" in capsys.readouterr().err
    assert main([]) == 2


def test_explain_arguments_parse():
    args = build_parser().parse_args(["explain", "--config", "c.yaml", "--input", "a.nii.gz", "b",
                                      "--output", "o", "--workers", "3", "--device", "cuda:1", "--amp",
                                      "--manifest", "both"])
    assert args.inputs == ["a.nii.gz", "b"] and args.workers == 3 and args.device == "cuda:1"
    assert args.amp and args.manifest == "both" and not args.overwrite


def test_view_arguments_and_windows():
    args = build_parser().parse_args(["view", "scan.nii.gz", "m1.nii.gz", "m2.nii.gz", "--window=-600,1500"])
    assert args.scan == "scan.nii.gz" and args.maps == ["m1.nii.gz", "m2.nii.gz"]
    assert parse_window(args.window) == (-600.0, 1500.0) == parse_window("lung")
    with pytest.raises(ConfigError, match="--window: expected one of lung"):
        parse_window("lungs")


def test_view_without_napari_is_a_clear_message(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "napari", None)  # import napari -> ImportError
    scan = write_scan(tmp_path / "s.nii.gz")
    assert main(["view", str(scan)]) == 2
    err = capsys.readouterr().err
    assert "napari is not installed" in err and "pip install 'medcam3d-hirescam[napari]'" in err
    assert "Traceback" not in err


def test_case_ids_are_sanitised_and_unique(tmp_path):
    assert sanitize_case_id("../../etc/passwd") == "etc_passwd"
    assert sanitize_case_id("..") == "case" and sanitize_case_id("a..b c") == "a_b_c"
    a = write_scan(tmp_path / "x" / "scan.nii.gz")
    b = write_scan(tmp_path / "y" / "scan.nii.gz")
    c = write_scan(tmp_path / "y" / "Scan.nii")
    ids = [case.case_id for case in collect_cases([a, b, c, a])]
    assert ids == ["scan", "scan-2", "Scan-3"]  # the repeated path is one case; ids differ ignoring case


def test_demo_maps_land_on_each_planted_lesion(tmp_path, capsys):
    from medcam3d.data import demo_scan_paths
    from medcam3d.models import CELL_HALF_DIAGONAL_MM, CLASS_NAMES

    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "TRAINED DEMO MODEL on a SYNTHETIC chest CT" in text and str(out) in text
    paths = demo_scan_paths()
    scan = nib.load(str(paths["ct"]))
    for method in ("hirescam", "gradcam"):
        maps = sorted(out.glob(f"*/*_{method}_*.nii.gz"))
        assert {m.name.split(f"_{method}_")[1] for m in maps} == {f"{c}.nii.gz" for c in CLASS_NAMES}
        assert (maps[0].parent / f"{maps[0].parent.name}_{method}_montage.png").exists()
    for name in CLASS_NAMES:
        img = nib.load(str(next(out.glob(f"*/*_hirescam_{name}.nii.gz"))))
        assert img.shape == scan.shape and np.allclose(img.affine, scan.affine, atol=1e-4)
        data = np.asarray(img.dataobj, dtype=np.float64)
        mask = nib.load(str(paths[name]))
        m = np.asarray(mask.dataobj) > 0
        # the peak, carried to world mm through the map's affine, vs the lesion voxels' world positions
        peak = img.affine @ np.array([*np.unravel_index(int(np.argmax(data)), data.shape), 1.0])
        lesion = np.argwhere(m) @ mask.affine[:3, :3].T + mask.affine[:3, 3]
        dist = np.sqrt(((lesion - peak[:3]) ** 2).sum(axis=1)).min()
        # within the lesion's feature cell (40 x 40 x 48 mm cells: half a diagonal is 37 mm)
        assert dist <= CELL_HALF_DIAGONAL_MM, f"{name}: HiResCAM peak {dist:.1f} mm from the lesion"
        # and the map's mass is concentrated on the lesion, many times a uniform map's share
        assert data[m].sum() / data.sum() >= 5 * m.mean(), name
        assert f"    {name}: map peak at" in text


def test_demo_assets_are_the_shipped_model_and_bundled_scan():
    from medcam3d.cli.demo import demo_assets
    from medcam3d.models import CLASS_NAMES, weights_path

    assets = demo_assets()
    assert assets.scans[0].is_file() and Path(assets.config["model"]["checkpoint"]) == weights_path("gap")
    assert set(assets.lesion_masks) == set(CLASS_NAMES)
    assert all(p.is_file() for p in assets.lesion_masks.values())


def test_peak_vs_lesion_in_world_mm_across_grids(tmp_path):
    from medcam3d.cli.demo import peak_vs_lesion

    # map on a 2 mm grid shifted by (10, 0, 0) mm; mask on a 1 mm grid
    map_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    map_aff[:3, 3] = (10.0, 0.0, 0.0)
    data = np.zeros((10, 10, 10), np.float32)
    data[3, 4, 5] = 1.0  # world (16, 8, 10)
    nib.save(nib.Nifti1Image(data, map_aff), str(tmp_path / "map.nii.gz"))
    mask = np.zeros((30, 30, 30), np.uint8)
    mask[16, 8, 10] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(tmp_path / "in.nii.gz"))
    rep = peak_vs_lesion(tmp_path / "map.nii.gz", tmp_path / "in.nii.gz")
    assert rep.inside and rep.distance_mm == 0.0 and rep.peak_mm == (16.0, 8.0, 10.0)
    mask[:] = 0
    mask[16, 8, 22] = 1  # 12 mm away along z
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(tmp_path / "out.nii.gz"))
    rep = peak_vs_lesion(tmp_path / "map.nii.gz", tmp_path / "out.nii.gz")
    assert not rep.inside and rep.distance_mm == pytest.approx(12.0)

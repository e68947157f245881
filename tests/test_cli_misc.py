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
                                      "--manifest", "both", "--batch-size", "4"])
    assert args.inputs == ["a.nii.gz", "b"] and args.workers == 3 and args.device == "cuda:1"
    assert args.amp and args.manifest == "both" and args.batch_size == 4 and not args.overwrite


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
    assert "napari is not installed" in err and "pip install 'medcam3d[napari]'" in err
    assert "Traceback" not in err


def test_case_ids_are_sanitised_and_unique(tmp_path):
    assert sanitize_case_id("../../etc/passwd") == "etc_passwd"
    assert sanitize_case_id("..") == "case" and sanitize_case_id("a..b c") == "a_b_c"
    a = write_scan(tmp_path / "x" / "scan.nii.gz")
    b = write_scan(tmp_path / "y" / "scan.nii.gz")
    c = write_scan(tmp_path / "y" / "Scan.nii")
    ids = [case.case_id for case in collect_cases([a, b, c, a])]
    assert ids == ["scan", "scan-2", "Scan-3"]  # the repeated path is one case; ids differ ignoring case


def test_demo_map_lands_on_planted_nodule(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "SYNTHETIC EXAMPLE (fixed-weight bright-blob detector" in text
    maps = sorted(out.glob("*/*_hirescam_nodule.nii.gz"))
    assert len(maps) == 1 and (maps[0].parent / f"{maps[0].parent.name}_hirescam_montage.png").exists()
    img = nib.load(str(maps[0]))
    mask = nib.load(str(next(out.glob("demo_input/*_nodule.nii.gz"))))
    data = np.asarray(img.dataobj)
    peak = img.affine @ np.array([*np.unravel_index(int(np.argmax(data)), data.shape), 1.0])
    # the peak's world position falls in a nodule voxel of the mask (looked up through the mask's affine)
    ijk = np.rint(np.linalg.inv(mask.affine) @ peak).astype(int)[:3]
    assert np.asarray(mask.dataobj)[tuple(ijk)] == 1
    inside = data[np.asarray(mask.dataobj) > 0].sum() / data.sum()
    assert inside > 0.5  # most of the map's mass is on the nodule
    assert "mm apart" in text and str(out) in text


def test_demo_assets_is_the_single_swap_point(tmp_path):
    from medcam3d.cli.demo import demo_assets

    assets = demo_assets(tmp_path)
    assert assets.scans[0].exists() and assets.config["model"]["checkpoint"]
    assert cli_main is not None


def test_demo_trained_runs_the_shipped_model_on_the_bundled_scan(tmp_path, capsys):
    from medcam3d.data import demo_scan_paths

    out = tmp_path / "demo"
    assert main(["demo", "--trained", "--output", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "TRAINED DEMO MODEL" in text and "docs/results.md" in text
    maps = sorted(out.glob("*/*_hirescam_*.nii.gz"))
    assert {m.name.split("_hirescam_")[1] for m in maps} == {
        "nodule.nii.gz", "effusion.nii.gz", "consolidation.nii.gz"}
    scan = nib.load(str(demo_scan_paths()["ct"]))
    for m in maps:
        img = nib.load(str(m))
        assert img.shape == scan.shape
        assert np.allclose(img.affine, scan.affine, atol=1e-4)

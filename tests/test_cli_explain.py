"""``medcam3d explain`` end to end (in-process via main(argv)) on tiny models and small scans."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from helpers_models import (
    AFFINE,
    read_manifest as _manifest,
    run_explain as _run,
    write_config,
    write_mask,
    write_scan,
)
from medcam3d.cli.inputs import collect_cases

DICOM_DIR = Path(__file__).parent / "data" / "totalseg" / "example_ct_dicom"


@pytest.fixture()
def cohort(tmp_path):
    cfg = write_config(tmp_path / "cfg")
    scans = [write_scan(tmp_path / "in" / f"scan{i}.nii.gz", seed=i) for i in range(3)]
    return cfg, scans, tmp_path / "out"


def test_nifti_cases_write_maps_on_source_grid_and_manifest(cohort, capsys):
    cfg, scans, out = cohort
    assert _run("--config", cfg, "--input", *scans, "--output", out, "--quiet", "--manifest", "both") == 0
    rows = _manifest(out)
    assert [r["case_id"] for r in rows] == ["scan0", "scan1", "scan2"]
    assert {r["status"] for r in rows} == {"ok"} and {r["target_layer"] for r in rows} == {"features"}
    for row, scan in zip(rows, scans):
        files = row["outputs"].split(";")
        assert [Path(f).name for f in files] == [
            f"{row['case_id']}_hirescam_nodule.nii.gz", f"{row['case_id']}_hirescam_effusion.nii.gz"]
        src = nib.load(str(scan))
        for f in files:
            img = nib.load(str(out / f))
            assert img.shape == src.shape and img.get_data_dtype() == np.uint16  # the default storage
            np.testing.assert_allclose(img.affine, AFFINE, atol=1e-5)
        probs = [float(p) for p in row["probabilities"].split(";")]
        logits = [float(v) for v in row["logits"].split(";")]
        np.testing.assert_allclose(probs, 1 / (1 + np.exp(-np.array(logits))), atol=1e-5)
    jsonl = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in jsonl] == ["scan0", "scan1", "scan2"]
    assert "3 done, 0 skipped, 0 failed" in capsys.readouterr().out
    assert not list(out.glob("manifest.rank*"))


def test_resume_skips_then_changed_config_reruns_and_overwrite(cohort, tmp_path):
    cfg, scans, out = cohort
    assert _run("--config", cfg, "--input", *scans, "--output", out, "--quiet") == 0
    first = out / "scan0" / "scan0_hirescam_nodule.nii.gz"
    stamp = first.stat().st_mtime_ns
    assert _run("--config", cfg, "--input", *scans, "--output", out, "--quiet") == 0
    rows = _manifest(out)
    assert {r["status"] for r in rows} == {"skipped"} and len(rows) == 3
    assert rows[0]["outputs"] and rows[0]["probabilities"]  # carried over from the marker
    assert first.stat().st_mtime_ns == stamp
    # a changed config (other methods) re-runs every case, and removes the stale files
    cfg2 = write_config(tmp_path / "cfg", name="run2.yaml", methods=["gradcam"])
    assert _run("--config", cfg2, "--input", *scans, "--output", out, "--quiet") == 0
    assert {r["status"] for r in _manifest(out)} == {"ok"}
    assert not first.exists() and (out / "scan0" / "scan0_gradcam_nodule.nii.gz").exists()
    # --overwrite redoes finished cases
    stamp = (out / "scan0" / "scan0_gradcam_nodule.nii.gz").stat().st_mtime_ns
    assert _run("--config", cfg2, "--input", *scans, "--output", out, "--quiet", "--overwrite") == 0
    assert {r["status"] for r in _manifest(out)} == {"ok"}
    assert (out / "scan0" / "scan0_gradcam_nodule.nii.gz").stat().st_mtime_ns != stamp


def test_missing_output_file_reruns_that_case(cohort):
    cfg, scans, out = cohort
    assert _run("--config", cfg, "--input", *scans, "--output", out, "--quiet") == 0
    (out / "scan1" / "scan1_hirescam_effusion.nii.gz").unlink()
    assert _run("--config", cfg, "--input", *scans, "--output", out, "--quiet") == 0
    assert [r["status"] for r in _manifest(out)] == ["skipped", "ok", "skipped"]


def test_failing_case_among_good_ones(cohort, tmp_path, capsys):
    cfg, scans, out = cohort
    bad = tmp_path / "in" / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b this is not a gzip stream")
    assert _run("--config", cfg, "--input", scans[0], bad, scans[1], "--output", out, "--quiet") == 1
    rows = _manifest(out)
    assert [r["case_id"] for r in rows] == ["scan0", "broken", "scan1"]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert rows[1]["error"].startswith("VolumeLoadError:") and "broken.nii.gz" in rows[1]["error"]
    assert not (out / "broken").exists()  # nothing written for the failed case
    assert "2 done, 0 skipped, 1 failed" in capsys.readouterr().out
    # the failed case is retried on the next run; finished ones are skipped
    assert _run("--config", cfg, "--input", scans[0], bad, scans[1], "--output", out, "--quiet") == 1
    assert [r["status"] for r in _manifest(out)] == ["skipped", "failed", "skipped"]


def test_folder_csv_and_workers(tmp_path):
    cfg = write_config(tmp_path / "cfg", methods=["hirescam", "gradcam"], output={"montage": True, "four_d": True})
    folder = tmp_path / "in"
    write_scan(folder / "a.nii.gz", seed=0)
    write_scan(folder / "b.nii", seed=1)
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    assert _run("--config", cfg, "--input", folder, "--output", out, "--quiet", "--workers", "2") == 0
    rows = _manifest(out)
    assert [(r["case_id"], r["method"]) for r in rows] == [
        ("a", "hirescam"), ("a", "gradcam"), ("b", "hirescam"), ("b", "gradcam")]
    assert (out / "a" / "a_gradcam_all-classes.nii.gz").exists()
    assert nib.load(str(out / "a" / "a_gradcam_all-classes.nii.gz")).shape == (20, 18, 10, 2)
    png = out / "b" / "b_hirescam_montage.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # CSV input: relative paths, case ids and masks from the CSV (ids sanitised, duplicates suffixed)
    table = tmp_path / "cases.csv"
    write_mask(tmp_path / "masks" / "b_mask.nii.gz", (20, 18, 10), (slice(8, 13), slice(7, 12), slice(3, 8)))
    table.write_text("path,case_id,mask\nin/a.nii.gz,../evil id,\nin/b.nii,../evil id,masks/b_mask.nii.gz\n")
    out2 = tmp_path / "out2"
    assert _run("--config", cfg, "--input", table, "--output", out2, "--quiet", "--manifest", "jsonl") == 0
    rows = [json.loads(line) for line in (out2 / "manifest.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in rows][::2] == ["evil_id", "evil_id-2"]
    assert rows[2]["mask"] == str(tmp_path / "masks" / "b_mask.nii.gz")
    assert sorted(p.name for p in out2.iterdir()) == [".medcam3d.lock", "evil_id", "evil_id-2",
                                                      "manifest.jsonl", "summary.csv"]


def test_dicom_folder_and_identifiers(tmp_path):
    cfg = write_config(tmp_path / "cfg")
    series = tmp_path / "Doe_series"
    series.mkdir()
    for f in sorted(DICOM_DIR.iterdir()):  # add a patient name/id the output must not carry
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID = "Doe^Jane", "PID 12345"
        ds.save_as(series / f.name)
    out = tmp_path / "out"
    assert _run("--config", cfg, "--input", series, "--output", out, "--quiet") == 0
    row = _manifest(out)[0]
    assert row["case_id"] == "Doe_series" and row["status"] == "ok"
    img = nib.load(str(out / row["outputs"].split(";")[0]))
    assert img.shape == (512, 512, 20)
    assert "PID" not in img.header["descrip"].tobytes().decode(errors="ignore")
    assert collect_cases([series], keep_identifiers=True)[0].case_id == "PID_12345"  # only if asked


def test_config_error_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg", model={"_target_": "helpers_models.TinyNet",
                                                 "kwargs": {"out_channels": "two"}, "checkpoint": "tiny.pt"})
    scan = write_scan(tmp_path / "in" / "s.nii.gz")
    out = tmp_path / "out"
    assert _run("--config", cfg, "--input", scan, "--output", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medcam3d explain: error: model.kwargs.out_channels: expected an integer, got 'two'")
    assert "\n" not in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("problem", ["missing_input", "output_is_input", "output_in_dicom", "csv_no_path",
                                     "no_checkpoint", "bad_workers"])
def test_usage_errors_exit_2_and_write_nothing(tmp_path, capsys, problem):
    cfg = write_config(tmp_path / "cfg")
    scan = write_scan(tmp_path / "in" / "s.nii.gz")
    out = tmp_path / "out"
    args = ["--config", cfg, "--input", scan, "--output", out]
    expected = ""
    if problem == "missing_input":
        args[3] = tmp_path / "nope.nii.gz"
        expected = "--input: no such file or folder"
    elif problem == "output_is_input":
        args[5] = out = scan
        expected = "is an input"
    elif problem == "output_in_dicom":
        series = tmp_path / "series"
        shutil.copytree(DICOM_DIR, series)
        args[3], args[5] = series, series / "maps"
        out = series / "maps"
        expected = "is inside the input DICOM folder"
    elif problem == "csv_no_path":
        table = tmp_path / "t.csv"
        table.write_text("file\na.nii.gz\n")
        args[3] = table
        expected = "needs a 'path' column"
    elif problem == "no_checkpoint":
        args[1] = write_config(tmp_path / "cfg", name="nockpt.yaml", checkpoint=None)
        expected = "model.checkpoint: no checkpoint given"
    elif problem == "bad_workers":
        args += ["--workers", "-1"]
        expected = "--workers: expected an integer >= 0"
    before = sorted(p for p in tmp_path.rglob("*"))
    assert _run(*args) == 2
    assert expected in capsys.readouterr().err
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written, input untouched
    if problem == "output_is_input":
        assert nib.load(str(scan)).shape == (20, 18, 10)

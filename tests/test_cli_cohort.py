"""A cohort output folder is a small database (issue 11 §2-4): resume compares content, case-id
collisions are refused, the manifest covers every case with the run that made it, concurrent runs
are locked out, interrupted runs are cleaned up, and every failure is one line."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from helpers_models import read_manifest as _manifest, run_explain as _run, write_config, write_scan

DICOM_DIR = Path(__file__).parent / "data" / "totalseg" / "example_ct_dicom"


def _map(out: Path, case: str) -> np.ndarray:
    return np.asarray(nib.load(str(out / case / f"{case}_hirescam_nodule.nii.gz")).dataobj)


def _tree(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


def test_changed_input_content_is_recomputed(tmp_path):
    cfg = write_config(tmp_path / "cfg")
    scan = write_scan(tmp_path / "in" / "scan.nii.gz", seed=0)
    other = write_scan(tmp_path / "other" / "scan.nii.gz", seed=1)
    out = tmp_path / "out"
    assert _run("--config", cfg, "--input", scan, "--output", out, "--quiet") == 0
    first = _map(out, "scan")
    # oracle: the maps of the other scan, from a fresh run into another folder
    assert _run("--config", cfg, "--input", other, "--output", tmp_path / "ref", "--quiet") == 0
    expected = _map(tmp_path / "ref", "scan")
    assert not np.allclose(first, expected)
    # copy the other scan over the same path, keeping the old modification time
    stat = scan.stat()
    shutil.copyfile(other, scan)
    os.utime(scan, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _run("--config", cfg, "--input", scan, "--output", out, "--quiet") == 0
    assert [r["status"] for r in _manifest(out)] == ["ok"]
    np.testing.assert_array_equal(_map(out, "scan"), expected)
    # edited in place (one voxel), same size and mtime: recomputed again
    img = nib.load(str(scan))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] += 1
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(scan))
    os.utime(scan, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _run("--config", cfg, "--input", scan, "--output", out, "--quiet") == 0
    assert [r["status"] for r in _manifest(out)] == ["ok"]
    # unchanged: skipped
    assert _run("--config", cfg, "--input", scan, "--output", out, "--quiet") == 0
    assert [r["status"] for r in _manifest(out)] == ["skipped"]


def test_changed_dicom_folder_is_recomputed(tmp_path):
    cfg = write_config(tmp_path / "cfg")
    series = tmp_path / "in" / "series"
    shutil.copytree(DICOM_DIR, series)
    out = tmp_path / "out"
    assert _run("--config", cfg, "--input", series, "--output", out, "--quiet") == 0
    assert _run("--config", cfg, "--input", series, "--output", out, "--quiet") == 0
    assert [r["status"] for r in _manifest(out)] == ["skipped"]
    first = sorted(series.iterdir())[5]
    ds = pydicom.dcmread(first)
    ds.InstanceCreationTime = "101010"  # a header edit that leaves the pixels alone
    ds.save_as(first)
    assert _run("--config", cfg, "--input", series, "--output", out, "--quiet") == 0
    assert [r["status"] for r in _manifest(out)] == ["ok"]


def test_case_id_collision_with_another_input_is_refused(tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg")
    a = write_scan(tmp_path / "a" / "scan.nii.gz", seed=0)
    b = write_scan(tmp_path / "b" / "scan.nii.gz", seed=1)
    out = tmp_path / "out"
    assert _run("--config", cfg, "--input", a, "--output", out, "--quiet") == 0
    before = {p: p.stat().st_mtime_ns for p in _tree(out) if p.is_file()}
    capsys.readouterr()
    assert _run("--config", cfg, "--input", b, "--output", out, "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "case id 'scan'" in err and str(a) in err and "--overwrite" in err
    after = {p: p.stat().st_mtime_ns for p in _tree(out) if p.is_file() and p.name != ".medcam3d.lock"}
    assert after == {p: t for p, t in before.items() if p.name != ".medcam3d.lock"}  # untouched
    # --overwrite replaces them; the same file at a new path (moved cohort) is not a collision
    assert _run("--config", cfg, "--input", b, "--output", out, "--quiet", "--overwrite") == 0
    assert json.loads((out / "scan" / ".medcam3d-done.json").read_text())["input"] == str(b)
    moved = tmp_path / "moved" / "scan.nii.gz"
    moved.parent.mkdir()
    shutil.copy2(b, moved)
    assert _run("--config", cfg, "--input", moved, "--output", out, "--quiet") == 0
    assert [r["status"] for r in _manifest(out)] == ["skipped"]


def test_manifest_covers_every_case_with_the_run_that_made_it(tmp_path):
    cfg = write_config(tmp_path / "cfg")
    scans = [write_scan(tmp_path / "in" / f"s{i}.nii.gz", seed=i) for i in range(3)]
    bad = tmp_path / "in" / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    out = tmp_path / "out"
    assert _run("--config", cfg, "--input", scans[0], bad, "--output", out, "--quiet", "--manifest", "both") == 1
    run1 = {r["case_id"]: r["run_id"] for r in _manifest(out)}
    assert _run("--config", cfg, "--input", scans[1], "--output", out, "--quiet", "--manifest", "both") == 0
    rows = _manifest(out)
    assert [(r["case_id"], r["status"]) for r in rows] == [("s0", "ok"), ("bad", "failed"), ("s1", "ok")]
    assert rows[0]["run_id"] == run1["s0"] and rows[2]["run_id"] not in run1.values()
    assert rows[0]["outputs"] == "s0/s0_hirescam_nodule.nii.gz;s0/s0_hirescam_effusion.nii.gz"
    jsonl = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in jsonl] == ["s0", "bad", "s1"]
    # a finished case missing from the manifest (e.g. manifest deleted) is found from its marker
    (out / "manifest.csv").unlink()
    (out / "manifest.jsonl").unlink()
    assert _run("--config", cfg, "--input", scans[2], "--output", out, "--quiet") == 0
    rows = _manifest(out)
    assert sorted(r["case_id"] for r in rows) == ["s0", "s1", "s2"]
    assert {r["case_id"]: r["run_id"] for r in rows}["s0"] == run1["s0"]
    # a case whose folder was deleted leaves the manifest
    shutil.rmtree(out / "s1")
    assert _run("--config", cfg, "--input", scans[2], "--output", out, "--quiet") == 0
    assert sorted(r["case_id"] for r in _manifest(out)) == ["s0", "s2"]


def test_extra_columns_pass_through_the_merge(tmp_path):
    from medcam3d.cli.manifest import merge_rows, write_manifest

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / ".medcam3d-done.json").write_text(json.dumps({"rows": []}))
    old = [{"case_id": "a", "method": "hirescam", "status": "ok", "stage_seconds": 1.5}]
    new = [{"case_id": "b", "case_index": 0, "method": "hirescam", "status": "ok", "fov_fraction": 0.2}]
    rows = merge_rows(old, new, tmp_path)
    write_manifest(rows, tmp_path, "both")
    table = list(csv.DictReader(open(tmp_path / "manifest.csv", newline="")))
    assert table[0]["stage_seconds"] == "1.5" and table[1]["fov_fraction"] == "0.2"
    assert table[0]["fov_fraction"] == ""


def _slow_config(tmp_path: Path) -> Path:
    (tmp_path / "cfg").mkdir(parents=True)
    (tmp_path / "cfg" / "slow.py").write_text(
        "import os, sys, time, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from helpers_models import TinyNet\n"
        "class SlowNet(TinyNet):\n"
        "    def forward(self, x):\n"
        "        end = time.monotonic() + 120\n"  # explaining (not the no-grad probe) waits for GO
        f"        while torch.is_grad_enabled() and not os.path.exists({str(tmp_path / 'GO')!r}) "
        "and time.monotonic() < end:\n"
        "            time.sleep(0.05)\n"
        "        return super().forward(x)\n"
    )
    return write_config(tmp_path / "cfg", model={"_target_": "slow.py:SlowNet", "kwargs": {},
                                                 "checkpoint": "tiny.pt"})


def test_concurrent_runs_into_one_folder(tmp_path):
    cfg = _slow_config(tmp_path)
    first = [write_scan(tmp_path / "in1" / f"a{i}.nii.gz", seed=i) for i in range(3)]
    second = [write_scan(tmp_path / "in2" / f"b{i}.nii.gz", seed=i + 3) for i in range(2)]
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent),
                                                       str(Path(__file__).parents[1])]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "medcam3d", "explain", "--config", str(cfg), "--output", str(out),
           "--quiet", "--input"]
    a = subprocess.Popen([*cmd, *map(str, first)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    holder = out / ".medcam3d-run.json"
    deadline = time.monotonic() + 120
    while not holder.exists() and a.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert holder.exists(), a.communicate()
    b = subprocess.run([*cmd, *map(str, second)], env=env, capture_output=True, text=True, timeout=240)
    (tmp_path / "GO").touch()
    out_a, err_a = a.communicate(timeout=240)
    assert a.returncode == 0, err_a
    assert b.returncode == 2, b.stderr
    line = b.stderr.strip().splitlines()[-1]
    assert "is in use by another medcam3d run" in line and f"pid {a.pid}" in line
    assert [r["case_id"] for r in _manifest(out)] == ["a0", "a1", "a2"]
    assert not holder.exists()
    # once the first run is done, the second goes through and the manifest holds both
    b = subprocess.run([*cmd, *map(str, second)], env=env, capture_output=True, text=True, timeout=240)
    assert b.returncode == 0, b.stderr
    assert [r["case_id"] for r in _manifest(out)] == ["a0", "a1", "a2", "b0", "b1"]


def test_partial_files_of_a_killed_run_are_cleaned(tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg")
    scan = write_scan(tmp_path / "in" / "s.nii.gz")
    out = tmp_path / "out"
    assert _run("--config", cfg, "--input", scan, "--output", out, "--quiet") == 0
    leftovers = [out / "s" / ".s_hirescam_nodule.nii.gz.x1y2.partial.nii.gz",
                 out / "s" / ".s_hirescam_montage.tmp.png", out / "s" / "..medcam3d-done.json.tmp",
                 out / ".manifest.csv.tmp", out / "manifest.rank0.jsonl", out / "other" / ".x.partial.nii"]
    for p in leftovers:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"")
    keep = out / "s" / "notes.txt"
    keep.write_text("mine")
    assert _run("--config", cfg, "--input", scan, "--output", out) == 0
    assert not any(p.exists() for p in leftovers) and keep.exists()
    assert "removed 6 temporary file(s)" in capsys.readouterr().err


def test_output_folder_holding_a_dicom_input_is_refused(tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg")
    parent = tmp_path / "study"
    shutil.copytree(DICOM_DIR, parent / "series")
    before = _tree(tmp_path)
    assert _run("--config", cfg, "--input", parent / "series", "--output", parent, "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "case 'series' would be written to" in err
    assert _tree(tmp_path) == before
    # a folder of NIfTI inputs cannot hold the output either
    write_scan(tmp_path / "nii" / "a.nii.gz")
    assert _run("--config", cfg, "--input", tmp_path / "nii", "--output", tmp_path / "nii" / "maps") == 2
    assert "is inside the input folder" in capsys.readouterr().err


def test_csv_row_with_more_fields_than_its_header(tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg")
    write_scan(tmp_path / "a.nii.gz")
    table = tmp_path / "t.csv"
    table.write_text("path,case_id\na.nii.gz,x\na.nii.gz,y,extra\n")
    assert _run("--config", cfg, "--input", table, "--output", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"medcam3d explain: error: --input: CSV {str(table)!r} line 3 has 3 fields but "
                   "the header has 2; quote values that contain commas")
    assert not (tmp_path / "out").exists()


def test_case_id_equal_to_the_manifest_name(tmp_path):
    cfg = write_config(tmp_path / "cfg")
    scan = write_scan(tmp_path / "in" / "manifest.csv.nii.gz")
    out = tmp_path / "out"
    assert _run("--config", cfg, "--input", scan, "--output", out, "--quiet") == 0
    rows = _manifest(out)
    assert rows[0]["case_id"] == "manifest.csv-2" and (out / "manifest.csv").is_file()
    assert (out / "manifest.csv-2" / "manifest.csv-2_hirescam_nodule.nii.gz").is_file()


def test_cuda_on_cpu_only_torch_is_one_line(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = write_config(tmp_path / "cfg")
    scan = write_scan(tmp_path / "in" / "s.nii.gz")
    assert _run("--config", cfg, "--input", scan, "--output", tmp_path / "out", "--device", "cuda") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("medcam3d explain: error: --device: 'cuda' asked for")
    assert "--device cpu" in err and not (tmp_path / "out").exists()


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


class _FullDisk:
    """A file object that is created (0 bytes) and then fails every write with ENOSPC."""

    def __init__(self, path, *args, **kwargs):
        self._fh = open(path, *args, **kwargs)

    def write(self, _data):
        _enospc()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def _temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob(".*") if p.is_file() and p.name not in (".medcam3d.lock", ".medcam3d-done.json")]


def _full_disk_for(monkeypatch, names: tuple[str, ...]) -> None:
    """Writes through atomic_write_text to files whose name starts with ``names`` hit ENOSPC."""
    import medcam3d.cli.resume as resume

    real = resume.atomic_write_text

    def write(path, text):
        if not path.name.startswith(names):
            return real(path, text)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(resume, "open", _FullDisk, raising=False)
            return real(path, text)

    monkeypatch.setattr(resume, "atomic_write_text", write)
    monkeypatch.setattr("medcam3d.cli.manifest.atomic_write_text", write)


def test_disk_full_while_writing_the_manifest(tmp_path, capsys, monkeypatch):
    cfg = write_config(tmp_path / "cfg")
    scan = write_scan(tmp_path / "in" / "s.nii.gz")
    out = tmp_path / "out"
    _full_disk_for(monkeypatch, ("manifest",))
    assert _run("--config", cfg, "--input", scan, "--output", out, "--quiet", "--manifest", "both") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"medcam3d explain: error: cannot write {str(out / 'manifest.jsonl')!r}: No space "
                   "left on device; free some space and rerun"]
    assert _temp_files(out) == [] and not (out / "manifest.csv").exists()
    monkeypatch.undo()
    # space again: the finished case is skipped and the manifest written
    assert _run("--config", cfg, "--input", scan, "--output", out, "--quiet") == 0
    assert [r["status"] for r in _manifest(out)] == ["skipped"]


def test_disk_full_while_writing_the_marker(tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "cfg")
    scan = write_scan(tmp_path / "in" / "s.nii.gz")
    out = tmp_path / "out"
    _full_disk_for(monkeypatch, (".medcam3d-done",))
    assert _run("--config", cfg, "--input", scan, "--output", out, "--quiet") == 1
    row = _manifest(out)[0]
    assert row["status"] == "failed" and "No space left on device" in row["error"]
    assert not (out / "s").exists() and _temp_files(out) == []


def test_disk_full_while_writing_the_montage(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    cfg = write_config(tmp_path / "cfg", output={"montage": True})
    scan = write_scan(tmp_path / "in" / "s.nii.gz")
    out = tmp_path / "out"

    def savefig(self, path, **kwargs):
        Path(path).write_bytes(b"")  # the file exists, then the disk is full
        _enospc()

    monkeypatch.setattr(Figure, "savefig", savefig)
    assert _run("--config", cfg, "--input", scan, "--output", out, "--quiet") == 1
    row = _manifest(out)[0]
    assert row["status"] == "failed" and "No space left on device" in row["error"]
    assert not (out / "s").exists() and _temp_files(out) == []


def test_oversized_nifti_header_fails_before_reading(tmp_path):
    import gzip

    from medcam3d.errors import VolumeLoadError
    from medcam3d.io import load_volume

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2000, 2000, 2000))
    hdr.set_data_dtype(np.int16)
    raw = hdr.binaryblock + b"\x00" * 4
    path = tmp_path / "huge.nii.gz"
    path.write_bytes(gzip.compress(raw, compresslevel=9))
    assert path.stat().st_size < 400
    with pytest.raises(VolumeLoadError, match=r"claims \(2000, 2000, 2000\) voxels of int16 "
                                              r"\(16000000000 bytes, more than gzip"):
        load_volume(path)
    plain = tmp_path / "short.nii"
    hdr.set_data_shape((20, 20, 20))
    plain.write_bytes(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 100)
    with pytest.raises(VolumeLoadError, match=r"is 452 bytes but its header claims \(20, 20, 20\) voxels of int16 \(16000 bytes\)"):
        load_volume(plain)


def _non_ct_series(folder: Path, modality: str = "MR", uid: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in sorted(DICOM_DIR.iterdir()):
        ds = pydicom.dcmread(f)
        ds.Modality = modality
        if uid is not None:
            ds.SeriesInstanceUID = uid
            ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
        ds.save_as(folder / (f.name + (".b" if uid else "")))
    return folder


def test_allow_non_ct_and_series_uid_options(tmp_path):
    cfg = write_config(tmp_path / "cfg")
    mr = _non_ct_series(tmp_path / "mr")
    out = tmp_path / "out"
    assert _run("--config", cfg, "--input", mr, "--output", out, "--quiet") == 1
    assert "allow_non_ct" in _manifest(out)[0]["error"]
    assert _run("--config", cfg, "--input", mr, "--output", out, "--quiet", "--allow-non-ct") == 0
    # two series in one folder: --series-uid picks one; a CSV column does it per case
    two = tmp_path / "two"
    shutil.copytree(DICOM_DIR, two)
    _non_ct_series(two, modality="CT", uid="1.2.3.4.5")
    out2 = tmp_path / "out2"
    assert _run("--config", cfg, "--input", two, "--output", out2, "--quiet") == 1
    assert "series_uid" in _manifest(out2)[0]["error"]
    assert _run("--config", cfg, "--input", two, "--output", out2, "--quiet", "--series-uid", "1.2.3.4.5") == 0
    assert _manifest(out2)[0]["series_uid"] == "1.2.3.4.5"
    table = tmp_path / "cases.csv"
    table.write_text("path,case_id,series_uid,allow_non_ct\nmr,m,,yes\ntwo,t,1.2.3.4.5,\n")
    out3 = tmp_path / "out3"
    assert _run("--config", cfg, "--input", table, "--output", out3, "--quiet") == 0
    assert [(r["case_id"], r["status"], r["series_uid"]) for r in _manifest(out3)] == [
        ("m", "ok", ""), ("t", "ok", "1.2.3.4.5")]


def test_killed_run_leaves_no_lock_and_its_leftovers_are_cleaned(tmp_path):
    """A run killed (SIGKILL) mid-case: the OS drops its lock, the next run goes through, removes
    the stale manifest part and holder note, and finishes every case."""
    import signal

    cfg = _slow_config(tmp_path)
    scans = [write_scan(tmp_path / "in" / f"k{i}.nii.gz", seed=i) for i in range(2)]
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent),
                                                       str(Path(__file__).parents[1])]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "medcam3d", "explain", "--config", str(cfg), "--output", str(out),
           "--quiet", "--input", *map(str, scans)]
    victim = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = out / "manifest.rank0.jsonl"
    deadline = time.monotonic() + 120
    while not part.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert part.exists()
    victim.send_signal(signal.SIGKILL)  # waiting in the first case's forward (no GO file yet)
    victim.wait(timeout=60)
    assert (out / ".medcam3d-run.json").exists()  # the dead holder's note is still there
    (tmp_path / "GO").touch()
    loud = [c for c in cmd if c != "--quiet"]
    done = subprocess.run(loud, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "removed 1 temporary file(s) left by an interrupted run" in done.stderr
    assert [(r["case_id"], r["status"]) for r in _manifest(out)] == [("k0", "ok"), ("k1", "ok")]
    assert not part.exists() and not (out / ".medcam3d-run.json").exists()


def test_first_methods_montage_failing_in_the_background_fails_the_whole_case(tmp_path, monkeypatch):
    """Montages are drawn in a background thread while the next method's maps are written: a failure
    there still fails the case, and nothing of either method (maps, PNGs, marker) is left."""
    from matplotlib.figure import Figure

    cfg = write_config(tmp_path / "cfg", output={"montage": True}, methods=["hirescam", "gradcam"])
    scan = write_scan(tmp_path / "in" / "s.nii.gz")
    out = tmp_path / "out"
    calls: list[str] = []
    real = Figure.savefig

    def savefig(self, path, **kwargs):
        calls.append(str(path))
        if len(calls) == 1:  # the first method's PNG
            Path(path).write_bytes(b"")
            _enospc()
        return real(self, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    assert _run("--config", cfg, "--input", scan, "--output", out, "--quiet") == 1
    rows = _manifest(out)
    assert {r["status"] for r in rows} == {"failed"} and {r["method"] for r in rows} == {"hirescam", "gradcam"}
    assert "No space left on device" in rows[0]["error"]
    assert not (out / "s").exists() and _temp_files(out) == []

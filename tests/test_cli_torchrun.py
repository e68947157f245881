"""``torchrun --nproc_per_node 2 -m medcam3d explain``: every case done exactly once, manifest merged."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_models import write_config, write_scan


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_gloo(tmp_path):
    cfg = write_config(tmp_path / "cfg", methods=["hirescam", "gradcam"])
    scans = [write_scan(tmp_path / "in" / f"case{i}.nii.gz", shape=(12, 10, 8), seed=i) for i in range(6)]
    out = tmp_path / "out"
    env = dict(os.environ)
    tests_dir = str(Path(__file__).parent)
    env["PYTHONPATH"] = os.pathsep.join([tests_dir, str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "medcam3d", "explain", "--config", str(cfg), "--input", *map(str, scans),
           "--output", str(out), "--device", "cpu", "--manifest", "both"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["case_id"], r["method"]) for r in rows] == [
        (f"case{i}", m) for i in range(6) for m in ("hirescam", "gradcam")]
    assert {r["status"] for r in rows} == {"ok"}
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 12
    assert not list(out.glob("manifest.rank*"))  # parts merged and removed
    for i in range(6):  # each case written once (one marker, its files present)
        assert (out / f"case{i}" / ".medcam3d-done.json").exists()
        assert len(list((out / f"case{i}").glob("*.nii.gz"))) == 4
    assert proc.stdout.count("6 done, 0 skipped, 0 failed") == 1  # summary from rank 0 only

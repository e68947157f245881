"""A rerun over finished cases builds no model (medcam3d.config.digest + cli.explain), and the
fingerprint it computes from files alone is the full path's (RunConfig.fingerprint is the oracle)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import medcam3d.config.models as config_models
from helpers_models import (
    config_dict,
    read_manifest as _rows,
    run_explain as _run,
    write_checkpoint,
    write_scan,
)
from medcam3d.config import load_run_config
from medcam3d.config.digest import config_digest
from medcam3d.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# A model file next to the config (``_target_: nets.py:FileNet``). Building it raises while
# MEDCAM3D_TEST_NO_BUILD is set, so a run that builds the model then fails with exit code 2.
NET_SOURCE = '''import os
from torch import nn


class FileNet(nn.Module):
    def __init__(self, in_channels=1, out_channels=2):
        super().__init__()
        if os.environ.get("MEDCAM3D_TEST_NO_BUILD"):
            raise RuntimeError("the model was built")
        self.features = nn.Sequential(nn.Conv3d(in_channels, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(4, out_channels)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))
'''


def _file_config(folder: Path, name: str = "run.yaml", **overrides) -> Path:
    """YAML config with a file-path target (nets.py:FileNet) and a checkpoint, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "nets.py").exists():
        (folder / "nets.py").write_text(NET_SOURCE)
    if not (folder / "tiny.pt").exists():
        write_checkpoint(folder / "tiny.pt")  # TinyNet's state dict: same keys and shapes as FileNet
    data = config_dict(model={"_target_": "nets.py:FileNet", "kwargs": {"in_channels": 1, "out_channels": 2},
                              "checkpoint": "tiny.pt"}, **overrides)
    (folder / name).write_text(yaml.safe_dump(data, sort_keys=False))
    return folder / name


@pytest.fixture()
def builds(monkeypatch):
    """Counts model builds; ``builds.forbid = True`` makes any build raise."""

    class Counter:
        count = 0
        forbid = False

    real = config_models.build_model_with_report

    def counting(*args, **kwargs):
        Counter.count += 1
        if Counter.forbid:
            raise AssertionError("the model was built")
        return real(*args, **kwargs)

    monkeypatch.setattr(config_models, "build_model_with_report", counting)
    return Counter


@pytest.fixture()
def finished(tmp_path):
    """A file-target config, two scans, and an output folder where both are finished."""
    cfg = _file_config(tmp_path / "cfg")
    scans = [write_scan(tmp_path / "in" / f"scan{i}.nii.gz", seed=i) for i in range(2)]
    out = tmp_path / "out"
    assert _run("--config", cfg, "--input", *scans, "--output", out, "--quiet") == 0
    assert [r["status"] for r in _rows(out)] == ["ok", "ok"]
    return cfg, scans, out


# --- the fingerprint from files equals the full path's ------------------------------------------


def test_digest_fingerprint_equals_full_fingerprint_monai_name():
    demo = ROOT / "sample_configs" / "demo.yaml"  # model.name: DenseNet + a checkpoint
    digest = config_digest(demo)
    assert digest.fingerprint is not None and digest.reason is None
    assert digest.fingerprint == load_run_config(demo).fingerprint()


def test_digest_fingerprint_equals_full_fingerprint_file_target_checkpoint_and_score(tmp_path):
    cfg = _file_config(tmp_path / "cfg", output={"montage": False, "window": [40, 400], "storage": "uint16"})
    full = load_run_config(cfg)
    assert full.code_sha256 is not None and full.checkpoint_sha256 is not None
    assert config_digest(cfg).fingerprint == full.fingerprint()
    # a similarity score with a reference file: its SHA-256 is part of both
    torch.save(torch.tensor([0.6, 0.8]), tmp_path / "cfg" / "ref.pt")
    data = yaml.safe_load(cfg.read_text())
    data["score"] = {"name": "similarity", "reference": "ref.pt"}
    data["class_names"] = None
    scored = tmp_path / "cfg" / "scored.yaml"
    scored.write_text(yaml.safe_dump(data))
    full_scored = load_run_config(scored)
    assert config_digest(scored).fingerprint == full_scored.fingerprint() != full.fingerprint()


def test_digest_follows_what_the_full_fingerprint_follows(tmp_path):
    cfg = _file_config(tmp_path / "cfg")
    before = config_digest(cfg).fingerprint
    (tmp_path / "cfg" / "nets.py").write_text(NET_SOURCE + "\n# edited\n")  # model code
    edited = config_digest(cfg).fingerprint
    assert edited != before and edited == load_run_config(cfg).fingerprint()
    torch.manual_seed(5)
    torch.save({k: torch.randn_like(v) for k, v in torch.load(tmp_path / "cfg" / "tiny.pt").items()},
               tmp_path / "cfg" / "tiny.pt")  # weights
    reweighted = config_digest(cfg).fingerprint
    assert reweighted != edited and reweighted == load_run_config(cfg).fingerprint()
    # the device is not part of it (as in RunConfig.fingerprint)
    other = _file_config(tmp_path / "cfg", name="gpu.yaml", device=None)
    assert config_digest(other).fingerprint == reweighted


def test_digest_gives_up_where_only_the_built_model_can_tell(tmp_path):
    write_checkpoint(tmp_path / "tiny.pt")
    dotted = config_digest(config_dict(checkpoint=str(tmp_path / "tiny.pt")))  # helpers_models.TinyNet
    assert dotted.fingerprint is None and "path/to/net.py:Class" in dotted.reason
    random = config_digest(config_dict(checkpoint=None))
    assert random.fingerprint is None and "random weights" in random.reason
    own = config_digest(config_dict(checkpoint=None, model={"_target_": "own.py:build", "factory": True,
                                                             "loads_own_weights": True}))
    assert own.fingerprint is None and "loads_own_weights" in own.reason
    missing = config_digest(config_dict(checkpoint=str(tmp_path / "gone.pt")))
    assert missing.fingerprint is None and "cannot be read" in missing.reason
    # nothing of the user's was imported to find out
    assert not [m for m in sys.modules if m.startswith("medcam3d_user_own")]


@pytest.mark.parametrize("bad", [
    {"activation": "sigmoidd"},
    {"methods": ["hirescam", "gradcamm"]},
    {"output": {"window": "lunk"}},
    {"class_names": ["a", "b", "c"]},  # 3 names, model.kwargs.out_channels: 2
    {"modle": {}},
])
def test_digest_refuses_what_load_run_config_refuses_with_the_same_message(tmp_path, bad):
    cfg = _file_config(tmp_path / "cfg")
    data = {**yaml.safe_load(cfg.read_text()), **bad}
    path = tmp_path / "cfg" / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as fast:
        config_digest(path)
    with pytest.raises(ConfigError) as full:
        load_run_config(path)
    assert str(fast.value) == str(full.value)


# --- the command line ----------------------------------------------------------------------------


def test_rerun_over_finished_cases_builds_no_model_and_writes_the_same_manifest(finished, builds, capsys,
                                                                                  monkeypatch):
    cfg, scans, out = finished
    builds.forbid = True
    capsys.readouterr()
    assert _run("--config", cfg, "--input", *scans, "--output", out) == 0
    fast_out = capsys.readouterr().out
    fast_manifest = (out / "manifest.csv").read_text()
    assert builds.count == 0
    assert [r["status"] for r in _rows(out)] == ["skipped", "skipped"]
    assert "0 done, 2 skipped, 0 failed" in fast_out
    # the same rerun through the full path (model built) writes the same manifest and summary
    builds.forbid = False
    import medcam3d.cli.explain as explain

    real_digest = explain.config_digest

    def no_fingerprint(*args, **kwargs):
        d = real_digest(*args, **kwargs)
        return type(d)(d.spec, None, "forced full path")

    monkeypatch.setattr(explain, "config_digest", no_fingerprint)
    assert _run("--config", cfg, "--input", *scans, "--output", out) == 0
    assert builds.count == 1
    assert capsys.readouterr().out == fast_out
    assert (out / "manifest.csv").read_text() == fast_manifest


def test_changed_config_weights_model_code_or_input_rerun(finished, builds):
    cfg, scans, out = finished
    folder = cfg.parent
    cases = ("--input", *scans, "--output", out, "--quiet")
    other = _file_config(folder, name="other.yaml", class_names=["nodule", "mass"])
    assert _run("--config", other, *cases) == 0
    assert [r["status"] for r in _rows(out)] == ["ok", "ok"] and builds.count == 1
    assert _run("--config", other, *cases) == 0 and builds.count == 1  # finished again: no build
    torch.manual_seed(9)
    torch.save({k: torch.randn_like(v) for k, v in torch.load(folder / "tiny.pt").items()}, folder / "tiny.pt")
    assert _run("--config", other, *cases) == 0
    assert [r["status"] for r in _rows(out)] == ["ok", "ok"] and builds.count == 2
    (folder / "nets.py").write_text(NET_SOURCE + "\n# edited\n")
    assert _run("--config", other, *cases) == 0
    assert [r["status"] for r in _rows(out)] == ["ok", "ok"] and builds.count == 3
    write_scan(scans[1], seed=7)  # same path, other content
    assert _run("--config", other, *cases) == 0
    assert [r["status"] for r in _rows(out)] == ["skipped", "ok"] and builds.count == 4


def test_one_case_left_takes_the_full_path(finished, builds, tmp_path, capsys):
    cfg, scans, out = finished
    new = write_scan(tmp_path / "in" / "scan2.nii.gz", seed=2)
    capsys.readouterr()
    assert _run("--config", cfg, "--input", *scans, new, "--output", out, "--quiet") == 0
    assert builds.count == 1
    assert [r["status"] for r in _rows(out)] == ["skipped", "skipped", "ok"]
    assert "1 done, 2 skipped, 0 failed" in capsys.readouterr().out
    # a case whose marker is gone is also left to do
    (out / "scan0" / ".medcam3d-done.json").unlink()
    assert _run("--config", cfg, "--input", *scans, new, "--output", out, "--quiet") == 0
    assert builds.count == 2 and [r["status"] for r in _rows(out)] == ["ok", "skipped", "skipped"]


def test_class_imported_into_the_model_file_takes_the_full_path_and_still_skips(tmp_path, builds):
    # the class is defined in helpers_models.py: the full fingerprint hashes that file, the digest
    # hashes reexport.py; they differ, so the rerun builds the model, plans again and skips
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "reexport.py").write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nfrom helpers_models import TinyNet\n")
    write_checkpoint(folder / "tiny.pt")
    data = config_dict(model={"_target_": "reexport.py:TinyNet", "kwargs": {"out_channels": 2},
                              "checkpoint": "tiny.pt"})
    (folder / "run.yaml").write_text(yaml.safe_dump(data))
    assert config_digest(folder / "run.yaml").fingerprint != load_run_config(folder / "run.yaml").fingerprint()
    scan = write_scan(tmp_path / "in" / "scan0.nii.gz")
    out = tmp_path / "out"
    assert _run("--config", folder / "run.yaml", "--input", scan, "--output", out, "--quiet") == 0
    count = builds.count
    assert _run("--config", folder / "run.yaml", "--input", scan, "--output", out, "--quiet") == 0
    assert builds.count == count + 1 and [r["status"] for r in _rows(out)] == ["skipped"]


def test_rerun_still_refuses_an_invalid_config_unreadable_weights_and_a_missing_device(finished, builds, capsys):
    cfg, scans, out = finished
    before = (out / "manifest.csv").read_text()
    data = yaml.safe_load(cfg.read_text())
    bad = cfg.parent / "bad.yaml"
    bad.write_text(yaml.safe_dump({**data, "activation": "softmx"}))
    capsys.readouterr()
    assert _run("--config", bad, "--input", *scans, "--output", out, "--quiet") == 2
    assert "activation: expected 'sigmoid'" in capsys.readouterr().err and builds.count == 0
    # --allow-random-weights is not part of the fingerprint: without a checkpoint the build decides
    bad.write_text(yaml.safe_dump({**data, "model": {**data["model"], "checkpoint": None}}))
    assert _run("--config", bad, "--input", *scans, "--output", out, "--quiet") == 2
    assert "no checkpoint given" in capsys.readouterr().err
    # a checkpoint that is gone: the full path says so
    (cfg.parent / "tiny.pt").rename(cfg.parent / "moved.pt")
    assert _run("--config", cfg, "--input", *scans, "--output", out, "--quiet") == 2
    assert "model.checkpoint: file not found" in capsys.readouterr().err
    (cfg.parent / "moved.pt").rename(cfg.parent / "tiny.pt")
    if not torch.cuda.is_available():  # an explicitly asked device is still checked
        assert _run("--config", cfg, "--input", *scans, "--output", out, "--quiet", "--device", "cuda") == 2
        assert "--device: 'cuda' asked for" in capsys.readouterr().err
    assert (out / "manifest.csv").read_text() == before
    count = builds.count
    assert _run("--config", cfg, "--input", *scans, "--output", out, "--quiet") == 0  # lock released
    assert builds.count == count


def test_rerun_imports_neither_torch_nor_monai(finished):
    cfg, scans, out = finished
    code = ("import sys; from medcam3d.cli.main import main; "
            f"rc = main(['explain', '--config', {str(cfg)!r}, '--input', {str(scans[0])!r}, {str(scans[1])!r}, "
            f"'--output', {str(out)!r}, '--quiet', '--device', 'cpu']); "
            "print(rc, sorted(m for m in ('torch', 'monai', 'nibabel', 'scipy') if m in sys.modules))")
    env = {**os.environ, "MEDCAM3D_TEST_NO_BUILD": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "0 []"
    assert "0 done, 2 skipped, 0 failed" in proc.stdout


@pytest.mark.slow
def test_torchrun_ranks_agree_to_skip_or_to_build(finished, tmp_path):
    """Two processes, one case each: all finished -> neither builds; one case left -> both build
    (here the build fails on purpose: both refuse, exit 2, no hang, nothing new written)."""
    import socket

    cfg, scans, out = finished

    def torchrun() -> subprocess.CompletedProcess:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDCAM3D_TEST_NO_BUILD": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "medcam3d", "explain", "--config", str(cfg), "--input", *map(str, scans),
               "--output", str(out), "--device", "cpu", "--quiet"]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)

    proc = torchrun()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("0 done, 2 skipped, 0 failed") == 1
    assert [r["status"] for r in _rows(out)] == ["skipped", "skipped"]
    before = (out / "manifest.csv").read_text()
    (out / "scan1" / ".medcam3d-done.json").unlink()  # rank 1's case is left to do, rank 0's is not
    proc = torchrun()
    assert proc.returncode != 0
    assert proc.stderr.count("error: model: building FileNet(**model.kwargs) failed") == 2  # both ranks
    assert (out / "manifest.csv").read_text() == before

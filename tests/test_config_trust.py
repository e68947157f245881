"""A config is data: hostile ``_target_``s and preprocessing entries run nothing, write nothing,
and end in one line with exit code 2 (issue 11 §1)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers_models import TinyNet, config_dict, write_checkpoint, write_scan
from medcam3d.cli.main import main
from medcam3d.config import load_run_config
from medcam3d.errors import ConfigError


class _Payload:
    """Unpickling this runs ``exec`` of code that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _setup(tmp_path: Path, model=None, preprocess=None) -> tuple[list[str], Path, Path]:
    """A config with the given model/preprocess section, a victim folder and a scan; returns the
    CLI arguments, the victim folder and the marker path."""
    victim = tmp_path / "victim"
    victim.mkdir(parents=True)
    (victim / "precious.txt").write_text("keep me")
    marker = tmp_path / "MARKER"
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    write_checkpoint(cfg_dir / "tiny.pt")
    data = config_dict()
    if model is not None:
        data["model"] = model
    if preprocess is not None:
        data["preprocess"] = preprocess
    path = cfg_dir / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    scan = write_scan(tmp_path / "in" / "s.nii.gz")
    return ["explain", "--config", str(path), "--input", str(scan), "--output", str(tmp_path / "out")], victim, marker


def _assert_refused(argv, victim, marker, tmp_path, capsys, expected: str) -> None:
    before = sorted(p for p in tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medcam3d explain: error: ") and "\n" not in err, err
    assert expected in err, err
    assert not marker.exists()
    assert (victim / "precious.txt").read_text() == "keep me"
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written anywhere
    assert not (tmp_path / "out").exists()


def _model(target: str, **kwargs) -> dict:
    return {"_target_": target, "kwargs": kwargs, "checkpoint": "tiny.pt"}


@pytest.mark.parametrize("factory", [False, True])
@pytest.mark.parametrize(
    ("target", "kwargs", "expected"),
    [
        ("shutil.rmtree", "victim", "standard library"),
        ("os.system", "touch", "standard library"),
        ("subprocess.run", "touch", "standard library"),
        ("subprocess.Popen", "touch", "standard library"),
        ("runpy.run_path", "script", "standard library"),
        ("builtins.exec", "code", "standard library"),
    ],
)
def test_stdlib_targets_run_nothing(tmp_path, capsys, target, kwargs, expected, factory):
    marker = tmp_path / "MARKER"
    script = tmp_path / "evil.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    values = {
        "victim": {"path": str(tmp_path / "victim")},
        "touch": {"args": f"touch {marker}", "shell": True} if "subprocess" in target else {"command": f"touch {marker}"},
        "script": {"path_name": str(script)},
        "code": {"source": f"open({str(marker)!r}, 'w').write('pwned')"},
    }[kwargs]
    model = _model(target, **values)
    if factory:
        model["factory"] = True
    argv, victim, marker = _setup(tmp_path, model=model)
    _assert_refused(argv, victim, marker, tmp_path, capsys, expected)


def test_torch_load_target_does_not_run_a_pickle(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "cfg_x.pt"
    torch.save(_Payload(marker), evil)
    # the payload is real: loading it without weights_only creates the marker (then undo)
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()
    for factory in (False, True):
        model = _model("torch.load", f=str(evil), weights_only=False)
        model["factory"] = factory
        argv, victim, marker = _setup(tmp_path / f"f{factory}", model=model)
        marker = tmp_path / "MARKER"
        _assert_refused(argv, victim, marker, tmp_path / f"f{factory}", capsys,
                        "model._target_: 'torch.load'")
        assert not marker.exists()


def test_malicious_checkpoint_is_refused_by_weights_only(tmp_path, capsys):
    argv, victim, marker = _setup(tmp_path)
    torch.save(_Payload(marker), tmp_path / "cfg" / "tiny.pt")  # the config's checkpoint
    before = sorted(p for p in tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "weights_only=True" in err and err.count("\n") == 1
    assert not marker.exists() and sorted(p for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"name": "LoadImage", "reader": "os.system", "image_only": True}, "preprocess[0]: LoadImage reads/writes files"),
        ({"name": "SaveImage", "output_dir": "ANYWHERE"}, "preprocess[0]: SaveImage reads/writes files"),
        ({"name": "Lambda", "func": "os.system"}, "preprocess[0]: Lambda"),
        ({"name": "ScaleIntensityRange", "a_min": -1000, "a_max": 400, "b_min": 0.0, "b_max": 1.0,
          "clip": True, "dtype": {"x": 1}}, "preprocess[0].dtype: expected plain data"),
    ],
)
def test_preprocessing_names_no_io_and_no_code(tmp_path, capsys, entry, expected):
    entry = {k: (str(tmp_path / "saved") if v == "ANYWHERE" else v) for k, v in entry.items()}
    argv, victim, marker = _setup(tmp_path, preprocess=[entry])
    _assert_refused(argv, victim, marker, tmp_path, capsys, expected)
    assert not (tmp_path / "saved").exists()


def test_non_module_class_and_builtin_with_factory_are_refused(tmp_path):
    cfg = config_dict(model=_model("collections.OrderedDict"))
    with pytest.raises(ConfigError, match="standard library"):
        load_run_config(cfg, base_dir=tmp_path)
    cfg = config_dict(model={**_model("numpy.load", file="x.npy"), "factory": True})
    with pytest.raises(ConfigError, match="'numpy', which holds no model factories"):
        load_run_config(cfg, base_dir=tmp_path)
    cfg = config_dict(model={**_model("torch.hub.load", repo_or_dir="x", model="y"), "factory": True})
    with pytest.raises(ConfigError, match="torch.hub.load"):
        load_run_config(cfg, base_dir=tmp_path)


def test_file_path_target_relative_to_config(tmp_path):
    nets = tmp_path / "cfg" / "nets"
    nets.mkdir(parents=True)
    (nets / "my_net.py").write_text(
        "from torch import nn\n"
        "class MyNet(nn.Module):\n"
        "    def __init__(self, out_channels=2):\n"
        "        super().__init__()\n"
        "        self.features = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU())\n"
        "        self.pool = nn.AdaptiveAvgPool3d(1)\n"
        "        self.fc = nn.Linear(4, out_channels)\n"
        "    def forward(self, x):\n"
        "        return self.fc(self.pool(self.features(x)).flatten(1))\n"
        "def make(out_channels: int = 2):\n"
        "    return MyNet(out_channels)\n"
    )
    write_checkpoint(tmp_path / "cfg" / "tiny.pt")
    data = config_dict(model={"_target_": "nets/my_net.py:MyNet", "kwargs": {"out_channels": 2},
                              "checkpoint": "tiny.pt"})
    (tmp_path / "cfg" / "run.yaml").write_text(yaml.safe_dump(data))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)  # relative to the config, not to the current folder
    try:
        run = load_run_config(tmp_path / "cfg" / "run.yaml")
    finally:
        os.chdir(cwd)
    reference = TinyNet()
    reference.load_state_dict(torch.load(tmp_path / "cfg" / "tiny.pt", weights_only=True))
    for (k, v), (k2, v2) in zip(run.model.state_dict().items(), reference.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert type(run.model).__name__ == "MyNet" and not run.random_weights
    # a factory function in the file needs factory: true; then it works
    data["model"]["_target_"] = "nets/my_net.py:make"
    with pytest.raises(ConfigError, match="mark it with model.factory: true"):
        load_run_config(data, base_dir=tmp_path / "cfg")
    data["model"]["factory"] = True
    assert type(load_run_config(data, base_dir=tmp_path / "cfg").model).__name__ == "MyNet"
    # the source file is part of the fingerprint: editing the model code re-runs cases
    before = load_run_config(data, base_dir=tmp_path / "cfg").fingerprint()
    (nets / "my_net.py").write_text((nets / "my_net.py").read_text() + "\n# edited\n")
    assert load_run_config(data, base_dir=tmp_path / "cfg").fingerprint() != before
    # errors: a missing file, and a dotted path that cannot be imported names the file form
    data["model"]["_target_"] = "nets/nope.py:MyNet"
    with pytest.raises(ConfigError, match="no Python file"):
        load_run_config(data, base_dir=tmp_path / "cfg")
    data["model"]["_target_"] = "no_such_pkg_xyz.Net"
    with pytest.raises(ConfigError, match=r"path/to/net.py:Class"):
        load_run_config(data, base_dir=tmp_path / "cfg")


def test_factory_that_loads_its_own_weights(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "w.pt")
    (tmp_path / "own.py").write_text(
        "import torch, sys\n"
        "sys.path.insert(0, %r)\n"
        "from helpers_models import TinyNet\n"
        "def build(path: str):\n"
        "    net = TinyNet()\n"
        "    net.load_state_dict(torch.load(path, weights_only=True))\n"
        "    return net\n" % str(Path(__file__).parent)
    )
    data = config_dict(model={"_target_": "own.py:build", "factory": True, "loads_own_weights": True,
                              "kwargs": {"path": str(ckpt)}})
    with _no_random_warning():
        run = load_run_config(data, base_dir=tmp_path)
    assert "RANDOM" not in capsys.readouterr().err
    assert not run.random_weights and run.weights_sha256 is not None
    # the fingerprint follows the weights the factory loaded (not "random-weights")
    first = run.fingerprint()
    torch.manual_seed(7)
    torch.save(TinyNet().state_dict(), ckpt)
    assert load_run_config(data, base_dir=tmp_path).fingerprint() != first


class _no_random_warning:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        self._log = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        assert not any("RANDOM" in str(w.message) for w in self._log)


def test_inference_tensor_model_is_refused_and_left_untouched(tmp_path):
    from medcam3d.engine import HiResCAM
    from medcam3d.errors import InputError

    with torch.inference_mode():
        model = TinyNet()
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(InputError, match="inference tensor"):
        HiResCAM(model, "features")(torch.randn(1, 1, 6, 6, 6))
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_stdlib_module_is_not_even_imported(tmp_path):
    sys.modules.pop("antigravity", None)
    with pytest.raises(ConfigError, match="standard library"):
        load_run_config(config_dict(model=_model("antigravity.Foo")), base_dir=tmp_path)
    assert "antigravity" not in sys.modules  # importing it would open a web browser


def test_template_documents_every_model_key_and_transform():
    from medcam3d.config.run import MODEL_KEYS
    from medcam3d.spatial.config import CONFIG_TRANSFORMS

    text = (Path(__file__).resolve().parents[1] / "sample_configs" / "template.yaml").read_text()
    for key in MODEL_KEYS:
        assert f"{key}:" in text, key
    for name in CONFIG_TRANSFORMS:
        assert f" {name}" in text, name


def test_inference_tensor_model_from_a_config_is_one_line(tmp_path, capsys):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "inf.py").write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from helpers_models import TinyNet\n"
        "def build():\n"
        "    with torch.inference_mode():\n"
        "        return TinyNet()\n"
    )
    data = config_dict(checkpoint=None, model={"_target_": "inf.py:build", "factory": True,
                                               "loads_own_weights": True})
    (tmp_path / "cfg" / "run.yaml").write_text(yaml.safe_dump(data))
    scan = write_scan(tmp_path / "in" / "s.nii.gz")
    out = tmp_path / "out"
    assert main(["explain", "--config", str(tmp_path / "cfg" / "run.yaml"), "--input", str(scan),
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model parameter 'features.0.weight' is an inference tensor" in err
    assert not out.exists()

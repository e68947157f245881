"""load_run_config / build_model: every problem is a ConfigError naming the key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from helpers_models import TinyNet, config_dict, write_checkpoint, write_config
from medcam3d.config import WINDOWS, RunConfig, build_model, load_run_config, monai_network_names
from medcam3d.errors import ConfigError

SAMPLES = Path(__file__).resolve().parents[1] / "sample_configs"


def _error(cfg, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        load_run_config(cfg, **kw)
    return str(info.value)


def test_valid_yaml_builds_everything(tmp_path):
    path = write_config(tmp_path, methods=["hirescam", "gradcam"], class_idx=["effusion"],
                        output={"window": [40, 400], "four_d": True})
    cfg = load_run_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.source == path.resolve()
    assert cfg.checkpoint == (tmp_path / "tiny.pt").resolve()  # relative to the config's folder
    assert not cfg.model.training
    assert cfg.methods == ["hirescam", "gradcam"]
    assert cfg.class_idx == [1]  # class name -> index
    assert cfg.output.four_d and cfg.output.montage
    assert cfg.output.window.limits == (-160.0, 240.0)
    assert [type(t).__name__ for t in cfg.preprocess.transforms] == ["ScaleIntensityRange", "Resize"]
    # weights are the checkpoint's, not a fresh init
    saved = torch.load(tmp_path / "tiny.pt", weights_only=True)
    assert torch.equal(cfg.model.fc.weight, saved["fc.weight"])


def test_relative_checkpoint_resolves_from_config_folder_not_cwd(tmp_path, monkeypatch):
    path = write_config(tmp_path / "cfgdir")
    monkeypatch.chdir(tmp_path)  # tiny.pt is not here
    assert load_run_config(path).checkpoint == (tmp_path / "cfgdir" / "tiny.pt").resolve()


@pytest.mark.parametrize("wrap", ["state_dict", "model", "module"])
def test_checkpoint_wrappers_and_module_prefix(tmp_path, wrap):
    ckpt = write_checkpoint(tmp_path / "w.pt", wrap=wrap)
    model = build_model("helpers_models.TinyNet", {"out_channels": 2}, ckpt)
    torch.manual_seed(1)
    ref = TinyNet(out_channels=2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_kwarg_of_wrong_type_names_key_path():
    cfg = {"model": {"name": "DenseNet121", "kwargs": {"spatial_dims": "three", "in_channels": 1,
                                                       "out_channels": 2}}}
    msg = _error(cfg, allow_random_weights=True)
    assert "model.kwargs.spatial_dims: expected an integer, got 'three'" in msg


def test_unknown_keys_with_close_matches():
    cfg = config_dict(checkpoint=None)
    cfg["outputs"] = cfg.pop("output")
    cfg["model"]["kwarg"] = cfg["model"].pop("kwargs")
    msg = _error(cfg, allow_random_weights=True)
    assert "outputs: unknown key (did you mean 'output'?)" in msg
    assert "model.kwarg: unknown key (did you mean 'kwargs'?)" in msg


def test_unknown_model_kwarg_and_missing_required():
    msg = _error({"model": {"name": "DenseNet121", "kwargs": {"spatial_dims": 3, "in_chanels": 1,
                                                              "out_channels": 2}}},
                 allow_random_weights=True)
    assert "model.kwargs.in_chanels: DenseNet121 has no argument 'in_chanels'" in msg
    assert "did you mean 'in_channels'" in msg
    assert "missing required argument 'in_channels'" in msg


def test_unknown_network_name_suggests():
    msg = _error({"model": {"name": "DenseNet12", "kwargs": {}}}, allow_random_weights=True)
    assert msg.startswith("model.name: 'DenseNet12' is not a network in monai.networks.nets")
    assert "'DenseNet121'" in msg


def test_factory_functions_are_networks_too():
    assert "resnet18" in monai_network_names() and "DenseNet121" in monai_network_names()
    with pytest.raises(ConfigError, match=r"model.kwargs.foo: resnet18 has no argument 'foo'"):
        build_model("resnet18", {"spatial_dims": 3, "foo": 1}, allow_random_weights=True)


def test_target_import_errors():
    msg = _error(config_dict(model={"_target_": "no_such_pkg.Net"}), allow_random_weights=True)
    assert msg.startswith("model._target_: cannot import 'no_such_pkg'")
    msg = _error(config_dict(model={"_target_": "helpers_models.TinyNett"}), allow_random_weights=True)
    assert "has no 'TinyNett'" in msg and "'TinyNet'" in msg
    msg = _error(config_dict(model={"_target_": "helpers_models.not_a_model"}), allow_random_weights=True)
    assert "is a function, not a torch.nn.Module class" in msg and "factory: true" in msg
    msg = _error(config_dict(model={"_target_": "helpers_models.not_a_model", "factory": True}),
                 allow_random_weights=True)
    assert "returned str, not a torch.nn.Module" in msg


def test_exactly_one_of_name_and_target():
    msg = _error({"model": {"kwargs": {}}})
    assert "model: give exactly one of model.name" in msg
    assert _error({}).startswith("model: missing")


def test_missing_checkpoint_file_is_an_error_even_with_random_weights_allowed(tmp_path):
    path = write_config(tmp_path, checkpoint="nope/weights.pt")
    for allow in (False, True):
        msg = _error(path, allow_random_weights=allow)
        assert msg.startswith("model.checkpoint: file not found:")
        assert str(tmp_path / "nope" / "weights.pt") in msg


def test_no_checkpoint_needs_allow_random_weights(tmp_path, capsys):
    cfg = config_dict(checkpoint=None)
    msg = _error(cfg)
    assert msg.startswith("model.checkpoint: no checkpoint given") and "--allow-random-weights" in msg
    from medcam3d.config.models import RandomWeightsWarning

    with pytest.warns(RandomWeightsWarning, match="RANDOM weights"):  # a UserWarning subclass
        run = load_run_config(cfg, allow_random_weights=True)
    assert run.random_weights and run.checkpoint is None
    # seeded: every process (torchrun rank) builds the same untrained model
    with pytest.warns(UserWarning):
        again = load_run_config(cfg, allow_random_weights=True)
    assert torch.equal(run.model.fc.weight, again.model.fc.weight)


def test_checkpoint_that_does_not_fit(tmp_path):
    write_checkpoint(tmp_path / "w3.pt", out_channels=3)
    msg = _error(config_dict(checkpoint=str(tmp_path / "w3.pt")))
    assert msg.startswith("model.checkpoint:") and "does not fit TinyNet" in msg


def test_checkpoint_not_torch(tmp_path):
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    msg = _error(config_dict(checkpoint=str(tmp_path / "bad.pt")))
    assert msg.startswith("model.checkpoint: cannot read")


def test_unknown_target_layer(tmp_path):
    path = write_config(tmp_path, target_layer="feature")
    msg = _error(path)
    assert msg.startswith("target_layer:") and "'feature'" in msg and "features" in msg
    assert str(path.resolve()) in msg  # says which file


def test_unknown_transform_has_preprocess_key_path(tmp_path):
    msg = _error(config_dict(checkpoint=None, preprocess=[{"name": "Resise", "spatial_size": 8}]),
                 allow_random_weights=True)
    assert msg.startswith("preprocess[0].name: unknown transform 'Resise'") and "'Resize'" in msg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"methods": ["hirescam", "gradcm"]}, "methods[1]: expected one of hirescam, gradcam, gradcampp, xgradcam, layercam, gradcam_elementwise, eigencam, gradxinput, got 'gradcm' (did you mean 'gradcam'"),
        ({"activation": "softmx"}, "activation: expected 'sigmoid' (multi-label) or 'softmax', got 'softmx'"),
        ({"class_idx": ["nodul"]}, "class_idx[0]: 'nodul' is not a class name (did you mean 'nodule'?)"),
        ({"class_idx": [5]}, "class_idx[0]: index 5 is out of range for 2 class_names"),
        ({"class_names": ["a", "b", "c"]}, "class_names: 3 name(s) given but the model has 2 outputs"),
        ({"output": {"window": "lungs"}}, "output.window: unknown window 'lungs' (did you mean 'lung'?)"),
        ({"output": {"montage": "yes"}}, "output.montage: expected true or false, got 'yes'"),
        ({"device": "gpu"}, "device: expected cpu, cuda, cuda:N or null (auto), got 'gpu'"),
        ({"target_layer": 3}, "target_layer: expected a module name (string) or null, got 3"),
    ],
)
def test_value_errors_name_key_path(override, expected):
    assert expected in _error(config_dict(checkpoint=None, **override), allow_random_weights=True)


def test_yaml_problems(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: [DenseNet121\n")
    assert "is not valid YAML at line" in _error(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert "is empty" in _error(empty)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    assert "must be a mapping" in _error(lst)
    assert _error(tmp_path / "missing.yaml").startswith("config: file not found")


def test_fingerprint_tracks_outputs_not_device(tmp_path):
    a = load_run_config(config_dict(checkpoint=str(write_checkpoint(tmp_path / "w.pt"))))
    b = load_run_config(config_dict(checkpoint=str(tmp_path / "w.pt"), device=None))
    c = load_run_config(config_dict(checkpoint=str(tmp_path / "w.pt"), methods=["gradcam"]))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    torch.save({k: v + 1 for k, v in torch.load(tmp_path / "w.pt").items()}, tmp_path / "w.pt")
    assert load_run_config(config_dict(checkpoint=str(tmp_path / "w.pt"))).fingerprint() != a.fingerprint()


def test_windows_are_level_width():
    assert WINDOWS["lung"].limits == (-1350.0, 150.0)


@pytest.mark.parametrize("name", ["densenet121_3d.yaml", "resnet18_3d.yaml", "template.yaml", "unet_region.yaml"])
def test_sample_configs_load_with_random_weights(name, recwarn):
    cfg = load_run_config(SAMPLES / name, allow_random_weights=True)
    assert cfg.random_weights and cfg.methods
    raw = yaml.safe_load((SAMPLES / name).read_text())
    assert raw["model"].get("checkpoint") is None

"""Getting a researcher's model in (issue 12 §2): checkpoint key, prefixes, non-strict loads that
refuse when the explained forward needs a missing weight, and target layers checked by a probe
forward before any case runs."""

from __future__ import annotations

import pytest
import torch
import yaml

from helpers_models import config_dict, write_scan
from medcam3d.cli.main import main
from medcam3d.config import load_run_config
from medcam3d.errors import ConfigError

NETS = '''
import torch
from torch import nn


class TwoHeadNet(nn.Module):
    """features -> pool -> fc is the classifier; ``decoder`` (a training-time branch) never runs."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(4, 2)
        self.decoder = nn.Conv3d(4, 1, 1)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


class TwiceNet(nn.Module):
    """``act`` runs twice per forward."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv3d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3, 4)))
'''


@pytest.fixture()
def nets(tmp_path):
    (tmp_path / "nets.py").write_text(NETS)
    return tmp_path


def _trained_state(nets_dir) -> dict[str, torch.Tensor]:
    """What a training script saved: every weight with distinct values (seeded)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nets_for_state", nets_dir / "nets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(3)
    net = module.TwoHeadNet()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
        net.features[1].running_mean.normal_()
    return {k: v.clone() for k, v in net.state_dict().items()}


def _cfg(**model) -> dict:
    return config_dict(model={"_target_": "nets.py:TwoHeadNet", "checkpoint": "ckpt.pt", **model},
                       target_layer="features")


def test_checkpoint_key_and_prefixes_load_exact_weights(nets):
    state = _trained_state(nets)
    wrapped = {f"module.backbone.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    wrapped.update({f"module.head.{k[3:]}": v for k, v in state.items() if k.startswith("fc.")})
    torch.save({"epoch": 9, "ema": {"model": wrapped}, "optimizer": {"lr": 0.1}}, nets / "ckpt.pt")
    run = load_run_config(_cfg(checkpoint_key="ema.model", strip_prefix="backbone.",
                               map_prefix={"head.": "fc."}), base_dir=nets)
    loaded = run.model.state_dict()
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    # a wrong key names what the file has
    with pytest.raises(ConfigError, match=r"model.checkpoint_key: .* has no entry 'emma' at the top "
                                          r"level \(it has: ema, epoch, optimizer\)"):
        load_run_config(_cfg(checkpoint_key="emma.model"), base_dir=nets)
    # without the prefix options the strict load names the remedies
    with pytest.raises(ConfigError, match="model.strict: false") as info:
        load_run_config(_cfg(checkpoint_key="ema.model"), base_dir=nets)
    assert "strip_prefix/map_prefix" in str(info.value) and "missing" in str(info.value)


def test_non_strict_accepts_keys_outside_the_forward_and_reports_them(nets, capsys):
    state = _trained_state(nets)
    partial = {k: v for k, v in state.items() if not k.startswith("decoder.")}
    partial["projection.weight"] = torch.zeros(3)  # a key the model has no place for
    torch.save(partial, nets / "ckpt.pt")
    with pytest.raises(ConfigError, match="model.checkpoint: .* does not fit"):
        load_run_config(_cfg(), base_dir=nets)
    run = load_run_config(_cfg(strict=False), base_dir=nets)
    err = capsys.readouterr().err
    assert "2 model key(s) not in the file, all in modules the forward never runs" in err
    assert "decoder.weight" in err and "1 file key(s) ignored" in err and "projection.weight" in err
    assert sorted(run.load_report.missing) == ["decoder.bias", "decoder.weight"]
    for k, v in partial.items():
        if k in state:
            assert torch.equal(run.model.state_dict()[k], v)


@pytest.mark.parametrize("dropped", ["fc.weight", "features.1.running_mean", "features.0.bias"])
def test_non_strict_refuses_a_missing_weight_the_forward_uses(nets, dropped):
    state = _trained_state(nets)
    torch.save({k: v for k, v in state.items() if k != dropped}, nets / "ckpt.pt")
    with pytest.raises(ConfigError, match=rf"lacks 1 weight\(s\) the explained forward pass uses "
                                          rf"\(e.g. \['{dropped}'\]\)"):
        load_run_config(_cfg(strict=False), base_dir=nets)


@pytest.mark.parametrize(
    ("target", "layer", "expected"),
    [
        ("TwiceNet", "act", "target_layer: target layer 'act' runs more than once per forward pass"),
        ("TwiceNet", "fc", "target_layer: target layer 'fc' emits a tensor of shape (1, 2)"),
        ("TwoHeadNet", "decoder", "target_layer: target layer 'decoder' does not run in the model's"),
    ],
)
def test_bad_target_layer_is_refused_before_the_cohort(nets, tmp_path, capsys, target, layer, expected):
    torch.manual_seed(0)
    data = config_dict(model={"_target_": f"nets.py:{target}", "checkpoint": None},
                       target_layer=layer)
    (nets / "run.yaml").write_text(yaml.safe_dump(data))
    scan = write_scan(tmp_path / "in" / "s.nii.gz")
    out = tmp_path / "out"
    assert main(["explain", "--config", str(nets / "run.yaml"), "--input", str(scan), "--output",
                 str(out), "--allow-random-weights", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("medcam3d explain: error: " + expected), err
    assert not out.exists()  # refused before any case ran


def test_model_that_cannot_run_on_the_fixed_preprocessing_output(tmp_path):
    data = config_dict(checkpoint=None, model={"_target_": "helpers_models.TinyNet",
                                               "kwargs": {"in_channels": 3}})
    with pytest.raises(ConfigError, match=r"model: cannot run on the preprocessing's output "
                                          r"\(input shape \(1, 1, 12, 12, 12\), the same for every scan\)"):
        load_run_config(data, allow_random_weights=True, base_dir=tmp_path)


def test_own_model_sample_config_loads_a_foreign_checkpoint(tmp_path):
    from pathlib import Path
    import importlib.util
    import shutil

    samples = Path(__file__).resolve().parents[1] / "sample_configs"
    shutil.copy(samples / "own_model.yaml", tmp_path)
    shutil.copytree(samples / "nets", tmp_path / "nets")
    spec = importlib.util.spec_from_file_location("my_ct_net_ref", samples / "nets" / "my_ct_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(5)
    trained = module.MyCTNet(num_classes=3, width=16)
    saved = {}
    for k, v in trained.state_dict().items():  # what the foreign training script wrote
        if k.startswith("decoder."):
            continue
        saved["model." + ("probe." + k[5:] if k.startswith("head.") else k)] = v
    torch.save({"epoch": 40, "ema": {"state_dict": saved}}, tmp_path / "my_ct_net.pt")
    run = load_run_config(tmp_path / "own_model.yaml")
    assert run.probe.target_layer == "encoder.2" and run.probe.input_shape == (1, 1, 96, 96, 96)
    assert sorted(run.load_report.missing) == ["decoder.bias", "decoder.weight"]
    state = run.model.state_dict()
    for k, v in trained.state_dict().items():
        if not k.startswith("decoder."):
            assert torch.equal(state[k], v), k


def test_probe_runs_the_model_as_explain_volume_does(tmp_path):
    """Extra forward inputs (forward_kwargs) and a bf16 model reach the probe as they reach the
    engine; without them the fixed-shape probe would refuse these valid configs."""
    (tmp_path / "extra.py").write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})\n"
        "from helpers_models import TinyNet\n"
        "class ClinicalNet(TinyNet):\n"
        "    def forward(self, x, clinical):\n"
        "        return super().forward(x) + clinical.sum(1, keepdim=True)\n"
        "def bf16_net() -> torch.nn.Module:\n"
        "    return TinyNet().to(torch.bfloat16)\n"
    )
    data = config_dict(checkpoint=None, model={"_target_": "extra.py:ClinicalNet"},
                       forward_kwargs={"clinical": [0.5, 1.0]})
    run = load_run_config(data, allow_random_weights=True, base_dir=tmp_path)
    assert run.probe.ran and run.probe.target_layer == "features"
    data = config_dict(checkpoint=None, model={"_target_": "extra.py:bf16_net", "factory": True})
    run = load_run_config(data, allow_random_weights=True, base_dir=tmp_path)
    assert run.probe.ran and next(run.model.parameters()).dtype == torch.bfloat16

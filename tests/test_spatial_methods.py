"""explain_volume with several methods in one pass, a score, extra forward inputs and CPU autocast;
the config keys that set them and the one RunConfig -> explain_volume mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from spatial_models import make_affine, sphere_volume

import medcam3d
from medcam3d import ConfigError, InputError, explain_volume
from medcam3d.config import load_run_config
from medcam3d.engine import RegionScore
from medcam3d.spatial import model_input

WINDOW = [{"name": "ScaleIntensityRange", "a_min": -1000, "a_max": 400, "b_min": 0, "b_max": 1, "clip": True}]


def _volume(shape=(16, 12, 10)) -> MetaTensor:
    affine = make_affine(np.diag((0.9, 1.3, 2.5)), np.zeros(3), shape)
    arr = sphere_volume(affine, shape, np.array([2.0, -1.0, 2.0]), radius=5.0)
    return MetaTensor(torch.from_numpy(arr)[None], affine=torch.as_tensor(affine))


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, stride=2, padding=1), torch.nn.ReLU())
        self.mid = torch.nn.Sequential(torch.nn.Conv3d(4, 4, 3, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(4 + 2, 3)

    def forward(self, x, clinical=None):
        pooled = self.mid(self.features(x)).mean(dim=(2, 3, 4))
        clinical = torch.zeros(x.shape[0], 2) if clinical is None else clinical
        return self.fc(torch.cat([pooled, clinical.to(pooled.dtype)], 1))


def test_methods_share_one_forward_and_equal_single_calls():
    vol, model = _volume(), Net().eval()
    calls = []
    handle = model.register_forward_pre_hook(lambda m, i: calls.append(1))
    try:
        both = explain_volume(model, vol, WINDOW, target_layer="features",
                              methods=["hirescam", "gradcam", "eigencam"])
    finally:
        handle.remove()
    assert len(calls) == 1  # one forward for all three methods (the layer is named: no probe)
    assert list(both) == ["hirescam", "gradcam", "eigencam"]
    for m, expl in both.items():
        alone = explain_volume(model, vol, WINDOW, method=m, target_layer="features")
        assert expl.method == m
        torch.testing.assert_close(expl.maps.as_tensor(), alone.maps.as_tensor())
        assert torch.equal(expl.maps.affine, vol.affine)


def test_extra_forward_inputs_reach_the_model():
    vol, model = _volume(), Net().eval()
    clinical = torch.tensor([[0.5, -2.0]])
    expl = explain_volume(model, vol, WINDOW, forward_kwargs={"clinical": clinical})
    x = model_input(vol, WINDOW).as_tensor()[None]
    expected = medcam3d.HiResCAM(model)(x, "all", forward_kwargs={"clinical": clinical})
    torch.testing.assert_close(expl.logits, expected.logits[0])
    plain = explain_volume(model, vol, WINDOW)
    assert not torch.allclose(plain.logits, expl.logits)  # the clinical input changed the scores


def test_cpu_amp_runs_under_bfloat16_autocast():
    vol, model = _volume(), Net().eval()
    exact = explain_volume(model, vol, WINDOW, target_layer="features")
    half = explain_volume(model, vol, WINDOW, target_layer="features", amp=True)
    assert half.maps.dtype == torch.float32
    assert not torch.equal(half.raw, exact.raw)  # autocast really ran (bf16 rounding)
    torch.testing.assert_close(half.logits, exact.logits, rtol=3e-2, atol=3e-2)


def test_bfloat16_model_gets_a_bfloat16_input():
    vol, model = _volume(), Net().eval().to(torch.bfloat16)
    expl = explain_volume(model, vol, WINDOW, target_layer="features")
    assert expl.maps.dtype == torch.float32 and float(expl.maps.max()) > 0


def test_region_score_through_explain_volume():
    class Seg(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU())
            self.head = torch.nn.Conv3d(4, 2, 1)

        def forward(self, x):
            return self.head(self.features(x))

    vol, model = _volume(), Seg().eval()
    expl = explain_volume(model, vol, WINDOW, class_idx=1, score=RegionScore(box=[(2, 8), (2, 6), (1, 5)]))
    assert expl.class_idx.tolist() == [1] and expl.maps.shape[1:] == vol.shape[1:]


def _cfg(**over):
    base = {
        "model": {"_target_": "test_spatial_methods.Net"},
        "preprocess": WINDOW,
        "methods": ["hirescam", "Grad-CAM++"],
        "class_names": ["a", "b", "c"],
    }
    base.update(over)
    return base


def test_config_keys_map_to_explain_volume(tmp_path):
    cfg = load_run_config(_cfg(forward_kwargs={"clinical": [0.5, -2.0]}, score={"name": "logits"}),
                          allow_random_weights=True)
    kwargs = cfg.explain_kwargs()
    assert kwargs["methods"] == ["hirescam", "gradcampp"]
    torch.testing.assert_close(kwargs["forward_kwargs"]["clinical"], torch.tensor([[0.5, -2.0]]))
    out = explain_volume(cfg.model, _volume(), **kwargs)
    assert list(out) == ["hirescam", "gradcampp"]
    per_case = cfg.explain_kwargs(case_inputs={"clinical": torch.tensor([[1.0, 1.0]])})
    torch.testing.assert_close(per_case["forward_kwargs"]["clinical"], torch.tensor([[1.0, 1.0]]))
    other = explain_volume(cfg.model, _volume(), **per_case)
    assert not torch.allclose(other["hirescam"].logits, out["hirescam"].logits)  # the case's value was used


def test_config_similarity_reference_file_and_its_hash(tmp_path):
    ref = tmp_path / "ref.pt"
    torch.save(torch.ones(3), ref)
    cfg = load_run_config(_cfg(score={"name": "similarity", "reference": "ref.pt"}), allow_random_weights=True,
                          base_dir=tmp_path)
    assert isinstance(cfg.score, medcam3d.Similarity)
    assert len(cfg.spec["score"]["reference_sha256"]) == 64


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        ({"score": {"name": "regoin"}}, "score.name: expected one of logits, output, region, similarity"),
        ({"score": {"name": "region", "box": [[3, 1]]}}, "score.box: expected one [start, stop]"),
        ({"score": {"name": "output"}}, "score.key: expected"),
        ({"forward_kwargs": {"clinical": ["a"]}}, "forward_kwargs.clinical: expected a (nested) list of numbers"),
        ({"score": {"name": "similarity", "reference": "missing.pt"}}, "score.reference: cannot read"),
    ],
)
def test_config_errors_name_the_key(over, expected, tmp_path):
    with pytest.raises(ConfigError) as info:
        load_run_config(_cfg(**over), allow_random_weights=True, base_dir=tmp_path)
    assert expected in str(info.value)


def test_explain_volume_refuses_duplicate_methods_and_method_with_methods():
    with pytest.raises(InputError, match="twice"):
        explain_volume(Net(), _volume(), WINDOW, methods=["gradcam", "gradcam"])
    with pytest.raises(InputError, match="not both"):
        explain_volume(Net(), _volume(), WINDOW, "gradcam", methods=["hirescam"])


def test_cli_default_methods_share_one_forward_and_one_backward(tmp_path, monkeypatch):
    """medcam3d explain with methods [hirescam, gradcam]: per case one engine pass, one model
    forward (no probe, the layer is named) and one autograd.grad call for both methods."""
    from helpers_models import write_config, write_scan

    from medcam3d.cli.main import main
    from medcam3d.engine import onepass

    cfg = write_config(tmp_path / "cfg", methods=["hirescam", "gradcam"], output={"montage": False})
    scan = write_scan(tmp_path / "in" / "scan0.nii.gz", seed=0)
    calls = {"pass": [], "grad": 0, "forward": 0}
    real_pass, real_grad = onepass.run_pass, torch.autograd.grad

    def counting_pass(cams, *args, **kwargs):
        calls["pass"].append([c.method for c in cams])
        handle = cams[0].module.register_forward_pre_hook(
            lambda m, i: calls.__setitem__("forward", calls["forward"] + 1))
        try:
            return real_pass(cams, *args, **kwargs)
        finally:
            handle.remove()

    def counting_grad(*args, **kwargs):
        calls["grad"] += 1
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(onepass, "run_pass", counting_pass)
    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    assert main(["explain", "--config", str(cfg), "--input", str(scan), "--output", str(tmp_path / "out")]) == 0
    assert calls["pass"] == [["hirescam", "gradcam"]]
    assert calls["forward"] == 1 and calls["grad"] == 1
    assert sorted(p.name for p in (tmp_path / "out" / "scan0").glob("*.nii.gz"))  # both methods wrote maps


def test_sample_unet_region_config_explains_a_box_exactly():
    """sample_configs/unet_region.yaml: the region score, and HiResCAM's completeness at the input of
    the last convolution (the logits are linear there)."""
    from pathlib import Path

    from medcam3d.engine import completeness_gap

    cfg = load_run_config(Path(__file__).resolve().parents[1] / "sample_configs" / "unet_region.yaml",
                          allow_random_weights=True)
    vol = _volume((40, 36, 30))
    out = explain_volume(cfg.model, vol, **cfg.explain_kwargs())
    assert list(out) == ["hirescam", "gradcam"] and out["hirescam"].class_names == ["tumour"]
    assert out["hirescam"].maps.shape[1:] == vol.shape[1:]
    x = model_input(vol, cfg.preprocess).as_tensor()[None]
    c = completeness_gap(medcam3d.HiResCAM(cfg.model, cfg.target_layer), x, [1], score=cfg.score)
    assert c.holds()
    torch.testing.assert_close(c.score[0, 0], out["hirescam"].logits[0])

"""The demo-model training script: its loss terms against hand-computed values, and a 2-step run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    # main() sets the thread count and deterministic mode for the whole process
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det, warn_only=warn)


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_demo_model", ROOT / "scripts" / "train_demo_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pair_rank_loss_by_hand(train) -> None:
    # pair 0 flips class 1 (first twin has it), pair 1 flips class 0 (second twin has it)
    logits = torch.tensor([[0.0, 3.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    labels = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    flips = torch.tensor([1, 0])
    # pair 0: with - without = 3 - 1 = 2; pair 1: with - without = 2 - (-1) = 3
    expected = 0.5 * (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-3.0)))
    assert train.pair_rank_loss(logits, labels, flips).item() == pytest.approx(expected, rel=1e-6)


def test_negative_evidence_by_hand(train) -> None:
    feats = torch.zeros(2, 2, 2, 1, 1)
    feats[:, 0] = 1.0  # channel 0 is 1 in both cells, channel 1 is 0
    feats[1, 1, 0] = 4.0  # case 1, channel 1, cell 0
    weight = torch.tensor([[2.0, -1.0], [-1.0, 0.0]])  # class 0 evidence: 2*c0 - c1; class 1: -c0
    labels = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    # absent (case, class) pairs: (0,0) cells [2, 2]; (0,1) cells [-1, -1]; (1,0) cells [2-4, 2] = [-2, 2]
    expected = (2 + 2 + 0 + 0 + 0 + 2) / 6
    assert train.negative_evidence(feats, weight, labels).item() == pytest.approx(expected)
    assert train.negative_evidence(feats, weight, torch.ones(2, 2)).item() == 0.0


def test_outside_evidence_by_hand(train) -> None:
    feats = torch.ones(1, 1, 4, 1, 1)  # four cells along x, evidence 1 in each for weight 1
    weight = torch.tensor([[1.0]])
    masks = torch.zeros(1, 1, 8, 2, 2, dtype=torch.uint8)
    masks[0, 0, 0] = 1  # the lesion lies in cell 0 (voxels 0-1 along x)
    labels = torch.ones(1, 1)
    # margin 1: cells 0 and 1 are "near", 2 and 3 outside -> mean over 4 cells of [0, 0, 1, 1]
    assert train.outside_evidence(feats, weight, labels, masks).item() == pytest.approx(0.5)
    assert train.outside_evidence(feats, weight, labels, masks, margin_cells=0).item() == pytest.approx(0.75)
    assert train.outside_evidence(feats, weight, torch.zeros(1, 1), masks).item() == 0.0


def test_two_step_run_writes_weights_and_records_options(train, tmp_path) -> None:
    assert train.main(["--models", "gap", "--steps", "2", "--val-n", "8", "--threads", "1",
                       "--pair-rank-weight", "1", "--negative-evidence-weight", "0.5",
                       "--outside-evidence-weight", "0.5", "--head-lr-mult", "200", "--flip-order", "0,1,2",
                       "--out-dir", str(tmp_path)]) == 0
    from medcam3d.models import load_demo_model

    load_demo_model("gap", tmp_path / "demo_weights.pt")  # fits the shipped architecture
    report = json.loads((tmp_path / "demo_training_gap.json").read_text())
    assert report["steps"] == 2 and report["head_lr_mult"] == 200 and report["flip_order"] == "0,1,2"
    assert report["outside_evidence_weight"] == 0.5 and set(report["auroc"]) == {"nodule", "effusion", "consolidation"}


def test_bad_options_are_refused_before_training(train, tmp_path) -> None:
    with pytest.raises(SystemExit, match="--flip-order needs class indices"):
        train.main(["--models", "gap", "--steps", "1", "--flip-order", "0,5", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="apply to the gap and axialnet models only"):
        train.main(["--models", "flatten", "--steps", "1", "--outside-evidence-weight", "1",
                    "--out-dir", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_axial_cell_evidence_is_the_per_slice_fc_term_by_hand(train) -> None:
    from medcam3d.models.axialnet import AxialNet

    model = AxialNet(slice_shape=(8, 8), classes=2, channels=(3,), strides=(4,)).eval()
    x = torch.rand(2, 1, 8, 8, 5)
    feats = {}
    h = model.features.register_forward_hook(lambda m, i, o: feats.setdefault("a", o))
    with torch.no_grad():
        scores = model.slice_scores(x)  # (B, K, Z)
    h.remove()
    ev = train.axial_cell_evidence(feats["a"], model.slice_fc)
    assert ev.shape == (2, 2, 2, 2, 5)
    # a slice's score is its cells' evidence summed over the slice plus the bias
    torch.testing.assert_close(ev.sum(dim=(2, 3)) + model.slice_fc.bias.view(1, -1, 1), scores)


def test_two_step_axialnet_run(train, tmp_path) -> None:
    assert train.main(["--models", "axialnet", "--steps", "2", "--val-n", "8", "--threads", "1",
                       "--pair-rank-weight", "1", "--negative-evidence-weight", "0.5", "--head-lr-mult", "0.05",
                       "--tied-head-lr-mult", "200", "--zero-head", "--out-dir", str(tmp_path)]) == 0
    from medcam3d.models import load_demo_model

    # the training-time parametrisation (shared + per-position head) is folded away: a plain state_dict
    model = load_demo_model("axialnet", tmp_path / "demo_axialnet_weights.pt")
    w = model.slice_fc.weight
    assert w.shape[2:4] == model.feature_shape and not hasattr(model.slice_fc, "parametrizations")
    report = json.loads((tmp_path / "demo_training_axialnet.json").read_text())
    assert report["kind"] == "axialnet" and report["head_lr_mult"] == 0.05 and report["tied_head_lr_mult"] == 200
    assert report["params"] == sum(p.numel() for p in model.parameters())


def test_tied_plus_free_head_is_the_sum_and_folds_exactly(train) -> None:
    from torch.nn.utils import parametrize

    from medcam3d.models.axialnet import AxialNet

    model = AxialNet(slice_shape=(8, 8), classes=2, channels=(3,), strides=(4,)).eval()
    free = model.slice_fc.weight.detach().clone()
    parametrize.register_parametrization(model.slice_fc, "weight", train.TiedPlusFree(2, 3, 4))
    with torch.no_grad():
        model.slice_fc.parametrizations.weight[0].tied.copy_(torch.tensor([[4.0, 0.0, -8.0], [0.0, 2.0, 0.0]]))
    expected = free.clone()
    expected[0, 0] += 1.0  # 4 / (2 x 2 cells)
    expected[0, 2] -= 2.0
    expected[1, 1] += 0.5
    torch.testing.assert_close(model.slice_fc.weight, expected)
    x = torch.rand(1, 1, 8, 8, 2)
    before = model(x)
    train.fold_tied_head(model)
    assert not parametrize.is_parametrized(model.slice_fc)
    torch.testing.assert_close(model.slice_fc.weight, expected)
    torch.testing.assert_close(model(x), before)

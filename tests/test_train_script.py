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
    with pytest.raises(SystemExit, match="applies to the gap model only"):
        train.main(["--models", "flatten", "--steps", "1", "--outside-evidence-weight", "1",
                    "--out-dir", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []

"""Per-case extra model inputs from a cohort CSV (issue 12 §1): a column ``input.<name>`` becomes
the keyword input ``<name>`` of ``model.forward`` for that case. The oracle is explain_volume called
directly with the same value, and the model's own arithmetic (logit_k = TinyNet logit_k + 2 c_k)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from helpers_models import ClinicalNet, PREPROCESS, write_config, write_scan
from medcam3d import explain_volume, load_volume
from medcam3d.cli.main import main


def _cohort(tmp_path, cells):
    for i in range(len(cells)):
        write_scan(tmp_path / "scans" / f"s{i}.nii.gz", seed=i)
    lines = ["path,input.clinical"] + [f"scans/s{i}.nii.gz,{c}" for i, c in enumerate(cells)]
    (tmp_path / "cohort.csv").write_text("\n".join(lines) + "\n")
    cfg = write_config(tmp_path / "cfg", model={"_target_": "helpers_models.ClinicalNet",
                                                "kwargs": {"in_channels": 1, "out_channels": 2},
                                                "checkpoint": "tiny.pt"})
    return cfg, tmp_path / "cohort.csv"


def _model(tmp_path) -> ClinicalNet:
    model = ClinicalNet(in_channels=1, out_channels=2)
    model.load_state_dict(torch.load(tmp_path / "cfg" / "tiny.pt", weights_only=True))
    return model.eval()


def test_csv_input_columns_reach_the_model_per_case(tmp_path):
    cfg, cohort = _cohort(tmp_path, ["0.5;-1.0", "3.0;2.0"])
    out = tmp_path / "out"
    assert main(["explain", "--config", str(cfg), "--input", str(cohort), "--output", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()] \
        if (out / "manifest.jsonl").exists() else list(csv.DictReader(open(out / "manifest.csv")))
    by_case = {r["case_id"]: r for r in rows}
    model = _model(tmp_path)
    for i, clinical in enumerate(([0.5, -1.0], [3.0, 2.0])):
        vol = load_volume(tmp_path / "scans" / f"s{i}.nii.gz")
        direct = explain_volume(model, vol, PREPROCESS, target_layer="features",
                                forward_kwargs={"clinical": torch.tensor([clinical])})
        without = explain_volume(model, vol, PREPROCESS, target_layer="features",
                                 forward_kwargs={"clinical": torch.zeros(1, 2)})
        logged = by_case[f"s{i}"]["logits"]
        logged = [float(v) for v in (logged.split(";") if isinstance(logged, str) else logged)]
        torch.testing.assert_close(torch.tensor(logged), direct.logits, atol=1e-5, rtol=0)
        # the model's own arithmetic: the clinical vector adds 2 * c_k to logit k
        torch.testing.assert_close(direct.logits - without.logits, 2 * torch.tensor(clinical), atol=1e-5, rtol=0)


def test_changed_csv_input_is_recomputed_on_resume(tmp_path):
    cfg, cohort = _cohort(tmp_path, ["0.5;-1.0"])
    out = tmp_path / "out"
    args = ["explain", "--config", str(cfg), "--input", str(cohort), "--output", str(out), "--quiet"]
    assert main(args) == 0
    first = (out / "s0" / ".medcam3d-done.json").read_text()
    cohort.write_text("path,input.clinical\nscans/s0.nii.gz,1.5;-1.0\n")
    assert main(args) == 0
    assert (out / "s0" / ".medcam3d-done.json").read_text() != first  # recomputed, not skipped


@pytest.mark.parametrize("cell", ["abc", "", "1;x", "nan"])
def test_bad_input_cell_is_one_line_and_writes_nothing(tmp_path, capsys, cell):
    cfg, cohort = _cohort(tmp_path, [cell])
    out = tmp_path / "out"
    code = main(["explain", "--config", str(cfg), "--input", str(cohort), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "input.clinical must be a finite number" in err[0], err
    assert not out.exists()


def test_bad_input_column_name_is_refused(tmp_path, capsys):
    cfg, cohort = _cohort(tmp_path, ["1.0;1.0"])
    cohort.write_text("path,input.not-a-name\nscans/s0.nii.gz,1\n")
    out = tmp_path / "out"
    assert main(["explain", "--config", str(cfg), "--input", str(cohort), "--output", str(out)]) == 2
    assert "is not input.<argument name>" in capsys.readouterr().err
    assert not out.exists()

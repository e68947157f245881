"""Masks are used and empty maps explain themselves (``medcam3d explain``).

The model (``helpers_models.BoxNet``) has known evidence: class 0 lives only in a fixed box, equal
everywhere in it, so its map's peak is the box's first voxel; class 1's evidence is all negative and
its logit is the bias. Expected scores are worked out from that geometry by hand.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from helpers_models import AFFINE, BoxNet, config_dict, write_mask, write_scan
from medcam3d.cli.main import main

SHAPE = (20, 18, 10)
BOX = [[2, 5], [2, 5], [2, 4]]  # 3 x 3 x 2 = 18 voxels of 3600
BIAS1 = 2.0
SCORE0 = 18 / 3600


def _config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(BoxNet(list(SHAPE), BOX, BIAS1).state_dict(), folder / "box.pt")
    cfg = config_dict(
        checkpoint="box.pt",
        model={"_target_": "helpers_models.BoxNet",
               "kwargs": {"shape": list(SHAPE), "box": BOX, "bias1": BIAS1}, "checkpoint": "box.pt"},
        preprocess=[{"name": "ScaleIntensityRange", "a_min": -1000, "a_max": 400, "b_min": 0.0,
                     "b_max": 1.0, "clip": True}],
    )
    (folder / "run.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return folder / "run.yaml"


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _run(cfg, inp, out, *extra) -> int:
    return main(["explain", "--config", str(cfg), "--input", str(inp), "--output", str(out),
                 "--manifest", "both", *extra])


@pytest.fixture()
def cohort(tmp_path):
    cfg = _config(tmp_path / "cfg")
    scan_a = write_scan(tmp_path / "in" / "a.nii.gz")
    scan_b = write_scan(tmp_path / "in" / "b.nii.gz", seed=1)
    hit = write_mask(tmp_path / "m" / "hit.nii.gz", SHAPE, (slice(2, 5), slice(2, 5), slice(2, 4)))
    # 4 slices past the box's first voxel along z (3 mm slices): 12 mm, beyond the 10 mm tolerance
    miss = write_mask(tmp_path / "m" / "miss.nii.gz", SHAPE, (slice(2, 5), slice(2, 5), slice(6, 8)))
    return cfg, scan_a, scan_b, hit, miss


def test_mask_scores_follow_the_geometry_and_summary_is_written(cohort, tmp_path, capsys):
    cfg, a, b, hit, miss = cohort
    table = tmp_path / "cases.csv"
    table.write_text(f"path,mask\n{a},{hit}\n{b},{miss}\n")
    out = tmp_path / "out"
    assert _run(cfg, table, out) == 0
    ra, rb = _rows(out)
    assert ra["class_names"] == ["nodule", "effusion"]
    # box == mask: peak inside, all mass inside, Draelos' fraction 1, distance 0
    assert ra["pointing"][0] is True and ra["mass_in_mask"][0] == pytest.approx(1.0)
    assert ra["inside_fraction"][0] == pytest.approx(1.0) and ra["peak_distance_mm"][0] == 0.0
    # mask 4 slices (12 mm) away: miss with 10 mm tolerance, nothing inside
    assert rb["pointing"][0] is False and rb["mass_in_mask"][0] == 0.0 and rb["inside_fraction"][0] == 0.0
    assert rb["peak_distance_mm"][0] == pytest.approx(12.0)
    # the empty class has no peak and undefined scores, not made-up ones
    assert ra["pointing"][1] is None and ra["peak_distance_mm"][1] is None
    assert ra["mass_in_mask"][1] is None
    # peak in world mm: the box's first voxel through AFFINE
    expected = AFFINE[:3, :3] @ np.array([2.0, 2.0, 2.0]) + AFFINE[:3, 3]
    np.testing.assert_allclose(ra["peak_mm"][0], expected, atol=1e-6)
    # cohort summary next to the manifest: pointing 1 and 0 -> mean 0.5
    with open(out / "summary.csv", newline="") as fh:
        summary = {(r["method"], r["class"], r["score"]): r for r in csv.DictReader(fh)}
    row = summary[("hirescam", "nodule", "pointing")]
    assert int(row["n"]) == 2 and float(row["mean"]) == 0.5 and float(row["median"]) == 0.5
    assert float(row["ci95_low"]) == 0.0 and float(row["ci95_high"]) == 1.0
    assert float(summary[("hirescam", "nodule", "peak_distance_mm")]["mean"]) == pytest.approx(6.0)
    assert ("hirescam", "effusion", "pointing") not in summary  # never defined for the empty map
    # the CSV manifest carries the same columns
    with open(out / "manifest.csv", newline="") as fh:
        crow = next(csv.DictReader(fh))
    assert crow["pointing"].split(";")[0] == "True" and crow["peak_mm"].split(";")[0].count(" ") == 2
    text = capsys.readouterr()
    assert "summary.csv" in text.out


def test_empty_map_is_flagged_with_the_bias_share(cohort, tmp_path, capsys):
    cfg, a, *_ = cohort
    out = tmp_path / "out"
    assert _run(cfg, a, out) == 0
    (row,) = _rows(out)
    # class 1: logit = BIAS1 - SCORE0, evidence = -SCORE0, so the bias is BIAS1 of it
    share = BIAS1 / (BIAS1 - SCORE0)
    assert row["bias_share"][1] == pytest.approx(share, abs=1e-4)
    assert row["evidence_sum"][1] == pytest.approx(-SCORE0, rel=1e-4)
    assert row["bias_share"][0] == pytest.approx(0.0, abs=1e-4)  # class 0: all from the map
    assert row["flags"] == [f"effusion: no positive evidence (bias {share:.0%} of logit)"]
    nii = nib.load(str(out / "a" / "a_hirescam_effusion.nii.gz"))
    assert b"no positive evidence" in nii.header["descrip"].tobytes()
    ok = nib.load(str(out / "a" / "a_hirescam_nodule.nii.gz"))
    assert b"no positive evidence" not in ok.header["descrip"].tobytes()
    ext = json.loads(nii.header.extensions[0].get_content())
    assert ext["class"]["no_positive_evidence"] is True
    assert ext["class"]["bias_part"] == pytest.approx(BIAS1, abs=1e-5)
    # one line for the case: probabilities, peak, flags
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("medcam3d: a "))
    p0, p1 = 1 / (1 + math.exp(-SCORE0)), 1 / (1 + math.exp(-(BIAS1 - SCORE0)))
    assert f"effusion P={p1:.3f} no peak" in line and f"nodule P={p0:.3f} peak (" in line
    assert "FLAGS: hirescam effusion: no positive evidence" in line
    assert line.index("effusion") < line.index("nodule")  # most probable first


@pytest.mark.parametrize("kind", ["missing", "shifted", "shape", "ct"])
def test_bad_mask_fails_the_case_and_writes_nothing(cohort, tmp_path, kind):
    cfg, a, *_ = cohort
    box = (slice(2, 5), slice(2, 5), slice(2, 4))
    m = tmp_path / "m" / "bad.nii.gz"
    if kind == "shifted":
        aff = AFFINE.copy()
        aff[0, 3] += 1.5
        write_mask(m, SHAPE, box, aff)
    elif kind == "shape":
        write_mask(m, (20, 18, 11), box)
    elif kind == "ct":
        write_scan(m)
    table = tmp_path / "cases.csv"
    table.write_text(f"path,mask\n{a},{m}\n")
    out = tmp_path / "out"
    assert _run(cfg, table, out, "--quiet") == 1
    (row,) = _rows(out)
    assert row["status"] == "failed"
    want = {"missing": "does not exist", "shifted": "another affine", "shape": "has shape",
            "ct": "is not a label image"}[kind]
    assert want in row["error"] and "mask" in row["error"]
    assert not (out / "a").exists()


def test_folder_pairs_label_images_by_name_and_skips_the_rest(cohort, tmp_path, capsys):
    cfg, *_ = cohort
    folder = tmp_path / "cohort"
    write_scan(folder / "lung1_ct.nii.gz")
    write_mask(folder / "lung1_tumor.nii.gz", SHAPE, (slice(2, 5), slice(2, 5), slice(2, 4)))
    write_mask(folder / "stray_seg.nii.gz", SHAPE, (slice(0, 3),) * 3)
    out = tmp_path / "out"
    assert _run(cfg, folder, out) == 0
    rows = _rows(out)
    assert [r["case_id"] for r in rows] == ["lung1_ct"]  # no label image explained as a CT
    assert rows[0]["mask"] == str(folder / "lung1_tumor.nii.gz") and rows[0]["pointing"][0] is True
    err = capsys.readouterr().err
    assert "paired mask lung1_tumor.nii.gz with scan lung1_ct.nii.gz" in err
    assert "skipped stray_seg.nii.gz: a label image (values 0, 1), not a CT" in err


def test_label_image_given_as_a_scan_is_refused(cohort, tmp_path):
    cfg, *_ = cohort
    lab = write_mask(tmp_path / "x" / "tumour.nii.gz", SHAPE, (slice(2, 5),) * 3)
    out = tmp_path / "out"
    assert _run(cfg, lab, out, "--quiet") == 1
    (row,) = _rows(out)
    assert row["status"] == "failed" and "is a label image" in row["error"]
    assert not (out / "tumour").exists()


def test_bootstrap_interval_agrees_with_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    from medcam3d.cli.scoring import cohort_summary

    rng = np.random.default_rng(5)
    values = rng.normal(20.0, 6.0, size=40)
    rows = [{"status": "ok", "method": "hirescam", "class_names": ["nodule"],
             "peak_distance_mm": [float(v)]} for v in values]
    (row,) = cohort_summary(rows)
    assert row["n"] == 40 and row["mean"] == pytest.approx(values.mean())
    assert row["median"] == pytest.approx(np.median(values))
    ref = scipy_stats.bootstrap((values,), np.mean, method="percentile", n_resamples=20000,
                                random_state=1).confidence_interval
    assert row["ci95_low"] == pytest.approx(ref.low, abs=0.35)
    assert row["ci95_high"] == pytest.approx(ref.high, abs=0.35)


def test_random_weights_warning_prints_once_as_one_line(tmp_path):
    import os
    import subprocess
    import sys

    from helpers_models import write_config

    cfg = write_config(tmp_path / "cfg", checkpoint=None)
    scan = write_scan(tmp_path / "in" / "s.nii.gz")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    res = subprocess.run([sys.executable, "-m", "medcam3d", "explain", "--config", str(cfg), "--input",
                          str(scan), "--output", str(tmp_path / "o"), "--allow-random-weights", "--quiet"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("RANDOM weights") == 1, res.stderr
    assert "UserWarning" not in res.stderr and "warnings.warn" not in res.stderr


def test_demo_says_where_the_lesions_are_and_gives_a_real_view_command(tmp_path, capsys):
    import shlex

    from medcam3d.cli.main import build_parser
    from medcam3d.data import demo_scan_paths

    assert main(["demo", "--output", str(tmp_path / "d"), "--quiet"]) == 0
    text = capsys.readouterr().out
    cmd = next(x for x in text.splitlines() if x.startswith("Open them with: "))
    argv = shlex.split(cmd.removeprefix("Open them with: "))
    assert argv[:2] == ["medcam3d", "view"] and "<" not in cmd
    args = build_parser().parse_args(argv[1:])
    assert Path(args.scan) == demo_scan_paths()["ct"] and len(args.maps) == 3
    assert all(Path(m).is_file() and "_hirescam_" in m for m in args.maps)
    # the nodule's extent, read independently from the mask's voxels and affine
    img = nib.load(str(demo_scan_paths()["nodule"]))
    xyz = np.argwhere(np.asarray(img.dataobj) > 0) @ img.affine[:3, :3].T + img.affine[:3, 3]
    lo, hi = xyz.min(0), xyz.max(0)
    want = f"x {lo[0]:.0f}..{hi[0]:.0f}, y {lo[1]:.0f}..{hi[1]:.0f}, z {lo[2]:.0f}..{hi[2]:.0f}"
    assert f"  nodule: {int(len(xyz))} voxels, {want}" in text


def test_explain_volume_takes_class_names_as_class_idx(tmp_path):
    import medcam3d

    scan_vol = medcam3d.load_volume(write_scan(tmp_path / "s.nii.gz"))
    net = BoxNet(list(SHAPE), BOX, BIAS1)
    names = ["nodule", "effusion"]
    by_name = medcam3d.explain_volume(net, scan_vol, target_layer="features", class_idx="effusion", class_names=names)
    by_index = medcam3d.explain_volume(net, scan_vol, target_layer="features", class_idx=[1], class_names=names)
    assert by_name.class_names == ["effusion"] and by_name.class_idx.tolist() == [1]
    assert torch.equal(by_name.logits, by_index.logits)
    mixed = medcam3d.explain_volume(net, scan_vol, target_layer="features", class_idx=["effusion", 0], class_names=names)
    assert mixed.class_names == ["effusion", "nodule"]
    with pytest.raises(medcam3d.ClassIndexError, match="'pneumothorax' is not a class name.*nodule, effusion"):
        medcam3d.explain_volume(net, scan_vol, target_layer="features", class_idx="pneumothorax", class_names=names)


def test_empty_mask_is_a_case_without_the_lesion_scores_undefined(cohort, tmp_path):
    cfg, a, *_ = cohort
    m = write_mask(tmp_path / "m" / "none.nii.gz", SHAPE, (slice(0, 0),) * 3)
    table = tmp_path / "cases.csv"
    table.write_text(f"path,mask\n{a},{m}\n")
    out = tmp_path / "out"
    assert _run(cfg, table, out, "--quiet") == 0
    (row,) = _rows(out)
    assert row["status"] == "ok"
    assert all(row[k] == [None, None] for k in ("pointing", "mass_in_mask", "inside_fraction", "peak_distance_mm"))
    assert not (out / "summary.csv").exists()  # nothing was scored

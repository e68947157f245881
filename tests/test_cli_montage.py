"""``medcam3d montage OUTPUT/`` re-renders from saved maps without the model; load_explanation reads
maps back exactly (values, affine, class records)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import yaml

from helpers_models import AFFINE, config_dict, write_checkpoint, write_mask, write_scan
from medcam3d.cli.main import main


@pytest.fixture()
def finished_run(tmp_path):
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    write_checkpoint(cfg_dir / "tiny.pt")
    cfg = cfg_dir / "run.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(output={"montage": True}, methods=["hirescam", "gradcam"])))
    scan = write_scan(tmp_path / "in" / "s.nii.gz")
    mask = write_mask(tmp_path / "in" / "m.nii.gz", (20, 18, 10), (slice(8, 12), slice(7, 11), slice(3, 7)))
    table = tmp_path / "cases.csv"
    table.write_text(f"path,mask\n{scan},{mask}\n")
    out = tmp_path / "out"
    assert main(["explain", "--config", str(cfg), "--input", str(table), "--output", str(out), "--quiet",
                 "--manifest", "both"]) == 0
    return out, scan


def test_montage_rerenders_from_saved_maps_without_the_model(finished_run, monkeypatch, capsys):
    out, _ = finished_run
    import medcam3d.spatial.explain as sx

    def boom(*a, **k):
        raise AssertionError("the model must not run")

    monkeypatch.setattr(sx, "explain_volume", boom)
    import medcam3d.spatial

    monkeypatch.setattr(medcam3d.spatial, "explain_volume", boom)
    png = out / "s" / "s_hirescam_montage.png"
    before = png.read_bytes()
    maps = sorted((out / "s").glob("*.nii.gz"))
    stamps = [p.stat().st_mtime_ns for p in maps]
    assert main(["montage", str(out), "--window", "mediastinum"]) == 0
    assert "2 written, 0 failed" in capsys.readouterr().out
    assert png.read_bytes() != before  # another window: other pixels
    assert [p.stat().st_mtime_ns for p in maps] == stamps  # maps untouched
    # the CSV manifest is enough too, and --case filters
    (out / "manifest.jsonl").unlink(missing_ok=True)
    assert main(["montage", str(out), "--case", "s", "--window", "40,400"]) == 0
    assert main(["montage", str(out), "--case", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_montage_without_manifest_is_a_usage_error(tmp_path, capsys):
    assert main(["montage", str(tmp_path)]) == 2
    assert "no manifest" in capsys.readouterr().err


def test_load_explanation_reads_maps_back_exactly(finished_run):
    import medcam3d

    out, scan = finished_run
    with pytest.raises(medcam3d.VolumeLoadError, match="several methods"):
        medcam3d.load_explanation(out / "s")
    ex = medcam3d.load_explanation(out / "s", method="hirescam")
    assert ex.class_names == ["nodule", "effusion"] and ex.method == "hirescam"
    np.testing.assert_allclose(np.asarray(ex.maps.affine), AFFINE, atol=1e-5)
    assert tuple(ex.maps.shape) == (2, *nib.load(str(scan)).shape)
    for k, name in enumerate(ex.class_names):
        img = nib.load(str(out / "s" / f"s_hirescam_{name}.nii.gz"))
        np.testing.assert_array_equal(ex.maps[k].numpy(), np.asarray(img.dataobj, dtype=np.float32))
        rec = json.loads(img.header.extensions[0].get_content())["class"]
        assert float(ex.probabilities[k]) == pytest.approx(rec["probability"])
    one = medcam3d.load_explanation(out / "s" / "s_gradcam_effusion.nii.gz")
    assert one.class_names == ["effusion"] and one.method == "gradcam"
    with pytest.raises(medcam3d.VolumeLoadError, match="not a medcam3d map"):
        medcam3d.load_explanation(scan)

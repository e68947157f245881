"""DICOM series: no silent slice loss, no needless refusals.

Built from the real JPEG 2000 series in tests/data (copied to tmp_path, then a file truncated or the
ImagePositionPatient values rewritten with pydicom). Truths: the ground-truth JSON of that series,
positions known by construction, and SimpleITK's ImageSeriesReader (GDCM) as a second reader.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medcam3d.errors import VolumeLoadError
from medcam3d.io import load_volume

DATA = Path(__file__).parent / "data" / "totalseg"
DICOM_DIR = DATA / "example_ct_dicom"
GT = json.loads((DATA / "example_ct_dicom_ground_truth.json").read_text())
SORTED = GT["files_sorted_inferior_to_superior"]  # ascending z
Z0 = GT["ipp_z_sorted"][0]


def _copy(dst: Path, names=SORTED) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(DICOM_DIR / name, dst / name)
    return dst


def _rewrite_z(dst: Path, z_of_index, names=SORTED) -> Path:
    """Copy the series with slice k (ascending) at z = z_of_index(k), written as DICOM DS strings."""
    dst.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        ds = pydicom.dcmread(DICOM_DIR / name)
        x, y, _ = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, y, f"{z_of_index(k):.2f}"]  # two decimals, as some scanners write
        ds.save_as(dst / name)
    return dst


def _load_error(path: Path) -> str:
    with pytest.raises(VolumeLoadError) as ei:
        load_volume(path)
    return str(ei.value)


# ------------------------------------------------------------------ damaged or foreign files


@pytest.mark.parametrize(
    ("label", "size"),
    [("100 bytes: before the DICM marker", 100), ("1500 bytes: inside the header", 1500)],
)
def test_truncated_last_slice_is_an_error_naming_the_file(tmp_path, label, size):
    d = _copy(tmp_path / "series")
    last = d / SORTED[-1]  # the top slice: dropping it leaves no gap in the positions
    last.write_bytes(last.read_bytes()[:size])
    msg = _load_error(d)
    assert SORTED[-1] in msg and "truncated" in msg.lower(), msg


def test_truncated_pixel_data_is_an_error_naming_the_file(tmp_path):
    d = _copy(tmp_path / "series")
    last = d / SORTED[-1]
    blob = last.read_bytes()
    last.write_bytes(blob[: len(blob) // 2])
    msg = _load_error(d)
    assert SORTED[-1] in msg


def test_dicom_marker_with_garbage_header_is_an_error(tmp_path):
    d = _copy(tmp_path / "series")
    (d / SORTED[0]).write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"garbage" * 10)
    msg = _load_error(d)
    assert SORTED[0] in msg


def test_foreign_files_are_ignored_and_listed(tmp_path):
    d = _copy(tmp_path / "series")
    (d / "README.txt").write_text("exported by PACS\n")
    (d / "README").write_text("no suffix, but plain text\n")
    (d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + b"\0" * 64)
    (d / "preview.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    # a DICOM file of another SOP class without pixels (like a DICOMDIR or a report)
    sr = pydicom.dcmread(DICOM_DIR / SORTED[0], stop_before_pixels=True)
    for tag in ("Rows", "Columns"):
        delattr(sr, tag)
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    sr.save_as(d / "report")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vol = load_volume(d)
    assert vol.shape == (1, 512, 512, 20)
    assert float(vol.double().sum()) == GT["hu_sum"]
    notes = " ".join(vol.meta["load_notes"])
    for name in ("README.txt", "README", ".DS_Store", "preview.png", "report"):
        assert name in notes
    assert any("ignored 5 file(s)" in str(w.message) for w in caught)


# ------------------------------------------------------------------ positions rounded to 0.01 mm


def test_rounded_positions_of_a_regular_series_load_with_the_fitted_step(tmp_path):
    step = 0.625
    d = _rewrite_z(tmp_path / "rounded", lambda k: Z0 + k * step)
    z = np.array([float(pydicom.dcmread(d / n, stop_before_pixels=True).ImagePositionPatient[2]) for n in SORTED])
    steps = np.round(np.diff(z), 6)
    assert set(steps) == {0.62, 0.63}  # the input really is the failing one
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0.005 mm of rounding is not worth a note
        vol = load_volume(d)
    aff = vol.affine.numpy()
    # truth by construction: slices every 0.625 mm along +z (RAS z = LPS z) from Z0
    np.testing.assert_allclose(aff[:3, 2], [0.0, 0.0, step], atol=1e-3)
    np.testing.assert_allclose(aff[2, 3], Z0, atol=0.005)
    np.testing.assert_allclose(aff[:2, :2], np.diag([-0.976562, -0.976562]), atol=1e-6)
    assert vol.meta["load_notes"] == []
    # second reader: GDCM via SimpleITK orders the slices the same way and decodes the same HU
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(d)))
    ref = sitk.GetArrayFromImage(reader.Execute())  # (z, row, column)
    np.testing.assert_array_equal(vol[0].numpy(), np.transpose(ref, (2, 1, 0)).astype(np.float32))
    assert float(vol.double().sum()) == GT["hu_sum"]


def test_rounded_positions_with_a_missing_slice_are_still_refused(tmp_path):
    names = [n for n in SORTED if n != SORTED[9]]
    ks = [k for k in range(len(SORTED)) if k != 9]
    d = tmp_path / "gap"
    d.mkdir()
    for k, name in zip(ks, names):
        ds = pydicom.dcmread(DICOM_DIR / name)
        x, y, _ = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, y, f"{Z0 + k * 0.625:.2f}"]
        ds.save_as(d / name)
    msg = _load_error(d)
    assert "1 missing slice(s)" in msg and SORTED[8] in msg and SORTED[10] in msg


def test_noticeable_deviation_loads_with_a_note(tmp_path):
    jitter = [0.0, 0.04, -0.04] * 7  # 2 % of the 2 mm step: more than rounding, less than a slice
    d = _rewrite_z(tmp_path / "jitter", lambda k: Z0 + 2.0 * k + jitter[k])
    with pytest.warns(UserWarning, match="deviate from a straight line"):
        vol = load_volume(d)
    (note,) = vol.meta["load_notes"]
    assert "least-squares step" in note
    np.testing.assert_allclose(vol.affine.numpy()[2, 2], 2.0, atol=0.005)


def test_off_line_slice_beyond_rounding_is_refused(tmp_path):
    d = _rewrite_z(tmp_path / "off", lambda k: Z0 + 2.0 * k + (0.3 if k == 12 else 0.0))  # 15 % of the step
    msg = _load_error(d)
    assert SORTED[12] in msg

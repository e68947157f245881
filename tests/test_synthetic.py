"""Synthetic chest CT: determinism, tissue HU, exact masks, presence control, NIfTI round trip."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medcam3d.errors import ExportError, InputError
from medcam3d.synthetic import (
    CLASS_NAMES,
    SyntheticChestDataset,
    make_chest_ct,
    make_dataset,
    write_case_nifti,
)

ALL_ON = {c: True for c in CLASS_NAMES}
ALL_OFF = {c: False for c in CLASS_NAMES}


def _same(a, b) -> bool:
    return (np.array_equal(a.volume, b.volume) and np.array_equal(a.affine, b.affine)
            and a.labels == b.labels and all(np.array_equal(a.masks[c], b.masks[c]) for c in CLASS_NAMES))


def test_same_seed_same_arrays_different_seed_differs():
    a, b, c = make_chest_ct(11), make_chest_ct(11), make_chest_ct(12)
    assert _same(a, b)
    assert not np.array_equal(a.volume, c.volume)
    assert a.volume.dtype == np.float32 and a.volume.shape == (64, 64, 48)
    # anatomy itself varies with the seed, not only the noise
    assert not np.array_equal(a.anatomy["lungs"], c.anatomy["lungs"])


def test_affine_is_ras_anisotropic_with_nonzero_origin():
    case = make_chest_ct(0)
    assert nib.aff2axcodes(case.affine) == ("R", "A", "S")
    assert case.spacing == (5.0, 5.0, 6.0)
    assert np.all(case.affine[:3, 3] != 0)
    big = make_chest_ct(0, shape=(80, 80, 60), spacing=(4.0, 4.0, 5.0))
    assert big.spacing == (4.0, 4.0, 5.0) and big.volume.shape == (80, 80, 60)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tissue_hu_ranges(seed):
    case = make_chest_ct(seed, present=ALL_OFF)
    v, an = case.volume, case.anatomy
    assert v[an["lungs"]].mean() < -700
    assert 0 < v[an["muscle"]].mean() < 100
    assert -150 < v[an["fat"]].mean() < -50
    assert v[an["bone"]].mean() > 300
    assert v[~an["body"]].mean() < -950  # air around the patient
    assert 0 < v[an["heart"]].mean() < 250
    # plausible body and lung sizes (mm^3): lungs 2-7 litres
    vox = np.prod(case.spacing)
    assert 2e6 < an["lungs"].sum() * vox < 7e6
    assert an["lung_left"].any() and an["lung_right"].any()
    assert not (an["lung_left"] & an["lung_right"]).any()


@pytest.mark.parametrize("seed", [3, 4, 5, 6])
def test_masks_are_exactly_the_changed_voxels(seed):
    """With identical anatomy and noise, switching one class on changes exactly its mask's voxels."""
    base = make_chest_ct(seed, present=ALL_OFF)
    for c in CLASS_NAMES:
        case = make_chest_ct(seed, present={**ALL_OFF, c: True})
        changed = case.volume != base.volume
        assert case.labels[c] == 1 and case.masks[c].dtype == np.uint8
        assert np.array_equal(changed, case.masks[c].astype(bool)), c
        assert all(not case.masks[o].any() for o in CLASS_NAMES if o != c)


@pytest.mark.parametrize("seed", [7, 8, 9, 10, 11])
def test_lesions_sit_where_they_belong(seed):
    case = make_chest_ct(seed, present=ALL_ON, noise_sd=0.0)
    lungs = case.anatomy["lungs"]
    m = {c: case.masks[c].astype(bool) for c in CLASS_NAMES}
    for c in CLASS_NAMES:
        assert m[c].any() and not (m[c] & ~lungs).any(), f"{c} outside the lungs"
    assert not (m["nodule"] & m["effusion"]).any() and not (m["nodule"] & m["consolidation"]).any()
    assert not (m["effusion"] & m["consolidation"]).any()
    # nodule and consolidation each sit in one lung
    for c in ("nodule", "consolidation"):
        assert not (m[c] & case.anatomy["lung_left"]).any() or not (m[c] & case.anatomy["lung_right"]).any()
    # effusion is dependent (posterior, y index small) and basal (lower half of the lungs)
    eff, lung_idx = np.argwhere(m["effusion"]), np.argwhere(lungs)
    assert eff[:, 1].mean() < lung_idx[:, 1].mean()
    assert eff[:, 2].mean() < np.median(lung_idx[:, 2])
    # noise-free lesion densities (the low-frequency field adds at most ~18 HU)
    v = case.volume
    assert -70 < v[m["nodule"]].mean() < 70 and v[m["nodule"]].max() < 75
    assert -25 < v[m["effusion"]].mean() < 40
    solid = m["consolidation"] & (v > -500)  # air bronchograms excluded
    assert solid.any() and -125 < v[solid].min() and v[solid].max() < 65
    assert m["consolidation"].sum() > 3 * m["nodule"].sum()


def test_present_is_respected_and_labels_match_masks():
    for seed in range(6):
        for c in CLASS_NAMES:
            for flag in (True, False):
                case = make_chest_ct(seed, shape=(48, 48, 32), present={c: flag})
                assert case.labels[c] == int(flag)
                assert case.masks[c].any() == flag
                for o in CLASS_NAMES:
                    assert case.labels[o] == int(case.masks[o].any())
    vec = make_chest_ct(1, present=ALL_ON).label_vector
    assert vec.dtype == np.float32 and vec.tolist() == [1.0, 1.0, 1.0]


def test_prevalence_is_about_one_half():
    labels = np.array([[make_chest_ct(s, shape=(32, 32, 24)).labels[c] for c in CLASS_NAMES]
                       for s in range(200)])
    rate = labels.mean(axis=0)
    assert np.all((rate > 0.38) & (rate < 0.62)), rate
    assert len({tuple(r) for r in labels}) == 8  # all label combinations occur
    none = [make_chest_ct(s, shape=(32, 32, 24), prevalence=0.0).labels for s in range(5)]
    assert all(sum(lab.values()) == 0 for lab in none)


def test_larger_grid_keeps_the_anatomy_size():
    small, big = make_chest_ct(5, present=ALL_OFF), make_chest_ct(5, shape=(96, 96, 72), present=ALL_OFF)
    lung_ml = [c.anatomy["lungs"].sum() * np.prod(c.spacing) / 1e3 for c in (small, big)]
    assert abs(lung_ml[0] - lung_ml[1]) < 0.1 * lung_ml[1]
    assert np.allclose(small.affine @ [31.5, 31.5, 23.5, 1], big.affine @ [47.5, 47.5, 35.5, 1])


def test_write_case_nifti_round_trip(tmp_path):
    case = make_chest_ct(21, present={"nodule": True, "effusion": False})
    paths = write_case_nifti(case, tmp_path / "out", "case21")
    assert set(paths) == {"ct", "labels", *CLASS_NAMES}
    ct = nib.load(paths["ct"])
    assert ct.get_data_dtype() == np.int16
    assert np.allclose(ct.affine, case.affine)
    assert int(ct.header["qform_code"]) == 1 and int(ct.header["sform_code"]) == 1
    assert np.array_equal(np.asarray(ct.dataobj), np.rint(case.volume).astype(np.int16))
    for c in CLASS_NAMES:
        img = nib.load(paths[c])
        assert img.get_data_dtype() == np.uint8 and np.allclose(img.affine, case.affine)
        assert np.array_equal(np.asarray(img.dataobj), case.masks[c])
    assert json.loads(paths["labels"].read_text())["labels"] == case.labels
    with pytest.raises(ExportError):
        write_case_nifti(case, tmp_path / "out", "case21")
    write_case_nifti(case, tmp_path / "out", "case21", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths.values())


def test_dataset_items(tmp_path):
    ds = make_dataset(5, seed=3, window=(-1000.0, 400.0))
    assert isinstance(ds, SyntheticChestDataset) and len(ds) == 5
    vol, lab, masks = ds[2]
    assert vol.shape == (1, 64, 64, 48) and vol.dtype == torch.float32
    assert 0.0 <= float(vol.min()) and float(vol.max()) <= 1.0
    assert lab.shape == (3,) and masks.shape == (3, 64, 64, 48) and masks.dtype == torch.uint8
    assert torch.equal(lab, torch.from_numpy(ds.case(2).label_vector))
    assert torch.equal(ds[2][0], vol) and not torch.equal(ds[3][0], vol)
    assert not torch.equal(make_dataset(5, seed=4)[2][0], make_dataset(5, seed=3)[2][0])
    batch = next(iter(torch.utils.data.DataLoader(make_dataset(4, shape=(32, 32, 24)), batch_size=2)))
    assert batch[0].shape == (2, 1, 32, 32, 24) and batch[1].shape == (2, 3)
    with pytest.raises(IndexError):
        ds[5]


@pytest.mark.parametrize("kwargs", [
    {"seed": -1}, {"seed": True}, {"seed": 1.5}, {"seed": 0, "shape": (64, 64)},
    {"seed": 0, "shape": (4, 64, 64)}, {"seed": 0, "spacing": (1.0, 0.0, 1.0)},
    {"seed": 0, "present": {"tumour": True}}, {"seed": 0, "present": {"nodule": "yes"}},
    {"seed": 0, "prevalence": 1.5}, {"seed": 0, "noise_sd": -1.0},
])
def test_bad_arguments_raise_input_error(kwargs):
    with pytest.raises(InputError):
        make_chest_ct(**kwargs)


def test_bad_writer_and_dataset_arguments(tmp_path):
    case = make_chest_ct(0, shape=(32, 32, 24))
    for stem in ("", "a/b", ".."):
        with pytest.raises(InputError):
            write_case_nifti(case, tmp_path, stem)
    with pytest.raises(InputError):
        write_case_nifti({"volume": case.volume}, tmp_path, "x")  # type: ignore[arg-type]
    with pytest.raises(InputError):
        make_dataset(3, colour="red")
    with pytest.raises(InputError):
        make_dataset(-1)

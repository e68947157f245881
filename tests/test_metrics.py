"""Metrics against hand-computed truths (2D and 3D, numpy and torch)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medcam3d.errors import ClassIndexError, InputError
from medcam3d.metrics import (
    deletion_auc,
    fraction_inside_allowed,
    gaussian_blur,
    insertion_auc,
    iou_at_threshold,
    mass_in_mask,
    pointing_game,
    randomisation_sanity_check,
    rankdata,
    spearman,
)


def _box_mask(shape, sl):
    m = np.zeros(shape, dtype=bool)
    m[sl] = True
    return m


# ---------------------------------------------------------------- localisation


@pytest.mark.parametrize("shape, sl", [((6, 7), np.s_[1:3, 2:5]), ((6, 7, 5), np.s_[1:3, 2:4, 1:3])])
@pytest.mark.parametrize("to_torch", [False, True])
def test_map_equal_to_mask_is_perfect(shape, sl, to_torch):
    m = _box_mask(shape, sl)
    s = m.astype(np.float32)
    s_in, m_in = (torch.from_numpy(s), torch.from_numpy(m)) if to_torch else (s, m)
    assert pointing_game(s_in, m_in) is True
    assert mass_in_mask(s_in, m_in) == 1.0
    assert iou_at_threshold(s_in, m_in) == 1.0
    assert fraction_inside_allowed(s_in, m_in) == 1.0


def test_pointing_game_hand_cases_2d():
    mask = np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=np.uint8)
    assert pointing_game(np.array([[0, 0, 0], [0, 5, 0], [0, 0, 1]]), mask)
    assert not pointing_game(np.array([[0, 0, 0], [0, 1, 0], [0, 0, 5]]), mask)
    # ties: the first maximum in C order is the guess
    assert not pointing_game(np.array([[5, 0, 0], [0, 5, 0], [0, 0, 0]]), mask)
    assert pointing_game(np.array([[0, 0, 0], [0, 5, 0], [0, 0, 5]]), mask)
    # a flat map has no peak
    assert not pointing_game(np.ones((3, 3)), mask)
    # negative maps still have a peak
    assert pointing_game(np.array([[-3, -3, -3], [-3, -1, -3], [-3, -3, -3]]), mask)


def test_pointing_game_tolerance_uses_anisotropic_spacing():
    mask = np.zeros((11, 11, 11), dtype=bool)
    mask[5, 5, 5] = True
    spacing = (1.0, 2.0, 4.0)
    peak_z = np.zeros(mask.shape)
    peak_z[5, 5, 6] = 1.0  # one voxel away along z = 4 mm
    assert not pointing_game(peak_z, mask, spacing, tolerance_mm=3.9)
    assert pointing_game(peak_z, mask, spacing, tolerance_mm=4.0)
    assert pointing_game(peak_z, mask, None, tolerance_mm=1.0)  # spacing None: voxel units
    peak_x = np.zeros(mask.shape)
    peak_x[8, 5, 5] = 1.0  # three voxels along x = 3 mm
    assert pointing_game(peak_x, mask, spacing, tolerance_mm=3.0)
    assert not pointing_game(peak_x, mask, spacing, tolerance_mm=2.99)
    peak_diag = np.zeros(mask.shape)
    peak_diag[8, 7, 5] = 1.0  # sqrt(3^2 + 4^2) = 5 mm
    assert pointing_game(peak_diag, mask, spacing, tolerance_mm=5.0)
    assert not pointing_game(peak_diag, mask, spacing, tolerance_mm=4.9)


def test_mass_in_mask_hand_values():
    s = np.array([[1.0, -2.0], [3.0, 0.0]])
    assert mass_in_mask(s, np.array([[1, 0], [0, 0]])) == pytest.approx(0.25)
    assert mass_in_mask(s, np.array([[0, 1], [1, 0]])) == pytest.approx(0.75)
    assert mass_in_mask(torch.tensor(s), torch.tensor([[0, 1], [0, 1]])) == 0.0  # negatives carry no mass
    assert math.isnan(mass_in_mask(-np.abs(s), np.array([[1, 0], [0, 0]])))
    s3 = np.zeros((2, 2, 2))
    s3[0, 0, 0], s3[1, 1, 1] = 2.0, 6.0
    assert mass_in_mask(s3, s3 == 6.0) == pytest.approx(0.75)


def test_fraction_inside_allowed_hand_values():
    s = np.array([0.0, 0.2, 0.6, 1.0, 0.8])
    allowed = np.array([0, 0, 1, 1, 0])
    # selected (n > 0.5): 0.6, 1.0 inside, 0.8 outside
    assert fraction_inside_allowed(s, allowed, threshold=0.5) == pytest.approx(2 / 3)
    assert fraction_inside_allowed(s, allowed, threshold=0.5, weighted=True) == pytest.approx(1.6 / 2.4)
    # threshold 0.1 also selects 0.2 (outside)
    assert fraction_inside_allowed(s, allowed, threshold=0.1) == pytest.approx(2 / 4)
    # nothing outside -> 1.0 (Draelos' original code returned 0 here)
    assert fraction_inside_allowed(s, np.array([0, 1, 1, 1, 1]), threshold=0.5) == 1.0
    assert fraction_inside_allowed(s, np.array([1, 1, 0, 0, 0]), threshold=0.5) == 0.0
    # normalisation: relu, minus min, divided by max (so the scale and a constant offset do not matter)
    assert fraction_inside_allowed(10 * s + 3, allowed) == fraction_inside_allowed(s, allowed)
    # nothing above threshold (zero / non-positive / flat map) -> NaN
    assert math.isnan(fraction_inside_allowed(np.zeros(5), allowed))
    assert math.isnan(fraction_inside_allowed(-s, allowed))
    vol = np.zeros((4, 4, 4))
    vol[1, 1, 1] = 1.0
    assert fraction_inside_allowed(torch.tensor(vol), torch.tensor(vol > 0)) == 1.0


def test_iou_at_threshold_hand_values():
    s = np.array([[1.0, 0.4], [0.6, 0.0]])
    mask = np.array([[1, 1], [0, 0]])
    assert iou_at_threshold(s, mask, 0.5) == pytest.approx(1 / 3)  # R = {1.0, 0.6}
    assert iou_at_threshold(2 * s, mask, 0.5) == pytest.approx(1 / 3)  # relative: scale-free
    assert iou_at_threshold(s, mask, 0.3, relative=False) == pytest.approx(2 / 3)  # R = {1, .4, .6}
    assert iou_at_threshold(s, mask, 0.0) == pytest.approx(2 / 3)  # relative 0: positive support
    assert math.isnan(iou_at_threshold(-s, mask))
    vol = np.zeros((3, 3, 3))
    vol[0, 0, :] = [1.0, 0.9, 0.1]
    m3 = np.zeros((3, 3, 3), dtype=bool)
    m3[0, 0, 0] = m3[0, 0, 1] = m3[1, 1, 1] = True
    assert iou_at_threshold(vol, m3, 0.5) == pytest.approx(2 / 3)


@pytest.mark.parametrize("fn", [pointing_game, mass_in_mask, fraction_inside_allowed, iou_at_threshold])
def test_localisation_bad_input(fn):
    s = np.random.default_rng(0).random((4, 5, 6))
    with pytest.raises(InputError, match="shape"):
        fn(s, np.ones((4, 5, 7), dtype=bool))
    with pytest.raises(InputError, match="empty"):
        fn(s, np.zeros((4, 5, 6), dtype=bool))
    with pytest.raises(InputError, match="numpy array or torch tensor"):
        fn(s.tolist(), np.ones((4, 5, 6), dtype=bool))
    with pytest.raises(InputError, match="0 and 1"):
        fn(s, np.full((4, 5, 6), 0.5))
    bad = s.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        fn(bad, np.ones((4, 5, 6), dtype=bool))


def test_bad_scalar_arguments():
    s, m = np.eye(3), np.eye(3, dtype=bool)
    with pytest.raises(InputError):
        pointing_game(s, m, spacing=(1.0,), tolerance_mm=1.0)
    with pytest.raises(InputError):
        pointing_game(s, m, spacing=(1.0, -1.0))
    with pytest.raises(InputError):
        pointing_game(s, m, tolerance_mm=-1.0)
    with pytest.raises(InputError):
        fraction_inside_allowed(s, m, threshold=1.0)
    with pytest.raises(InputError):
        iou_at_threshold(s, m, threshold=1.5)


# ---------------------------------------------------------------- rank correlation


def test_rankdata_average_ties():
    assert rankdata(np.array([10, 20, 20, 5])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert rankdata(np.array([1.0, 1.0, 1.0])).tolist() == [2.0, 2.0, 2.0]


def test_spearman_known_values():
    a = np.arange(10.0)
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ties: ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4] -> 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    expected = pytest.approx(3 / math.sqrt(10))
    assert spearman(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0])) == expected
    assert spearman(torch.tensor([[1.0, 2.0], [2.0, 3.0]]), np.array([[1, 2], [3, 4]])) == expected
    assert math.isnan(spearman(np.ones(5), a[:5]))
    with pytest.raises(InputError):
        spearman(a, a[:5])
    with pytest.raises(InputError):
        spearman(np.ones(1), np.ones(1))


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for _ in range(5):
        a = rng.integers(0, 6, size=(7, 8, 3)).astype(float)  # many ties
        b = a + rng.integers(0, 4, size=a.shape)
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a.ravel(), b.ravel())[0], abs=1e-12)


def test_randomisation_sanity_check():
    rng = np.random.default_rng(2)
    m = rng.random((5, 6, 7))
    assert randomisation_sanity_check(m, 2 * m + 1) == pytest.approx(1.0)
    assert randomisation_sanity_check(m, -m) == pytest.approx(-1.0)
    assert randomisation_sanity_check(m - 0.5, 0.5 - m, absolute=True) == pytest.approx(1.0)
    assert abs(randomisation_sanity_check(m, rng.random((5, 6, 7)))) < 0.2
    with pytest.raises(InputError):
        randomisation_sanity_check(m, m[..., :6])


# ---------------------------------------------------------------- deletion / insertion


class RegionModel(nn.Module):
    """Two outputs: logit_0 = sum of the image inside ``region`` - offset; logit_1 = 0."""

    def __init__(self, region: np.ndarray, offset: float):
        super().__init__()
        self.register_buffer("region", torch.from_numpy(region).float())
        self.offset = offset
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        s = (x * self.region).flatten(1).sum(1) - self.offset
        return torch.stack([s, torch.zeros_like(s)], dim=1)


@pytest.mark.parametrize("shape", [(12, 10), (8, 9, 7)])
def test_good_map_deletes_fast_and_inserts_fast(shape):
    rng = np.random.default_rng(3)
    region = np.zeros(shape, dtype=bool)
    region[tuple(slice(1, 4) for _ in shape)] = True
    model = RegionModel(region, offset=float(region.sum()) / 2)
    image = torch.from_numpy(np.where(region, 1.0, rng.random(shape))).float().unsqueeze(0)
    good = region + 0.01 * rng.random(shape)  # ranks the region first
    bad = -good
    kw = dict(class_idx=0, steps=10, baseline=0.0)
    d_good, d_bad = deletion_auc(model, image, good, **kw), deletion_auc(model, image, bad, **kw)
    i_good, i_bad = insertion_auc(model, image, good, **kw), insertion_auc(model, image, bad, **kw)
    assert d_good.auc < d_bad.auc - 0.3
    assert i_good.auc > i_bad.auc + 0.3
    for c in (d_good, d_bad, i_good, i_bad):
        assert c.fractions[0] == 0.0 and c.fractions[-1] == 1.0 and len(c.scores) == 11
        assert np.all(np.diff(c.fractions) > 0)
    p_image = torch.sigmoid(model(image[None])[0, 0]).item()
    p_base = torch.sigmoid(model(torch.zeros_like(image)[None])[0, 0]).item()
    assert d_good.scores[0] == pytest.approx(p_image) and d_good.scores[-1] == pytest.approx(p_base)
    assert i_good.scores[0] == pytest.approx(p_base) and i_good.scores[-1] == pytest.approx(p_image)
    assert d_good.mode == "deletion" and i_good.mode == "insertion"


def test_deletion_insertion_exact_auc_1d():
    """Model output = image sum (apply=None): scores fall linearly, AUC by trapezoids is exact."""
    def total(x):
        return x.flatten(1).sum(1, keepdim=True)

    image = np.ones(4, dtype=np.float32)
    sal = np.array([4.0, 3.0, 2.0, 1.0])
    d = deletion_auc(total, image, sal, 0, steps=4, baseline=0.0, apply=None)
    assert d.scores.tolist() == [4.0, 3.0, 2.0, 1.0, 0.0] and d.auc == pytest.approx(2.0)
    assert d.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    i = insertion_auc(total, image, sal, 0, steps=4, baseline=0.0, apply=None)
    assert i.scores.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0] and i.auc == pytest.approx(2.0)
    # ties are broken by flat index (C order): equal saliency deletes voxel 0 first
    ramp = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    t = deletion_auc(total, ramp, np.zeros(4), 0, steps=4, baseline=0.0, apply=None)
    assert t.scores.tolist() == [10.0, 9.0, 7.0, 4.0, 0.0]
    # 2 steps over 4 voxels: chunks of 2
    two = deletion_auc(total, ramp, sal, 0, steps=2, baseline=-1.0, apply=None)
    assert two.scores.tolist() == [10.0, 5.0, -4.0]


def test_batching_options_and_state():
    rng = np.random.default_rng(4)
    shape = (6, 7, 5)
    region = np.zeros(shape, dtype=bool)
    region[2:4, 2:5, 1:3] = True
    model = RegionModel(region, offset=3.0).train()
    image = torch.from_numpy(rng.normal(size=(2, *shape))).float()  # two channels
    sal = torch.from_numpy(rng.random(shape))
    one = deletion_auc(model, image, sal, 0, steps=9, batch_size=1, baseline="mean")
    calls = model.calls
    many = deletion_auc(model, image[None], sal, 0, steps=9, batch_size=4, baseline="mean")
    assert model.calls - calls == 3  # 10 images in batches of 4
    assert np.allclose(one.scores, many.scores) and one.auc == pytest.approx(many.auc)
    assert model.training  # train/eval state restored
    # every baseline kind runs; an explicit array equal to the blur gives the same curve as "blur"
    blurred = gaussian_blur(image, 5.0)
    a = insertion_auc(model, image, sal, 0, steps=5, baseline="blur")
    b = insertion_auc(model, image, sal, 0, steps=5, baseline=blurred.numpy())
    assert np.allclose(a.scores, b.scores)
    c = insertion_auc(model, image, sal, 1, steps=5, baseline=-1000.0, apply="softmax")
    p = torch.softmax(model(image[None]), dim=1)[0, 1].item()
    assert c.scores[-1] == pytest.approx(p)


def test_gaussian_blur_properties():
    x = torch.zeros(1, 21, 21)
    x[0, 10, 10] = 1.0
    y = gaussian_blur(x, (2.0, 0.0))
    assert y.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.all(y[0, :, 9] == 0) and y[0, 10, 10] < 1.0  # no blur along the second axis
    const = torch.full((2, 5, 6, 7), 3.0)
    assert torch.allclose(gaussian_blur(const, 4.0), const)  # replicate padding keeps constants


def test_perturbation_bad_input():
    sal = np.random.default_rng(5).random((4, 4, 4))
    image = torch.zeros(1, 4, 4, 4)

    def model(x):
        return x.flatten(1).sum(1, keepdim=True)

    with pytest.raises(ClassIndexError):
        deletion_auc(model, image, sal, class_idx=3)
    with pytest.raises(InputError, match="does not fit"):
        deletion_auc(model, torch.zeros(1, 4, 4, 5), sal, 0)
    with pytest.raises(InputError, match="does not fit"):
        deletion_auc(model, torch.zeros(2, 1, 4, 4, 4), sal, 0)
    with pytest.raises(InputError):
        deletion_auc(model, image, sal, 0, baseline="zeros")
    with pytest.raises(InputError, match="broadcast"):
        deletion_auc(model, image, sal, 0, baseline=np.zeros((3, 4, 4, 4)))
    with pytest.raises(InputError):
        deletion_auc(model, image, sal, 0, apply="relu")
    with pytest.raises(InputError):
        deletion_auc(model, image, sal, 0, steps=0)
    with pytest.raises(InputError):
        deletion_auc(model, image, sal, 0, steps=65)
    with pytest.raises(InputError, match=r"\(B, K\)"):
        deletion_auc(lambda x: x.flatten(1).sum(1), image, sal, 0)
    with pytest.raises(InputError):
        insertion_auc(model, image.tolist(), sal, 0)
    with pytest.raises(InputError):
        insertion_auc("model", image, sal, 0)


def test_first_max_index_is_numpys_c_order_argmax_for_every_memory_layout():
    """The peak of a map is np.argmax's first maximum in C order, whatever the array's strides
    (maps on the scan grid come Fortran-ordered); ties and NaN included."""
    from medcam3d.metrics.peak import first_max_index

    rng = np.random.default_rng(7)
    for _ in range(200):
        shape = tuple(int(s) for s in rng.integers(1, 6, size=int(rng.integers(1, 4))))
        a = rng.integers(0, 3, size=shape).astype(np.float32)  # many ties
        if rng.random() < 0.1:
            a.flat[int(rng.integers(a.size))] = np.nan
        for b in (a, np.asfortranarray(a), a[..., ::-1], np.swapaxes(a, 0, -1)):
            want = tuple(int(i) for i in np.unravel_index(int(np.argmax(b)), b.shape))
            assert first_max_index(b) == want
    with pytest.raises(ValueError, match="empty"):
        first_max_index(np.zeros((0, 3)))


@pytest.mark.parametrize("order", ["C", "F"])
def test_scores_evaluated_in_chunks_equal_their_whole_array_definitions(order, monkeypatch):
    """mass_in_mask and fraction_inside_allowed run their float64 formulas chunk by chunk (a
    full-size float32 map is never copied whole to float64); with many small chunks and both memory
    orders they equal the definitions evaluated on the whole float64 array."""
    import medcam3d.metrics._validate as validate

    monkeypatch.setattr(validate, "CHUNK", 97)  # many chunks, none aligned to a row
    rng = np.random.default_rng(11)
    s = np.asarray(rng.normal(size=(13, 11, 7)).astype(np.float32), order=order)
    m = np.asarray(rng.random((13, 11, 7)) < 0.2, order="C")
    s64 = s.astype(np.float64)
    pos = np.maximum(s64, 0.0)
    assert mass_in_mask(s, m) == pytest.approx(pos[m].sum() / pos.sum(), rel=1e-12)
    n = pos - pos.min()
    n /= n.max()
    for thr in (0.1, 0.5, 0.9):
        sel = n > thr
        want = np.count_nonzero(sel & m) / np.count_nonzero(sel)
        assert fraction_inside_allowed(s, m, threshold=thr) == pytest.approx(want, rel=1e-12)
        want_w = n[sel & m].sum() / n[sel].sum()
        assert fraction_inside_allowed(s, m, threshold=thr, weighted=True) == pytest.approx(want_w, rel=1e-12)
    with pytest.raises(InputError, match="NaN or infinite"):
        bad = s.copy()
        bad[3, 2, 1] = np.nan
        mass_in_mask(bad, m)

"""build_preprocessing / model_input: config-as-data equals hand-built MONAI, and every bad config or
step fails with a ConfigError that names where it is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from spatial_models import CHAIN, make_affine, sphere_volume

from medcam3d import ConfigError, build_preprocessing
from medcam3d.spatial import AboveThreshold, model_input


def _volume(shape=(30, 24, 12), spacing=(-0.9, 1.2, 3.0)) -> MetaTensor:
    affine = make_affine(np.diag(spacing), np.array([3.0, -4.0, 10.0]), shape)
    arr = sphere_volume(affine, shape, np.array([3.0, -4.0, 10.0]), radius=7.0, fg=300.0, bg=-1000.0)
    return MetaTensor(torch.from_numpy(arr)[None], affine=torch.as_tensor(affine))


def test_config_gives_the_same_result_as_hand_built_compose():
    vol = _volume()
    by_hand = mt.Compose(
        [
            mt.Orientation(axcodes="RAS"),
            mt.Spacing(pixdim=(2.0, 2.0, 2.0), mode="bilinear"),
            mt.ScaleIntensityRange(a_min=-1000, a_max=400, b_min=0.0, b_max=1.0, clip=True),
            mt.ResizeWithPadOrCrop(spatial_size=(40, 26, 36)),
        ]
    )
    expected = by_hand(vol.clone())
    for spec in (CHAIN, {"transforms": CHAIN}, by_hand):
        got = model_input(vol, build_preprocessing(spec))
        assert got.shape == expected.shape
        torch.testing.assert_close(got.as_tensor(), expected.as_tensor())
        torch.testing.assert_close(got.affine, expected.affine)
        assert [op["class"] for op in got.applied_operations] == [
            "Orientation",
            "SpatialResample",
            "ResizeWithPadOrCrop",
        ]
    assert len(vol.applied_operations) == 0  # the caller's volume is untouched


def test_none_and_empty_are_identity():
    vol = _volume()
    for spec in (None, []):
        x = model_input(vol, spec)
        assert torch.equal(x.as_tensor(), vol.as_tensor())
        assert torch.equal(x.affine, vol.affine)


def test_cropforeground_threshold_in_hu():
    vol = _volume()
    x = model_input(vol, [{"name": "CropForeground", "threshold": 0}])  # the sphere (300 HU) only
    inside = (vol[0] > 0).nonzero()
    extent = tuple(int(v) for v in (inside.max(0).values - inside.min(0).values + 1))
    assert tuple(x.shape[1:]) == extent
    # after a window starting at 0, the default x > 0 is allowed without a threshold
    x2 = model_input(
        vol,
        [
            {
                "name": "ScaleIntensityRange",
                "a_min": -500,
                "a_max": 500,
                "b_min": 0,
                "b_max": 1,
                "clip": True,
            },
            {"name": "CropForeground"},
        ],
    )
    assert tuple(x2.shape[1:]) == extent
    assert repr(AboveThreshold(-500)) == "AboveThreshold(-500)"


BAD_CONFIGS = [
    (
        [{"name": "Orientation", "axcodes": "RAS"}, {"name": "Spacing", "pixdim": "abc"}],
        "preprocess[1].pixdim: expected 3 numbers",
    ),
    (
        [{"name": "Spacing", "pixdim": [1, 2]}],
        "preprocess[0].pixdim: expected 3 numbers (one per spatial axis), got 2",
    ),
    ([{"name": "Spacing", "pixdim": [1, 0, 2]}], "preprocess[0].pixdim: voxel sizes must be > 0 mm"),
    ([{"name": "Spacing"}], "preprocess[0].pixdim: required by Spacing but missing"),
    (
        [{"name": "Spacing", "pixdims": 2}],
        "preprocess[0].pixdims: Spacing has no option 'pixdims'. Did you mean 'pixdim'",
    ),
    (
        [{"name": "Spacingg", "pixdim": 2}],
        "preprocess[0].name: unknown transform 'Spacingg' (not a class in monai.transforms). Did you mean 'Spacing'",
    ),
    ([{"name": "orientation", "axcodes": "RAS"}], "Did you mean 'Orientation'"),
    ([{"name": "Spacingd", "pixdim": 2}], "preprocess[0].name: 'Spacingd' is a dictionary transform"),
    ([{"pixdim": 2}], "preprocess[0].name: missing"),
    ([{"name": 3}], "preprocess[0].name: expected the name of a monai.transforms class"),
    (["Spacing"], "preprocess[0]: expected a mapping"),
    ([{"name": "Orientation", "axcodes": "RAX"}], "preprocess[0].axcodes: 'RAX' is not an orientation"),
    ([{"name": "Orientation", "axcodes": "RRS"}], "preprocess[0].axcodes"),
    (
        [{"name": "ResizeWithPadOrCrop", "spatial_size": [96, 96]}],
        "preprocess[0].spatial_size: expected 3 integers",
    ),
    (
        [{"name": "ResizeWithPadOrCrop", "spatial_size": [96, 0, 96]}],
        "preprocess[0].spatial_size: every value must be >= 1",
    ),
    (
        [{"name": "Resize", "spatial_size": [8, 8, 8], "size_mode": "bogus"}],
        "preprocess[0]: Resize(spatial_size=[8, 8, 8], size_mode='bogus') is invalid",
    ),
    (
        [{"name": "ScaleIntensityRange", "a_min": "-1000", "a_max": 400, "b_min": 0, "b_max": 1}],
        "preprocess[0].a_min: expected a number, got '-1000'",
    ),
    (
        [{"name": "ScaleIntensityRange", "a_min": 5, "a_max": 5, "b_min": 0, "b_max": 1}],
        "preprocess[0].a_max: must differ from a_min",
    ),
    (
        [{"name": "ScaleIntensityRange", "a_min": 0, "a_max": 5, "b_min": 0, "b_max": 1, "clip": "yes"}],
        "preprocess[0].clip: expected true or false",
    ),
    (
        [{"name": "CropForeground"}],
        "preprocess[0].threshold: CropForeground's default foreground test (x > 0) is wrong for CT",
    ),
    ([{"name": "CropForeground", "threshold": "air"}], "preprocess[0].threshold: expected a number"),
    ([{"name": "RandFlip", "prob": 0.5}], "preprocess[0]: RandFlip is random"),
    (
        [{"name": "GridDistortion", "num_cells": 2, "distort_steps": [[1.0] * 3] * 3}],
        "preprocess[0]: GridDistortion changes the geometry but has no inverse",
    ),
    ([{"name": "Spacing", "pixdim": 2, "lazy": True}], "preprocess[0].lazy"),
    (
        {"transforms": CHAIN, "extra": 1},
        "preprocess: expected a list of transforms or a mapping with only the key 'transforms'; unexpected key(s): extra",
    ),
    ({"steps": CHAIN}, "'transforms' is missing"),
    ({"transforms": [{"name": "Spacing", "pixdim": "x"}]}, "preprocess.transforms[0].pixdim"),
    (42, "preprocess: expected a list of transforms"),
    ([mt.Spacingd(keys="image", pixdim=2)], "preprocess[0]: Spacingd is a dictionary transform"),
    ([mt.Compose([mt.Orientation("RAS")])], "preprocess[0]: nested Compose"),
    (mt.OneOf([mt.Orientation("RAS")]), "preprocess: OneOf picks transforms at random"),
]


@pytest.mark.parametrize("spec,message", BAD_CONFIGS, ids=[m[:40] for _, m in BAD_CONFIGS])
def test_config_errors_name_the_key_path(spec, message):
    with pytest.raises(ConfigError) as info:
        build_preprocessing(spec)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_custom_key_path():
    with pytest.raises(ConfigError, match=r"^explain\.preprocess\[0\]\.pixdim"):
        build_preprocessing([{"name": "Spacing", "pixdim": None}], key="explain.preprocess")


def test_runtime_step_errors_name_the_step_and_leave_the_volume_alone():
    vol = _volume()
    before = vol.clone()

    def boom(x):
        raise RuntimeError("kaput")

    cases = [
        (
            [mt.Orientation("RAS"), boom],
            r"preprocess\[1\] \(function\) failed on a volume of shape \(1, 30, 24, 12\): RuntimeError: kaput",
        ),
        (
            [lambda x: x[:, ::2]],
            r"preprocess\[0\] \(function\) changed the grid \(shape \(30, 24, 12\) -> \(15, 24, 12\)\) but is not invertible",
        ),
        ([lambda x: x.numpy()], r"preprocess\[0\] \(function\) returned ndarray, not a MetaTensor"),
        (
            [lambda x: x[0]],
            r"preprocess\[0\] \(function\) changed the grid \(shape \(30, 24, 12\) -> \(24, 12\)\)",
        ),
    ]
    for spec, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            model_input(vol, spec)
    assert torch.equal(vol.as_tensor(), before.as_tensor()) and len(vol.applied_operations) == 0

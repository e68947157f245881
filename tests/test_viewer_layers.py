"""medcam3d.view, the npe2 reader and saving heat layers: layers, names, geometry, limits, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("qtpy")

import nibabel as nib  # noqa: E402
import torch  # noqa: E402
from monai.data import MetaTensor  # noqa: E402

import medcam3d  # noqa: E402
from medcam3d.errors import ExportError, InputError, VolumeLoadError  # noqa: E402
from medcam3d.spatial import Explanation  # noqa: E402
from medcam3d.viewer.layer_io import save_heat_layer, volume_from_layer  # noqa: E402
from medcam3d.viewer.reader import get_reader  # noqa: E402

pytestmark = pytest.mark.napari

DATA = Path(__file__).parent / "data" / "totalseg"
SHAPE = (12, 10, 8)
# anisotropic RAS grid with an origin far from 0
AFFINE = np.array([[2.0, 0, 0, -30.0], [0, 3.0, 0, 40.0], [0, 0, 5.0, -100.0], [0, 0, 0, 1]])

PLUGIN = "medcam3d-hirescam"  # npe2 plugin name = the distribution name (pyproject [project].name)


def meta_tensor(array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), affine=torch.as_tensor(affine), meta={"space": "RAS"})


def make_case(affine: np.ndarray = AFFINE, shape=SHAPE):
    """A CT in HU and a 2-class explanation: class 0 peaks (1.0) at voxel (8, 6, 4), class 1 (0.5) at (3, 2, 4)."""
    vol = np.full(shape, 40.0, np.float32)
    maps = np.zeros((2, *shape), np.float32)
    maps[0, 8, 6, 4], maps[0, 7, 6, 4] = 1.0, 0.1
    maps[1, 3, 2, 4] = 0.5
    expl = Explanation(
        maps=meta_tensor(maps, affine),
        logits=torch.tensor([1.5, -0.5]),
        probabilities=torch.sigmoid(torch.tensor([1.5, -0.5])),
        class_idx=torch.tensor([0, 2]),
        class_names=["nodule", "effusion"],
        method="hirescam",
        target_layer="features.3",
        raw=torch.empty(0),
    )
    return meta_tensor(vol[None], affine), expl


def world_affine(layer) -> np.ndarray:
    from medcam3d.viewer.geometry import layer_world_affine

    return layer_world_affine(layer)


def test_view_layers_names_geometry_and_shared_limits(make_napari_viewer):
    viewer = make_napari_viewer()
    volume, expl = make_case()
    mask = np.zeros(SHAPE, np.uint8)
    mask[7:10, 5:8, 3:6] = 1
    out = medcam3d.view(volume, expl, masks={"nodule": mask}, viewer=viewer, window="lung", threshold=0.25, opacity=0.7)
    assert out is viewer
    assert [ly.name for ly in viewer.layers] == ["CT", "nodule (hirescam)", "effusion (hirescam)", "nodule (mask)"]
    ct, nod, eff, lab = viewer.layers
    assert type(lab).__name__ == "Labels"
    assert list(ct.contrast_limits) == [-1350.0, 150.0]
    for layer in viewer.layers:  # every layer on the volume's own affine: identity scale/translate
        assert np.allclose(layer.affine.affine_matrix, AFFINE)
        assert np.allclose(layer.scale, 1) and np.allclose(layer.translate, 0)
        assert np.allclose(world_affine(layer), AFFINE)
    for heat in (nod, eff):  # shared limits: threshold x the max over BOTH classes (1.0)
        assert list(heat.contrast_limits) == pytest.approx([0.25, 1.0])
        assert heat.blending == "additive" and heat.opacity == pytest.approx(0.7)
        assert heat.colormap.colors[0, 3] == 0.0  # values at/below the lower limit add nothing
    assert np.array_equal(nod.data, expl.maps[0].numpy())
    # the voxel of the peak is at the world point the volume's affine says
    assert np.allclose(nod.data_to_world((8, 6, 4)), (AFFINE @ [8, 6, 4, 1])[:3])
    info = nod.metadata["medcam3d"]
    assert info["class_name"] == "nodule" and info["class_index"] == 0 and info["method"] == "hirescam"
    assert eff.metadata["medcam3d"]["class_index"] == 2
    assert volume_from_layer(ct) is volume


def test_view_new_viewer_opens_axial_radiological_at_the_peak(make_napari_viewer, monkeypatch):
    import napari

    made = []
    monkeypatch.setattr(napari, "Viewer", lambda *a, **k: made.append(make_napari_viewer()) or made[-1])
    volume, expl = make_case()
    viewer = medcam3d.view(volume, expl)
    assert viewer is made[0]
    assert tuple(viewer.dims.order) == (2, 1, 0)
    assert tuple(str(o.value) for o in viewer.scene.camera.orientation2d) == ("up", "left")
    peak_world = (AFFINE @ [8, 6, 4, 1])[:3]
    assert np.allclose(viewer.dims.point, peak_world)
    viewer.dims.ndisplay = 3  # 3D rendering of the same layers works
    assert viewer.dims.ndisplay == 3


def test_view_permuted_grid_shows_every_voxel_at_its_world_point(make_napari_viewer):
    aff = np.zeros((4, 4))
    aff[2, 0], aff[0, 1], aff[1, 2], aff[3, 3] = -5.0, 2.0, 3.0, 1.0
    volume, expl = make_case(aff)
    viewer = medcam3d.view(volume, expl, viewer=make_napari_viewer())
    nod = viewer.layers["nodule (hirescam)"]
    peak_display = np.unravel_index(int(np.argmax(nod.data)), nod.data.shape)
    assert np.allclose(nod.data_to_world(peak_display), (aff @ [8, 6, 4, 1])[:3])


def test_view_loads_a_path(make_napari_viewer):
    path = DATA / "example_ct_sm.nii.gz"
    viewer = medcam3d.view(path, viewer=make_napari_viewer())
    ref = medcam3d.load_volume(path)
    (ct,) = viewer.layers
    assert ct.name == "example_ct_sm"
    assert np.allclose(ct.affine.affine_matrix, ref.affine.numpy())
    assert list(ct.contrast_limits) == [-160.0, 240.0]  # auto: abdomen window W400/L40


BAD_VIEW_INPUT = [
    ({"threshold": 1.5}, InputError, "threshold=1.5"),
    ({"opacity": -0.1}, InputError, "opacity=-0.1"),
    ({"colormap": "no-such-map"}, InputError, "is not a colormap napari knows"),
    ({"window": "lungz"}, InputError, "is not a CT window preset"),
    ({"volume": np.zeros((1, 4, 4, 4))}, InputError, "bare array has no world"),
    ({"volume": "/no/such/scan.nii.gz"}, VolumeLoadError, "No such file or folder"),
    ({"explanation": "other-grid"}, InputError, "they come from another scan"),
    ({"explanation": "other-affine"}, InputError, "different affines"),
    ({"masks": {"m": np.zeros((3, 3, 3))}}, InputError, "a bare array must be on the volume's grid"),
    ({"masks": {"m": np.full(SHAPE, 0.5)}}, InputError, "non-negative integer labels"),
]


def test_view_bad_input_raises_before_adding_anything(make_napari_viewer):
    viewer = make_napari_viewer()  # one viewer for every case: each must leave it empty
    volume, expl = make_case()
    other = {"other-grid": make_case(shape=(12, 10, 9))[1], "other-affine": make_case(AFFINE @ np.diag([1, 1, 2.0, 1]))[1]}
    for kwargs, error, message in BAD_VIEW_INPUT:
        args = {"volume": volume, "explanation": expl, **kwargs}
        if isinstance(args["explanation"], str):
            args["explanation"] = other[args["explanation"]]
        with pytest.raises(error, match=message):
            medcam3d.view(args.pop("volume"), viewer=viewer, **args)
        assert len(viewer.layers) == 0, kwargs
        assert not viewer.window.dock_widgets, kwargs


# ---- reader -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["example_ct_sm.nii.gz", "example_ct_dicom"])
def test_reader_opens_ct_with_load_volume_geometry(make_napari_viewer, name):
    path = DATA / name
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin=PLUGIN)
    ref = medcam3d.load_volume(path)
    assert len(layers) == 1 and type(layers[0]).__name__ == "Image"
    layer = layers[0]
    assert layer.metadata["medcam3d"]["kind"] == "ct"
    assert np.allclose(world_affine(layer), ref.affine.numpy())
    assert np.array_equal(np.asarray(layer.data), ref.numpy()[0])  # HU, not stored values
    assert layer.colormap.name == "gray"


def test_reader_declines_what_it_cannot_read(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path)) is None  # a folder without DICOM files
    assert callable(get_reader(str(DATA / "example_ct_dicom")))
    assert callable(get_reader([str(DATA / "example_ct_sm.nii.gz"), str(DATA / "example_seg_fast" / "liver.nii.gz")]))


def test_reader_opens_medcam3d_maps_as_heat_layers(make_napari_viewer, tmp_path):
    volume, expl = make_case()
    paths = medcam3d.save_nifti(expl, tmp_path, stem="case", four_d=True)
    viewer = make_napari_viewer()
    layers = viewer.open(str(paths[0]), plugin=PLUGIN)
    assert [ly.name for ly in layers] == ["nodule (hirescam)"]
    (heat,) = layers
    assert heat.blending == "additive" and heat.metadata["medcam3d"]["kind"] == "heat"
    assert heat.metadata["medcam3d"]["target_layer"] == "features.3"
    assert np.allclose(world_affine(heat), AFFINE)
    assert list(heat.contrast_limits) == pytest.approx([0.2, 1.0])
    viewer.layers.clear()
    four = viewer.open(str(paths[-1]), plugin=PLUGIN)  # the 4D file: every class, shared limits
    assert [ly.name for ly in four] == ["nodule (hirescam)", "effusion (hirescam)"]
    assert all(list(ly.contrast_limits) == pytest.approx([0.2, 1.0]) for ly in four)
    want = expl.maps[1].numpy()  # the default storage: uint16, within half its scl_slope
    assert np.abs(np.asarray(four[1].data) - want).max() <= float(expl.maps.max()) / 131070 * 1.0001


# ---- saving a heat layer back onto the source grid ----------------------------------------------
def test_save_heat_layer_round_trips_on_a_permuted_grid(make_napari_viewer, tmp_path):
    aff = np.zeros((4, 4))
    aff[2, 0], aff[0, 1], aff[1, 2], aff[3, 3] = 5.0, -2.0, 3.0, 1.0
    aff[:3, 3] = [12.0, -7.0, 30.0]
    volume, expl = make_case(aff)
    viewer = medcam3d.view(volume, expl, viewer=make_napari_viewer())
    (path,) = save_heat_layer(viewer.layers["effusion (hirescam)"], tmp_path, stem="s")
    assert path.name == "s_hirescam_effusion.nii.gz"
    img = nib.load(path)
    assert img.shape == SHAPE
    assert np.allclose(img.affine, aff)
    assert np.array_equal(np.asarray(img.dataobj), expl.maps[1].numpy())
    # existing file without overwrite: ExportError and the file is untouched
    before = path.read_bytes()
    with pytest.raises(ExportError, match="already exist"):
        save_heat_layer(viewer.layers["effusion (hirescam)"], tmp_path, stem="s")
    assert path.read_bytes() == before
    with pytest.raises(InputError, match="is not a medcam3d heat layer"):
        save_heat_layer(viewer.layers["CT"], tmp_path / "x")
    assert not (tmp_path / "x").exists()

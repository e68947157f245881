"""The npe2 plugin as napari sees it: a valid manifest, dock widgets and sample data by plugin name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("npe2")

pytestmark = pytest.mark.napari

MANIFEST = Path(__file__).parents[1] / "medcam3d" / "viewer" / "napari.yaml"

PLUGIN = "medcam3d-hirescam"  # npe2 plugin name = the distribution name (pyproject [project].name)


def test_manifest_validates_and_imports():
    from npe2 import PluginManifest

    mf = PluginManifest.from_file(MANIFEST)
    mf.validate_imports()  # every python_name resolves
    (reader,) = mf.contributions.readers
    assert reader.accepts_directories and set(reader.filename_patterns) == {"*.nii", "*.nii.gz"}
    assert {w.display_name for w in mf.contributions.widgets} == {"Explain (HiResCAM / Grad-CAM)", "CT window"}


def test_sample_data_and_widgets_load_through_napari(make_napari_viewer):
    from medcam3d.synthetic import make_chest_ct
    from medcam3d.viewer.sample_data import SAMPLE_SEED

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "synthetic_chest_ct")
    ct = viewer.layers["synthetic chest CT"]
    case = make_chest_ct(SAMPLE_SEED, present={"nodule": True, "effusion": True, "consolidation": True})
    assert np.allclose(ct.affine.affine_matrix, case.affine)
    assert list(ct.contrast_limits) == [-1350.0, 150.0]  # a chest CT opens in the lung window
    nodule = viewer.layers["nodule (mask)"]
    assert np.array_equal(np.asarray(nodule.data) > 0, case.masks["nodule"] > 0)
    _, explain = viewer.window.add_plugin_dock_widget(PLUGIN, "Explain (HiResCAM / Grad-CAM)")
    _, window = viewer.window.add_plugin_dock_widget(PLUGIN, "CT window")
    explain.reset_choices()
    assert explain.ct_layer.value is ct
    window.reset_choices()
    window.ct_layer.value = ct
    window.window.value = "bone"
    assert list(ct.contrast_limits) == [-500.0, 1300.0]
    window.window.value = "auto"
    assert list(ct.contrast_limits) == [-1350.0, 150.0]


def test_bundled_demo_scan_sample_matches_the_shipped_files(make_napari_viewer):
    import nibabel as nib

    from medcam3d.data import demo_scan_paths

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "demo_chest_ct")
    paths = demo_scan_paths()
    ct = viewer.layers["demo chest CT"]
    src = nib.load(str(paths["ct"]))
    assert np.allclose(ct.affine.affine_matrix, src.affine, atol=1e-4)
    assert np.allclose(np.asarray(ct.data), np.asarray(src.dataobj, dtype=np.float32))
    nodule = viewer.layers["nodule (mask)"]
    assert np.array_equal(np.asarray(nodule.data) > 0, np.asarray(nib.load(str(paths["nodule"])).dataobj) > 0)


def test_manifest_name_is_the_distribution_name():
    # npe2 refuses a plugin whose manifest name differs from its package's distribution name
    import tomllib

    from npe2 import PluginManifest

    dist = tomllib.loads((MANIFEST.parents[2] / "pyproject.toml").read_text())["project"]["name"]
    assert PluginManifest.from_file(MANIFEST).name == dist == PLUGIN

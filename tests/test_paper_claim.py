"""Draelos & Carin's claim, in 3D, on the trained demo models.

(a) Flatten + FC head (MONAI Classifier): HiResCAM's signed map sums exactly to the logit minus its
    value at A = 0; after zeroing the FC weights of the cells that hold the planted effusion (the
    class this model detects best), the model provably ignores those cells, HiResCAM is exactly 0
    there, and Grad-CAM still puts mass there.
(b) GAP head (MONAI DenseNet): at the last layer HiResCAM and Grad-CAM maps are identical; at an
    earlier layer they are not.
"""

from __future__ import annotations

import copy

import nibabel as nib
import numpy as np
import pytest
import torch

from medcam3d import GradCAM, HiResCAM, completeness_gap
from medcam3d.data import demo_scan_paths
from medcam3d.models import CLASS_NAMES, GAP_EARLY_LAYER, HU_WINDOW, TARGET_LAYERS, load_demo_model
from medcam3d.models.evaluation import score_heldout, summarise
from medcam3d.synthetic import make_dataset

CLAIM = "effusion"
K = CLASS_NAMES.index(CLAIM)


@pytest.fixture(scope="module")
def demo_input() -> tuple[torch.Tensor, np.ndarray]:
    """The bundled scan as model input (it is already on the model grid) and its effusion mask."""
    paths = demo_scan_paths()
    hu = np.asarray(nib.load(str(paths["ct"])).dataobj, dtype=np.float32)
    lo, hi = HU_WINDOW
    x = torch.from_numpy(np.clip((hu - lo) / (hi - lo), 0.0, 1.0))[None, None]
    return x, np.asarray(nib.load(str(paths[CLAIM])).dataobj) > 0


@pytest.fixture(scope="module")
def flat() -> torch.nn.Module:
    return load_demo_model("flatten")


def _fc(model: torch.nn.Module) -> torch.nn.Linear:
    return model.final[1]


def test_hirescam_completeness_holds_for_flatten_head_and_gradcam_does_not(flat, demo_input) -> None:
    x, _ = demo_input
    hi = completeness_gap(HiResCAM(flat, TARGET_LAYERS["flatten"]), x, "all")
    assert hi.holds(rtol=1e-3), hi.relative_gap
    # the identity checked by hand: sum of the signed map = <W_k, A> = logit - bias
    b = _fc(flat).bias.detach()
    torch.testing.assert_close(hi.score_at_zero[0], b, rtol=0, atol=1e-5)
    gc = completeness_gap(GradCAM(flat, TARGET_LAYERS["flatten"]), x, "all")
    assert gc.relative_gap.max() > 0.05, gc.relative_gap  # Grad-CAM's map is not the computation


def test_zeroed_weights_gradcam_highlights_cells_the_model_ignores(flat, demo_input) -> None:
    x, lesion = demo_input
    model = copy.deepcopy(flat)
    layer = TARGET_LAYERS["flatten"]
    act = {}
    h = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: act.setdefault("a", o))
    with torch.no_grad():
        model(x)
    h.remove()
    c, *grid = act["a"].shape[1:]
    # feature cells that hold lesion voxels (each cell covers input/grid voxels per axis)
    cell = [n // g for n, g in zip(lesion.shape, grid)]
    hit = np.zeros(grid, dtype=bool)
    for i, j, k in np.argwhere(lesion):
        hit[i // cell[0], j // cell[1], k // cell[2]] = True
    assert hit.any()
    with torch.no_grad():
        _fc(model).weight.view(-1, c, *grid)[K][:, torch.from_numpy(hit)] = 0.0

    # the model no longer uses those cells: changing the activation there leaves the logit unchanged
    def logit_with(scale: float) -> float:
        def hook(m, i, o):
            o = o.clone()
            o[:, :, torch.from_numpy(hit)] *= scale
            return o
        hh = dict(model.named_modules())[layer].register_forward_hook(hook)
        try:
            with torch.no_grad():
                return float(model(x)[0, K])
        finally:
            hh.remove()
    assert logit_with(0.0) == pytest.approx(logit_with(5.0), abs=1e-4)

    hi = HiResCAM(model, layer)(x, class_idx=K)
    gc = GradCAM(model, layer)(x, class_idx=K)
    hit_t = torch.from_numpy(hit)
    assert torch.all(hi.raw[0, 0][hit_t] == 0.0)  # exactly zero where the weights are zero
    assert completeness_gap(HiResCAM(model, layer), x, K).holds(rtol=1e-3)
    gc_pos = gc.raw[0, 0].clamp_min(0)
    assert gc_pos[hit_t].sum() > 0, "Grad-CAM puts positive mass on cells the model ignores"


def test_gap_head_last_layer_methods_coincide_earlier_layer_differs() -> None:
    model = load_demo_model("gap")
    ds = make_dataset(3, seed=5150, window=HU_WINDOW)
    x = torch.stack([ds[i][0] for i in range(3)])
    last = TARGET_LAYERS["gap"]
    a, b = HiResCAM(model, last)(x, "all"), GradCAM(model, last)(x, "all")
    torch.testing.assert_close(a.raw, b.raw, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.maps, b.maps, rtol=1e-4, atol=1e-6)
    e1, e2 = HiResCAM(model, GAP_EARLY_LAYER)(x, "all"), GradCAM(model, GAP_EARLY_LAYER)(x, "all")
    assert not torch.allclose(e1.raw, e2.raw, rtol=1e-3, atol=1e-5)


def test_table_rows_compute_and_agree_at_the_last_gap_layer() -> None:
    model = load_demo_model("gap")
    rows = score_heldout(model, TARGET_LAYERS["gap"], n=2, seed=5151, deletion_steps=4)
    summ = summarise(rows)
    assert set(summ) == {"gradcam", "hirescam"}
    for key in ("pointing", "mass_in_mask", "deletion_auc"):
        assert summ["hirescam"][key] == pytest.approx(summ["gradcam"][key], rel=1e-4, abs=1e-6)
    assert all(0.0 <= r.deletion_auc <= 1.0 for r in rows)

"""Draelos & Carin's claim measured on the AxialNet demo model: HiResCAM vs Grad-CAM at one layer.

Shared by scripts/evaluate_paper_claim.py, scripts/make_paper_claim_figure.py, notebook 02 and
tests/test_paper_claim.py, so every reported number comes from one implementation.

For the AxialNet head (per-slice FC + mean over slices, see medcam3d.models.axialnet) the score is
linear in the target activation A, so HiResCAM's signed map at that layer is the model's exact
per-location contribution to ``y_k - b_k``. The paper's direct test (Draelos & Carin 2020, Sec. 3,
"Grad-CAM can highlight regions the model did not use") then becomes a number: the share of a map's
positive mass that lies on locations whose contribution is zero or negative
(:func:`nonpositive_share`). HiResCAM's is 0 by construction; Grad-CAM's is measured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from medcam3d.engine import GradCAM, HiResCAM, completeness_gap
from medcam3d.errors import InputError
from medcam3d.metrics import deletion_auc, insertion_auc, mass_in_mask, pointing_game, spearman
from medcam3d.models.demo import CLASS_NAMES, HU_WINDOW, SPACING
from medcam3d.models.evaluation import POINTING_TOLERANCE_MM, peak_distance_mm
from medcam3d.synthetic import make_dataset

METHODS = ("hirescam", "gradcam")


def nonpositive_share(cam_raw: torch.Tensor | np.ndarray, contribution: torch.Tensor | np.ndarray) -> float:
    """Share of ``cam_raw``'s positive mass on locations where ``contribution`` <= 0.

    Definition: sum(relu(cam)[contribution <= 0]) / sum(relu(cam)), both arrays of the same shape
    (one class's signed map on the feature grid). NaN when the map has no positive mass.
    With ``contribution`` = the exact per-location contribution to the score (HiResCAM's signed map
    for a head linear in A), this is the share of a map that shows evidence the model did not use.
    """
    c = np.asarray(cam_raw.detach().cpu() if isinstance(cam_raw, torch.Tensor) else cam_raw, dtype=np.float64)
    w = np.asarray(contribution.detach().cpu() if isinstance(contribution, torch.Tensor) else contribution,
                   dtype=np.float64)
    if c.shape != w.shape:
        raise InputError(f"cam_raw {c.shape} and contribution {w.shape} must have the same shape")
    pos = np.maximum(c, 0.0)
    total = pos.sum()
    if not total > 0:
        return float("nan")
    return float(pos[w <= 0].sum() / total)


def bootstrap_ci(values: Sequence[float] | np.ndarray, stat: Callable[[np.ndarray], np.ndarray] | None = None,
                 n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(statistic, low, high): the mean (or ``stat`` over axis 1 of resamples) with a percentile bootstrap
    interval (Efron & Tibshirani 1993, ch. 13): resample the values with replacement ``n_boot`` times.

    ``values`` may be (n,) or (n, m) (rows resampled together, e.g. paired differences). NaN rows are
    dropped first. Returns NaNs when nothing is left.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v).reshape(len(v), -1).any(axis=1)] if v.size else v
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    f = stat if stat is not None else (lambda a: a.mean(axis=1))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(n_boot, len(v)))
    boots = np.asarray(f(v[idx]), dtype=np.float64)
    a = (1.0 - level) / 2.0
    point = float(np.asarray(f(v[None]), dtype=np.float64).ravel()[0])
    return point, float(np.quantile(boots, a)), float(np.quantile(boots, 1.0 - a))


@dataclass
class ClaimScore:
    """One map (one case, one present class, one method) scored for the claim table."""

    case: int
    class_name: str
    method: str
    relative_completeness_gap: float  # |sum(raw) - (y - y(A=0))| / |y - y(A=0)|
    nonpositive_share: float  # share of positive map mass where the exact contribution is <= 0
    pointing: bool  # map peak within POINTING_TOLERANCE_MM of the lesion
    mass_in_mask: float
    mask_share: float
    peak_distance_mm: float
    deletion_auc: float
    insertion_auc: float


def score_claim_case(model: nn.Module, x: torch.Tensor, masks: np.ndarray, layer: str, case: int = 0,
                     steps: int = 10) -> list[ClaimScore]:
    """Score both methods' maps of every class present in ``masks`` (K, *spatial) for input x (1, 1, *spatial).

    Deletion/insertion: ``steps`` steps, Gaussian-blur baseline (σ = 5 voxels), sigmoid probability
    (medcam3d.metrics). The exact contribution is HiResCAM's signed map (valid where the head is linear
    in the layer's activation; the relative completeness gap of each HiResCAM row says whether it is).
    """
    present = [k for k in range(masks.shape[0]) if masks[k].any()]
    if not present:
        return []
    cams = {"hirescam": HiResCAM(model, layer), "gradcam": GradCAM(model, layer)}
    res = {m: c(x, class_idx=present) for m, c in cams.items()}
    comp = {m: completeness_gap(c, x, present).relative_gap[0] for m, c in cams.items()}
    out: list[ClaimScore] = []
    for method in METHODS:
        r = res[method]
        for j, k in enumerate(present):
            m = r.maps[0, j].numpy()
            out.append(ClaimScore(
                case, CLASS_NAMES[k], method, float(comp[method][j]),
                nonpositive_share(r.raw[0, j], res["hirescam"].raw[0, j]),
                pointing_game(m, masks[k], SPACING, POINTING_TOLERANCE_MM), mass_in_mask(m, masks[k]),
                float(masks[k].mean()), peak_distance_mm(m, masks[k], np.diag([*SPACING, 1.0])),
                deletion_auc(model, x[0], m, k, steps=steps, batch_size=steps + 1).auc,
                insertion_auc(model, x[0], m, k, steps=steps, batch_size=steps + 1).auc))
    return out


def score_claim_heldout(model: nn.Module, layer: str, n: int, seed: int, steps: int = 10,
                        progress: Callable[[int], None] | None = None) -> list[ClaimScore]:
    """:func:`score_claim_case` over ``n`` generated cases (base ``seed``; positives only)."""
    ds = make_dataset(n, seed=seed, window=HU_WINDOW)
    rows: list[ClaimScore] = []
    for i in range(n):
        v, _, masks = ds[i]
        rows += score_claim_case(model, v[None], masks.numpy().astype(bool), layer, i, steps)
        if progress is not None:
            progress(i)
    return rows


#: Table columns: (field, label, higher is better?).
METRICS = (
    ("relative_completeness_gap", "completeness gap", False),
    ("nonpositive_share", "share of + mass on contribution <= 0", False),
    ("pointing", "pointing game (10 mm)", True),
    ("mass_in_mask", "mass-in-mask", True),
    ("deletion_auc", "deletion AUC", False),
    ("insertion_auc", "insertion AUC", True),
)


def summarise_claim(rows: Sequence[ClaimScore], n_boot: int = 2000, seed: int = 0) -> dict[str, dict]:
    """Per class (and "all"), per metric: each method's mean with a 95 % percentile-bootstrap interval,
    and the paired difference HiResCAM - Grad-CAM (same maps' cases) with its interval.

    Bootstrap unit: the map (for "all", maps of one case are resampled as independent rows; a case has
    at most three). Completeness gaps are summarised by their median (they are skewed).
    """
    out: dict[str, dict] = {}
    for cls in (*CLASS_NAMES, "all"):
        sel = [r for r in rows if cls == "all" or r.class_name == cls]
        hi = sorted((r for r in sel if r.method == "hirescam"), key=lambda r: (r.case, r.class_name))
        gc = sorted((r for r in sel if r.method == "gradcam"), key=lambda r: (r.case, r.class_name))
        if not hi:
            continue
        entry: dict[str, dict] = {"n_maps": len(hi)}  # type: ignore[dict-item]
        for field_name, _, _ in METRICS:
            a = np.array([float(getattr(r, field_name)) for r in hi])
            b = np.array([float(getattr(r, field_name)) for r in gc])
            stat = (lambda v: np.median(v, axis=1)) if field_name == "relative_completeness_gap" else None
            entry[field_name] = {
                "hirescam": bootstrap_ci(a, stat, n_boot, seed=seed),
                "gradcam": bootstrap_ci(b, stat, n_boot, seed=seed),
                "difference": bootstrap_ci(a - b, stat, n_boot, seed=seed),
            }
        out[cls] = entry
    return out


def randomisation_table(model: nn.Module, random_model: nn.Module, layer: str, n: int, seed: int
                        ) -> dict[str, dict[str, tuple[float, float, float]]]:
    """Model-randomisation sanity check (Adebayo et al. 2018) per method: Spearman rank correlation of
    the trained model's map with the randomised model's map of the same class and case, over the
    present classes of ``n`` generated cases (base ``seed``).

    Two variants per method, mean with 95 % bootstrap interval: "maps" (the ReLU'd maps on the input
    grid, what a user sees) and "raw" (the signed maps on the feature grid).
    """
    ds = make_dataset(n, seed=seed, window=HU_WINDOW)
    vals: dict[str, dict[str, list[float]]] = {m: {"maps": [], "raw": []} for m in METHODS}
    for i in range(n):
        v, _, masks = ds[i]
        present = [k for k in range(masks.shape[0]) if bool(masks[k].any())]
        if not present:
            continue
        for method, cam in (("hirescam", HiResCAM), ("gradcam", GradCAM)):
            a = cam(model, layer)(v[None], class_idx=present)
            b = cam(random_model, layer)(v[None], class_idx=present)
            for j in range(len(present)):
                vals[method]["maps"].append(spearman(a.maps[0, j], b.maps[0, j]))
                vals[method]["raw"].append(spearman(a.raw[0, j], b.raw[0, j]))
    return {m: {kind: bootstrap_ci(np.array(v)) for kind, v in d.items()} for m, d in vals.items()}


# ----------------------------------------------------------------------------------- planted decoy
#: Seed of the planted demonstration's case (a case with only an effusion). 3106 was used with the earlier
#: AxialNet weights; with the current ones Grad-CAM marks that copy negative, so the first of seeds 3100-3102
#: where Grad-CAM puts positive mass on the copy was taken (MODEL_CARD.md).
DECOY_SEED = 3100


@dataclass
class PlantedDecoy:
    """A synthetic case with one lesion, and the same case with a copy of that lesion planted elsewhere.

    Attributes:
        hu: float32 (x, y, z) HU volume WITH the decoy; ``hu_plain`` the same case without it, and
            ``hu_no_nodule`` the same case with neither (the generator's lesion switched off).
        x, x_plain, x_no_nodule: the three as model inputs (1, 1, x, y, z), windowed to [0, 1].
        lesion, decoy: bool (x, y, z) masks of the real lesion and of its planted copy.
        shift: voxels (dx, dy, dz) from the lesion to the decoy.
        class_name: the lesion's class (the class explained).
    """

    hu: np.ndarray
    hu_plain: np.ndarray
    hu_no_nodule: np.ndarray
    x: torch.Tensor
    x_plain: torch.Tensor
    x_no_nodule: torch.Tensor
    lesion: np.ndarray
    decoy: np.ndarray
    shift: tuple[int, int, int]
    class_name: str = "effusion"


def _window(hu: np.ndarray) -> torch.Tensor:
    lo, hi = HU_WINDOW
    return torch.from_numpy(np.clip((hu - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0))[None, None]


def plant_decoy(seed: int = DECOY_SEED, cls: str = "effusion", shift: tuple[int, int, int] | None = None
                ) -> PlantedDecoy:
    """Copy a case's ``cls`` lesion voxels (intensities and noise) into the air in front of the chest.

    The case has only that abnormality. The copy looks exactly like the lesion to the slice CNN (same
    voxels), but it sits at in-plane positions where no such lesion ever appeared in training (outside
    the body), so whether the model counts it is up to the per-slice FC weights there. ``shift``
    default: straight anterior (+y), just clear of the body, in the same axial slices.
    Raises InputError when the shifted copy would leave the volume or touch the body.
    """
    from medcam3d.synthetic import make_chest_ct

    only = {c: c == cls for c in CLASS_NAMES}
    case = make_chest_ct(seed, present=only)
    plain = make_chest_ct(seed, present={**only, cls: False})
    lesion = case.masks[cls].astype(bool)
    body = case.anatomy["body"]
    idx = np.argwhere(lesion)
    if shift is None:
        cols = body[np.unique(idx[:, 0])][:, :, np.unique(idx[:, 2])]
        front = int(np.flatnonzero(cols.any(axis=(0, 2))).max())
        shift = (0, front + 2 - int(idx[:, 1].min()), 0)
    new = idx + np.array(shift)
    if (new < 0).any() or (new >= np.array(lesion.shape)).any():
        raise InputError(f"decoy shift {shift} moves the {cls} out of the volume {lesion.shape}")
    decoy = np.zeros_like(lesion)
    decoy[tuple(new.T)] = True
    if (decoy & body).any():
        raise InputError(f"decoy shift {shift} puts the copy inside the body; choose a shift into air")
    hu = case.volume.copy()
    hu[tuple(new.T)] = case.volume[tuple(idx.T)]
    return PlantedDecoy(hu, case.volume, plain.volume, _window(hu), _window(case.volume), _window(plain.volume),
                        lesion, decoy, tuple(int(s) for s in shift), cls)  # type: ignore[arg-type]


def _cells(mask: np.ndarray, grid: tuple[int, ...]) -> torch.Tensor:
    """bool (grid) tensor: the feature cells (an exact tiling of the input by ``grid``) holding mask voxels."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return torch.nn.functional.adaptive_max_pool3d(t, grid)[0, 0] > 0


@dataclass
class DecoyReport:
    """What the model does with the decoy (by intervention) and what each map shows there.

    logit_*: score of the lesion's class for the case with decoy, without decoy, and with neither
    lesion nor decoy. ``map_share``: per method, (share of the map's positive mass within 10 mm of the
    real nodule, same near the decoy). ``decoy_contribution``: the exact summed contribution of the
    feature cells the decoy activates (HiResCAM's signed raw map there) and Grad-CAM's raw sum there.
    """

    logit_with_decoy: float
    logit_plain: float
    logit_no_nodule: float
    map_share: dict[str, tuple[float, float]]
    decoy_contribution: dict[str, float]

    @property
    def decoy_effect(self) -> float:
        """logit(with decoy) - logit(without): what adding the decoy did to the score."""
        return self.logit_with_decoy - self.logit_plain

    @property
    def lesion_effect(self) -> float:
        """logit(lesion, no decoy) - logit(neither): what the real lesion adds."""
        return self.logit_plain - self.logit_no_nodule


def decoy_report(model: nn.Module, layer: str, planted: PlantedDecoy) -> tuple[DecoyReport, dict]:
    """Explain the lesion's class on the decoy case with both methods; return the report and the two
    :class:`~medcam3d.engine.CAMResult` objects ({"hirescam": ..., "gradcam": ...})."""
    k = CLASS_NAMES.index(planted.class_name)
    with torch.no_grad():
        logits = model(torch.cat([planted.x, planted.x_plain, planted.x_no_nodule]))[:, k]
    res = {"hirescam": HiResCAM(model, layer)(planted.x, class_idx=k),
           "gradcam": GradCAM(model, layer)(planted.x, class_idx=k)}
    grid = tuple(res["hirescam"].raw.shape[2:])
    cell_lesion, cell_decoy = _cells(planted.lesion, grid), _cells(planted.decoy, grid)
    if (cell_lesion & cell_decoy).any():
        raise InputError("the decoy shares a feature cell with the nodule; choose a larger shift")
    shares = {}
    for m, r in res.items():
        pos = r.raw[0, 0].clamp_min(0).double()
        tot = float(pos.sum())
        shares[m] = (float(pos[cell_lesion].sum()) / tot, float(pos[cell_decoy].sum()) / tot) if tot > 0 \
            else (float("nan"), float("nan"))
    # feature cells whose activation the decoy changed (its footprint at the target layer)
    feats = {}

    def grab(_m, _i, o):
        feats.setdefault("with" if "with" not in feats else "plain", o.detach())

    h = model.get_submodule(layer).register_forward_hook(grab)
    try:
        with torch.no_grad():
            model(planted.x)
            model(planted.x_plain)
    finally:
        h.remove()
    changed = (feats["with"] - feats["plain"]).abs().amax(dim=1)[0] > 1e-6
    contrib = {m: float(r.raw[0, 0][changed].sum()) for m, r in res.items()}
    return DecoyReport(float(logits[0]), float(logits[1]), float(logits[2]), shares, contrib), res


def draw_decoy_figure(model: nn.Module | None = None, planted: PlantedDecoy | None = None):
    """A matplotlib figure of the planted demonstration (axial slice through the nodule and its decoy):
    CT with outlines, HiResCAM, Grad-CAM, and the model's exact signed contribution per feature cell.

    Returns (figure, :class:`DecoyReport`). ``model`` default: the shipped AxialNet demo model.
    """
    import matplotlib.pyplot as plt

    from medcam3d.models.demo import TARGET_LAYERS, load_demo_model

    model = load_demo_model("axialnet") if model is None else model
    planted = plant_decoy() if planted is None else planted
    report, res = decoy_report(model, TARGET_LAYERS["axialnet"], planted)
    z = int(np.argmax(planted.decoy.sum(axis=(0, 1))))  # the slice with most of the copy
    ct = planted.hu[:, :, z].T
    fig, ax = plt.subplots(1, 4, figsize=(17, 4.9))
    show = dict(cmap="gray", vmin=-1350, vmax=150, origin="lower")

    def outline(a):
        a.contour(planted.lesion[:, :, z].T, levels=[0.5], colors="lime", origin="lower", linewidths=1.2)
        a.contour(planted.decoy[:, :, z].T, levels=[0.5], colors="cyan", origin="lower", linewidths=1.2)

    ax[0].imshow(ct, **show)
    outline(ax[0])
    ax[0].set_title(f"CT, axial slice z = {z}\n{planted.class_name} (green), its planted copy (cyan)", fontsize=10)
    for a, m, title in ((ax[1], "hirescam", "HiResCAM"), (ax[2], "gradcam", "Grad-CAM")):
        a.imshow(ct, **show)
        hm = res[m].maps[0, 0, :, :, z].numpy().T
        a.imshow(np.ma.masked_less_equal(hm, 0), cmap="inferno", alpha=0.65, origin="lower",
                 vmin=0, vmax=float(res[m].maps[0, 0].max()))
        outline(a)
        near_l, near_d = report.map_share[m]
        a.set_title(f"{title} ({planted.class_name}): + mass in\nlesion's cells {near_l:.0%}, copy's cells {near_d:.0%}",
                    fontsize=10)
    slab = planted.hu.shape[2] // res["hirescam"].raw.shape[-1]  # input slices per feature slice
    contrib = res["hirescam"].raw[0, 0, :, :, z // slab].numpy().T
    lim = float(np.abs(contrib).max()) or 1.0
    im = ax[3].imshow(contrib, cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower",
                      extent=(-0.5, planted.hu.shape[0] - 0.5, -0.5, planted.hu.shape[1] - 0.5))
    outline(ax[3])
    ax[3].set_title("the model's exact contribution per feature cell\n(= HiResCAM's signed map; red +, blue −)",
                    fontsize=10)
    fig.colorbar(im, ax=ax[3], fraction=0.046)
    for a in ax:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(f"AxialNet demo model, {planted.class_name} logit: {report.logit_with_decoy:.2f} with the copy, "
                 f"{report.logit_plain:.2f} without it (the copy adds {report.decoy_effect:+.2f}); "
                 f"{report.logit_no_nodule:.2f} without the lesion (the lesion adds {report.lesion_effect:+.2f})",
                 fontsize=11)
    fig.tight_layout()
    return fig, report

#!/usr/bin/env python
"""Train the bundled demo classifiers on synthetic chest CT (seeded, CPU, about 10-20 min on 2 cores).

    python scripts/train_demo_model.py --models gap --steps 50 --out-dir /tmp/w   # quick try

The shipped weights came from the staged commands in medcam3d/models/MODEL_CARD.md ("How to retrain").

Every step draws a fresh batch of synthetic volumes, as twin pairs (a case and the same case with
one abnormality flipped; case seeds ``case_seed(--seed, i)``), so nothing is reused or stored.
Loss: multi-label BCE on the three abnormality labels, plus optional terms (all off by default):
a twin-pair ranking term (--pair-rank-weight), and for the gap model penalties on positive class
evidence where the class is absent (--negative-evidence-weight) and, using the exact lesion masks,
farther than one feature cell from the lesion (--outside-evidence-weight); --head-lr-mult scales the
final linear layer's learning rate. Optimiser: Adam with cosine decay. At the end
the per-class AUROC on a held-out generated set (base seed ``--val-seed``) is printed and saved
next to the weights as ``demo_training_<kind>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medcam3d.models import CLASS_NAMES, HU_WINDOW, TARGET_LAYERS, build_demo_model, per_class_auroc  # noqa: E402
from medcam3d.models.demo import WEIGHT_FILES  # noqa: E402
from medcam3d.synthetic import case_seed, make_chest_ct, make_dataset  # noqa: E402


#: Default of --flip-order: which abnormality pair i flips, FLIP_ORDER[i % len] (nodule in half the pairs).
FLIP_ORDER = (0, 1, 0, 2)


def paired_batch(seed: int, start: int, size: int, only: int | None = None,
                 flip_order: tuple[int, ...] = FLIP_ORDER) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``size`` training volumes as ``size // 2`` twin pairs: case ``case_seed(seed, i)`` as drawn,
    and the same case with ONE abnormality flipped (present <-> absent; class flip_order[i % len(flip_order)]).

    The generator changes nothing but that lesion's voxels, so each pair differs only where the
    flipped abnormality is: the loss can only be lowered by looking at it (no shortcut through
    anatomy, noise or the other lesions), which makes a 20-voxel nodule learnable in a few hundred
    CPU steps. Every label is still present with probability 1/2 and independent of the others.
    """
    vols, labels, flips, masks = [], [], [], []
    lo, hi = HU_WINDOW
    for i in range(start // 2, start // 2 + size // 2):
        s = case_seed(seed, i)
        first = make_chest_ct(s)
        flip = CLASS_NAMES[flip_order[i % len(flip_order)] if only is None else only]
        twin = make_chest_ct(s, present={flip: not first.labels[flip]})
        flips.append(CLASS_NAMES.index(flip))
        for case in (first, twin):
            v = np.clip((case.volume - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)
            vols.append(torch.from_numpy(v[None]))
            labels.append(torch.from_numpy(case.label_vector))
            masks.append(torch.from_numpy(case.mask_stack))
    return torch.stack(vols), torch.stack(labels), torch.tensor(flips), torch.stack(masks)


def pair_rank_loss(logits: torch.Tensor, labels: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Mean softplus(-(logit with - logit without)) of each twin pair's flipped class.

    The twins differ only at the flipped lesion, so this pushes exactly the evidence that the lesion
    adds (the same signal BCE sees, without the other cases' and the bias's share of the gradient).
    """
    a, b = logits[0::2], logits[1::2]
    rows = torch.arange(len(flips))
    sign = labels[0::2][rows, flips] - labels[1::2][rows, flips]  # +1 if the first twin has it
    return F.softplus(-sign * (a[rows, flips] - b[rows, flips])).mean()


def cell_evidence(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, K, *S) evidence of each class per cell for features (B, C, *S) feeding a GAP + linear head
    with ``weight`` (K, C): the logit is its spatial mean plus the bias (and, up to the 1/cells
    factor, it is the HiResCAM map at that layer)."""
    return torch.einsum("bc...,kc->bk...", features, weight)


def axial_cell_evidence(features: torch.Tensor, fc: torch.nn.Conv3d) -> torch.Tensor:
    """(B, K, h, w, Z) evidence of each class per cell for AxialNet features (B, C, h, w, Z) feeding its
    per-slice FC ``fc`` (weight (K, C, h, w, 1)): a slice's score is its sum over (h, w) plus the bias,
    the logit the mean of those over z (so, up to the 1/Z factor, it is the HiResCAM map at that layer)."""
    return torch.einsum("bchwz,kchw->bkhwz", features, fc.weight[..., 0])


def negative_evidence(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      cam: torch.Tensor | None = None) -> torch.Tensor:
    """Mean positive class evidence per cell, over the (case, class) pairs whose label is 0.

    Penalising it asks the model to keep normal anatomy evidence-free and to put its baseline in the
    bias: a case then scores high only where a lesion adds evidence. Where that evidence sits is still
    up to the model (a large receptive field can carry it far from the lesion): see outside_evidence.
    ``cam`` (B, K, *cells), when given, is the per-cell evidence itself (AxialNet: axial_cell_evidence).
    """
    cam = (cell_evidence(features, weight) if cam is None else cam).flatten(2)  # (B, K, cells)
    neg = labels < 0.5
    if not neg.any():
        return features.new_zeros(())
    return F.relu(cam[neg]).mean()


def outside_evidence(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     masks: torch.Tensor, margin_cells: int = 1, cam: torch.Tensor | None = None) -> torch.Tensor:
    """Mean positive class evidence in cells farther than ``margin_cells`` from the class's lesion,
    over the (case, class) pairs whose label is 1 (the training masks are exact, see medcam3d.synthetic).
    ``cam``: as in negative_evidence.
    """
    cam = cell_evidence(features, weight) if cam is None else cam
    near = F.adaptive_max_pool3d(masks.float(), cam.shape[2:])
    if margin_cells > 0:
        near = F.max_pool3d(near, 2 * margin_cells + 1, stride=1, padding=margin_cells)
    pos = labels > 0.5
    if not pos.any():
        return features.new_zeros(())
    return (F.relu(cam) * (1.0 - near))[pos].mean()


def batch(ds, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Items start .. start+size-1 of ``ds`` stacked as (B, 1, X, Y, Z) and (B, K)."""
    items = [ds[i] for i in range(start, start + size)]
    return torch.stack([v for v, _, _ in items]), torch.stack([y for _, y, _ in items])


@torch.no_grad()
def predict(model: torch.nn.Module, ds, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid probabilities (N, K) and labels (N, K) of the whole dataset."""
    model.eval()
    probs, labels = [], []
    for s in range(0, len(ds), batch_size):
        x, y = batch(ds, s, min(batch_size, len(ds) - s))
        probs.append(torch.sigmoid(model(x)).numpy())
        labels.append(y.numpy())
    return np.concatenate(probs), np.concatenate(labels)


class TiedPlusFree(torch.nn.Module):
    """Parametrisation of AxialNet's per-slice FC weight during training: W[k, c, i, j] = t[k, c] / (h w) + V.

    ``t`` (K, C) is shared by all in-plane positions and scaled like a global-average-pool head, so it
    learns which channels are evidence at a GAP head's pace; V (the layer's own weight, per position)
    learns where. Why: with Adam every weight moves about lr per step, and a per-position head has
    h*w*C weights all pushing the score the same way (features are >= 0), so a learning rate that
    lets a lesion's few cells gain weight makes the score swing by lr * h*w*C per step. After training
    the sum is folded into the plain weight (:func:`fold_tied_head`); the shipped model has no trace of it.
    """

    def __init__(self, classes: int, channels: int, cells: int) -> None:
        super().__init__()
        self.tied = torch.nn.Parameter(torch.zeros(classes, channels))
        self.cells = cells

    def forward(self, free: torch.Tensor) -> torch.Tensor:
        return free + (self.tied / self.cells)[:, :, None, None, None]


def fold_tied_head(model: torch.nn.Module) -> None:
    """Replace a TiedPlusFree-parametrised slice_fc weight by its value (a plain Conv3d again)."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(model.slice_fc, "weight"):
        parametrize.remove_parametrizations(model.slice_fc, "weight", leave_parametrized=True)


def head_parameters(model: torch.nn.Module, kind: str) -> list[torch.nn.Parameter]:
    """The final linear layer's parameters (the classification head)."""
    head = {"gap": lambda: model.class_layers.out, "flatten": lambda: model.final,  # DenseNet / Classifier
            "axialnet": lambda: model.slice_fc}[kind]()
    return list(head.parameters())


def train_one(kind: str, args: argparse.Namespace, out_dir: Path) -> dict:
    """Train one demo model, save its state_dict, return a summary dict."""
    torch.manual_seed(args.seed)
    if kind == "axialnet" and (args.axial_channels or args.axial_strides):
        from medcam3d.models import AXIAL_KWARGS, AxialNet

        kw = dict(AXIAL_KWARGS)
        if args.axial_channels:
            kw["channels"] = tuple(int(v) for v in args.axial_channels.split(","))
        if args.axial_strides:
            kw["strides"] = tuple(int(v) for v in args.axial_strides.split(","))
        model = AxialNet(**kw)  # a variant; the shipped one is AXIAL_KWARGS (set it to the variant kept)
    else:
        model = build_demo_model(kind)
    if args.init is not None:  # fine-tune: start from an earlier stage's weights
        model.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
    elif kind == "axialnet" and args.zero_head:
        # the per-slice FC has a weight per position: random initial weights only add noise to the score
        torch.nn.init.zeros_(model.slice_fc.weight)
    tied: list[torch.nn.Parameter] = []
    if kind == "axialnet" and args.tied_head_lr_mult > 0:
        from torch.nn.utils import parametrize

        k, c, h, w, _ = model.slice_fc.weight.shape
        parametrize.register_parametrization(model.slice_fc, "weight", TiedPlusFree(k, c, h * w))
        tied = [model.slice_fc.parametrizations.weight[0].tied]
    n_params = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in tied)
    head = [p for p in head_parameters(model, kind) if all(p is not t for t in tied)]
    body = [p for p in model.parameters() if all(p is not h for h in head + tied)]
    # a GAP head divides each cell's evidence by the number of cells (16*16*12 for the gap model), so a
    # lesion covering one cell moves the logit only if the head weights grow large: they get a larger
    # learning rate (and no weight decay) instead of waiting thousands of steps
    opt = torch.optim.Adam([{"params": body, "lr": args.lr, "weight_decay": args.weight_decay},
                            {"params": head, "lr": args.lr * args.head_lr_mult, "weight_decay": 0.0}]
                           + ([{"params": tied, "lr": args.lr * args.tied_head_lr_mult, "weight_decay": 0.0}]
                              if tied else []))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    t0 = time.perf_counter()
    run = np.zeros(len(CLASS_NAMES))
    class_weights = torch.tensor([float(w) for w in args.class_weights.split(",")])
    phase1_weights = torch.tensor([1.0] + [args.phase1_other_weight] * (len(CLASS_NAMES) - 1))
    if class_weights.numel() != len(CLASS_NAMES) or (class_weights <= 0).any():
        raise SystemExit(f"--class-weights needs {len(CLASS_NAMES)} positive numbers, got {args.class_weights!r}")
    flip_order = tuple(int(v) for v in args.flip_order.split(","))
    if not flip_order or any(not 0 <= v < len(CLASS_NAMES) for v in flip_order):
        raise SystemExit(f"--flip-order needs class indices 0..{len(CLASS_NAMES) - 1}, got {args.flip_order!r}")
    captured: dict[str, torch.Tensor] = {}
    hook = None
    if args.negative_evidence_weight > 0 or args.outside_evidence_weight > 0:
        if kind == "flatten":
            raise SystemExit("--negative/outside-evidence-weight apply to the gap and axialnet models only")
        hook = model.get_submodule(TARGET_LAYERS[kind]).register_forward_hook(
            lambda _m, _i, out: captured.__setitem__("features", out))
    for step in range(args.steps):
        model.train()
        phase1 = step < args.nodule_phase
        x, y, flips, masks = paired_batch(args.seed, step * args.batch_size, args.batch_size, 0 if phase1 else None,
                                           flip_order)
        logits = model(x)
        per_class = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(0)
        w = phase1_weights if phase1 else class_weights
        loss = (per_class * w).sum() / w.sum()
        if args.pair_rank_weight > 0:
            loss = loss + args.pair_rank_weight * pair_rank_loss(logits, y, flips)
        if hook is not None:
            feats = captured.pop("features")
            head_w = model.class_layers.out.weight if kind == "gap" else None
            cam = axial_cell_evidence(feats, model.slice_fc) if kind == "axialnet" else None
            loss = loss + args.negative_evidence_weight * negative_evidence(feats, head_w, y, cam)
            if args.outside_evidence_weight > 0:
                loss = loss + args.outside_evidence_weight * outside_evidence(feats, head_w, y, masks, cam=cam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        pc = per_class.detach().numpy()
        run = pc if step == 0 else 0.95 * run + 0.05 * pc
        if step % 10 == 0 or step == args.steps - 1:
            print(f"[{kind}] step {step + 1}/{args.steps} BCE "
                  + " ".join(f"{c} {v:.3f}" for c, v in zip(CLASS_NAMES, run)) + " "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    train_s = time.perf_counter() - t0
    if hook is not None:
        hook.remove()
    if kind == "axialnet":
        fold_tied_head(model)
    model.eval()
    path = out_dir / WEIGHT_FILES[kind]
    torch.save({k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                for k, v in model.state_dict().items()}, path)
    val = make_dataset(args.val_n, seed=args.val_seed, window=HU_WINDOW)
    probs, labels = predict(model, val)
    aucs = per_class_auroc(probs, labels, CLASS_NAMES)
    print(f"[{kind}] held-out AUROC (n={args.val_n}, base seed {args.val_seed}): "
          + ", ".join(f"{k} {v:.3f}" for k, v in aucs.items()), flush=True)
    return {"kind": kind, "params": n_params, "weights_bytes": path.stat().st_size,
            "train_seconds": round(train_s, 1), "steps": args.steps, "batch_size": args.batch_size,
            "lr": args.lr, "init": str(args.init) if args.init else None, "nodule_phase": args.nodule_phase,
            "phase1_other_weight": args.phase1_other_weight, "class_weights": args.class_weights, "pair_rank_weight": args.pair_rank_weight,
            "negative_evidence_weight": args.negative_evidence_weight,
            "outside_evidence_weight": args.outside_evidence_weight, "head_lr_mult": args.head_lr_mult,
            "flip_order": args.flip_order, "zero_head": args.zero_head, "tied_head_lr_mult": args.tied_head_lr_mult,
            "axial_channels": args.axial_channels, "axial_strides": args.axial_strides, "train_seed": args.seed, "val_seed": args.val_seed, "val_n": args.val_n,
            "val_positives": {c: int(labels[:, k].sum()) for k, c in enumerate(CLASS_NAMES)},
            "auroc": aucs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gap,flatten", help="comma list of: gap, flatten, axialnet")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--nodule-phase", type=int, default=300,
                   help="first N steps: every pair flips the nodule and the loss weights are "
                        "(1, w, w) with w = --phase1-other-weight")
    p.add_argument("--phase1-other-weight", type=float, default=0.3,
                   help="weight of the other classes' BCE during the nodule phase (keeps their "
                        "features learning; 0 starves them)")
    p.add_argument("--class-weights", default="2,1,1",
                   help=f"BCE weight per class ({', '.join(CLASS_NAMES)}), comma-separated")
    p.add_argument("--pair-rank-weight", type=float, default=0.0,
                   help="weight of the twin-pair ranking loss (see pair_rank_loss); 0 = BCE only")
    p.add_argument("--negative-evidence-weight", type=float, default=0.0,
                   help="gap/axialnet: weight of the penalty on positive per-cell class evidence where "
                        "the class is absent (see negative_evidence); 0 = off")
    p.add_argument("--outside-evidence-weight", type=float, default=0.0,
                   help="gap/axialnet: weight of the penalty on positive class evidence farther than one "
                        "cell from the lesion's exact mask in cases that have it; 0 = off")
    p.add_argument("--head-lr-mult", type=float, default=1.0,
                   help="learning-rate multiplier of the final linear layer (see train_one)")
    p.add_argument("--flip-order", default=",".join(map(str, FLIP_ORDER)),
                   help="after the nodule phase, pair i flips class flip_order[i %% len] "
                        f"(indices into {', '.join(CLASS_NAMES)})")
    p.add_argument("--tied-head-lr-mult", type=float, default=0.0,
                   help="axialnet: train the per-slice FC weight as a position-shared part (this learning-"
                        "rate multiplier) plus a per-position part (--head-lr-mult); see TiedPlusFree; 0 = off")
    p.add_argument("--axial-channels", default="", help="axialnet variant: channels, e.g. 16,32,32")
    p.add_argument("--axial-strides", default="", help="axialnet variant: strides, e.g. 2,2,2")
    p.add_argument("--zero-head", action="store_true",
                   help="axialnet: start the per-slice FC weights at zero (not at random)")
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=1000, help="training base seed (model init + data)")
    p.add_argument("--val-seed", type=int, default=2000, help="held-out base seed")
    p.add_argument("--val-n", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--init", type=Path, default=None,
                   help="start from these weights (a state_dict from an earlier stage) instead of random")
    p.add_argument("--out-dir", type=Path, default=ROOT / "medcam3d" / "models")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for kind in [k.strip() for k in args.models.split(",") if k.strip()]:
        summary = train_one(kind, args, args.out_dir)
        report = args.out_dir / f"demo_training_{kind}.json"
        report.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {report}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""Measure the shipped demo models: held-out AUROC, HiResCAM vs Grad-CAM table, real-scan findings.

    python scripts/evaluate_demo_model.py --out docs/demo_eval.json        # everything
    python scripts/evaluate_demo_model.py --skip-table --skip-real            # AUROC only

Held-out sets are generated with base seeds disjoint from training (1000) and the training
script's validation set (2000): AUROC on ``--auroc-n`` cases of base seed ``--seed`` (3000), the
map table on the first ``--table-n`` cases of the same set. Real scans are skipped with a note when
their files are absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medcam3d.models import GAP_EARLY_LAYER, TARGET_LAYERS, load_demo_model  # noqa: E402
from medcam3d.models.evaluation import (  # noqa: E402
    heldout_auroc,
    real_scan_report,
    score_heldout,
    summarise,
)

REAL = Path("/work/shared/data/chest_ct")
#: (label, model kind, layer) rows of the HiResCAM vs Grad-CAM table.
TABLE_ROWS = (
    ("DenseNet (GAP head), last layer", "gap", TARGET_LAYERS["gap"]),
    ("DenseNet (GAP head), earlier layer", "gap", GAP_EARLY_LAYER),
    ("Classifier (flatten + FC head), last conv block", "flatten", TARGET_LAYERS["flatten"]),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=3000)
    p.add_argument("--auroc-n", type=int, default=200)
    p.add_argument("--table-n", type=int, default=16)
    p.add_argument("--deletion-steps", type=int, default=10)
    p.add_argument("--kinds", default="gap,flatten")
    p.add_argument("--real-dir", type=Path, default=REAL)
    p.add_argument("--skip-table", action="store_true")
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="write all numbers as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    models = {k: load_demo_model(k) for k in kinds}
    result: dict = {"seed": args.seed, "auroc_n": args.auroc_n, "table_n": args.table_n,
                    "deletion_steps": args.deletion_steps}
    for k, m in models.items():
        t = time.perf_counter()
        result[f"auroc_{k}"] = heldout_auroc(m, args.auroc_n, args.seed)
        print(f"AUROC {k} (n={args.auroc_n}, base seed {args.seed}): {result[f'auroc_{k}']} "
              f"[{time.perf_counter() - t:.0f} s]", flush=True)
    if not args.skip_table:
        result["table"] = []
        for label, kind, layer in TABLE_ROWS:
            if kind not in models:
                continue
            t = time.perf_counter()
            rows = score_heldout(models[kind], layer, args.table_n, args.seed,
                                 deletion_steps=args.deletion_steps)
            summ = summarise(rows)
            result["table"].append({"row": label, "kind": kind, "layer": layer, "summary": summ,
                                    "maps": [asdict(r) for r in rows]})
            print(f"{label} [{layer}] [{time.perf_counter() - t:.0f} s]", flush=True)
            for method, s in summ.items():
                print(f"  {method:8s} pointing {s['pointing']:.3f}  mass-in-mask {s['mass_in_mask']:.3f} "
                      f"(mask share {s['mask_share']:.4f})  deletion AUC {s['deletion_auc']:.3f}  "
                      f"median peak-lesion {s['median_peak_distance_mm']:.1f} mm  "
                      f"n={s['n_maps']}", flush=True)
    if not args.skip_real and "gap" in models:
        result["real"] = {}
        for name in ("lung1", "lung2"):
            ct, mask = args.real_dir / f"{name}_ct.nii.gz", args.real_dir / f"{name}_tumor.nii.gz"
            if not (ct.is_file() and mask.is_file()):
                print(f"real scan {name}: files not found under {args.real_dir}, skipped", flush=True)
                continue
            rep = real_scan_report(models["gap"], str(ct), str(mask), TARGET_LAYERS["gap"])
            result["real"][name] = rep
            print(f"real scan {name}: {json.dumps(rep, default=str)}", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

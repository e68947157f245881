#!/usr/bin/env python
"""Draw the planted demonstration: an effusion and its copy planted in front of the chest, explained by the
AxialNet demo model with HiResCAM and Grad-CAM at the same layer (docs/paper_claim_planted.png).

    python scripts/make_paper_claim_figure.py [--out docs/paper_claim_planted.png]

The copy of the effusion activates the slice CNN like the effusion does, but the per-slice FC weights
at its in-plane position give it no positive evidence: adding it does not raise the score (printed, and
in the figure title). HiResCAM shows that; Grad-CAM, whose channel weights are averages over all
positions, puts positive mass on the copy's cells.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medcam3d.models.paper_claim import draw_decoy_figure  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "paper_claim_planted.png")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    fig, report = draw_decoy_figure()
    report_class = "effusion"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(report)
    print(f"decoy effect on the {report_class} logit {report.decoy_effect:+.4f}; lesion effect {report.lesion_effect:+.4f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

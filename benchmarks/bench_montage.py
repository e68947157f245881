"""Seconds per PNG montage: the montage code before the fixed-layout rewrite against today's.

What a montage costs in ``medcam3d explain`` (the manifest's ``seconds_montage``): the per-class
:func:`map_panel` calls (peak + three slices, while each map is at hand) and one ``save_montage``
(figure, drawing, PNG). Both implementations render the same Explanation of the same scan (demo
config, HiResCAM, every class), with the same mask, in THIS process, rows interleaved round by round
(the order alternating), garbage collected between rows; medians are printed (the machine may be
shared: compare the ratio, not the seconds).

The "before" code is ``medcam3d/report/montage.py`` as it was at commit ``BASELINE`` (the last commit
before the rewrite), read with ``git show`` from this checkout and imported as a module of its own;
nothing of it is kept in the package. The PNGs of both are left in ``--keep`` when given, to look at.

    python benchmarks/bench_montage.py                                  # tests/data scans + masks
    python benchmarks/bench_montage.py --case /work/shared/data/chest_ct/lung1_ct.nii.gz \\
        /work/shared/data/chest_ct/lung1_tumor.nii.gz --keep /tmp/montages
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "627caa1"
DATA = ROOT / "tests" / "data" / "totalseg"
DEFAULT_CASES = [
    (DATA / "example_ct_sm.nii.gz", DATA / "example_seg_fast" / "liver.nii.gz"),
    (DATA / "example_ct_dicom", None),
]


def baseline_module(commit: str, tmp: Path) -> ModuleType:
    """``medcam3d/report/montage.py`` at ``commit``, imported under the name ``montage_before``."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:medcam3d/report/montage.py"],
                         check=True, capture_output=True, text=True).stdout
    path = tmp / "montage_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("montage_before", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["montage_before"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def one_montage(impl: ModuleType, volume: Any, expl: Any, mask: Any, window: Any, out: Path) -> tuple[float, float]:
    """(seconds for the K map panels, seconds for save_montage) of one montage by ``impl``."""
    affine = np.asarray(expl.maps.affine, dtype=np.float64)
    t0 = time.perf_counter()
    panels = [impl.map_panel(m, affine) for m in expl.iter_maps()]
    t1 = time.perf_counter()
    impl.save_montage(volume, expl, out, window, title=f"{out.stem}", panels=panels, mask=mask)
    return t1 - t0, time.perf_counter() - t1


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs="+", action="append", metavar=("SCAN", "MASK"),
                    help="a scan (NIfTI file or DICOM folder) and optionally its mask on the same grid")
    ap.add_argument("--config", default=str(ROOT / "sample_configs" / "demo.yaml"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--baseline", default=BASELINE, help="commit whose montage.py is 'before'")
    ap.add_argument("--keep", type=Path, help="folder to leave the before/after PNGs in")
    args = ap.parse_args(argv)

    import medcam3d
    from medcam3d.cli.scoring import load_mask
    from medcam3d.config import WINDOWS, load_run_config
    from medcam3d.report import montage as after

    cases = [(Path(c[0]), Path(c[1]) if len(c) > 1 else None) for c in args.case] if args.case else DEFAULT_CASES
    cfg = load_run_config(args.config)
    window = WINDOWS["lung"].limits
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        before = baseline_module(args.baseline, tmp)
        out_dir = args.keep or tmp
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"montage before = {args.baseline}:medcam3d/report/montage.py, after = this checkout; "
              f"median of {args.rounds} interleaved rounds, seconds per montage (K map panels + save_montage)")
        print(f"{'case':<28} {'shape':<14} {'K':>2} {'mask':>4} {'before':>8} {'after':>8} {'ratio':>6}"
              f"  {'after: panels / save':>21}  {'PNG kB before/after':>19}")
        for scan, mask_path in cases:
            volume = medcam3d.load_volume(scan)
            (expl,) = medcam3d.explain_volume(cfg.model, volume, **{**cfg.explain_kwargs(),
                                                                    "methods": ["hirescam"]}).values()
            mask = load_mask(mask_path, volume) if mask_path else None
            name = scan.name.split(".")[0]
            times: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
            for r in range(args.rounds):
                order = [("before", before), ("after", after)]
                for label, impl in order if r % 2 == 0 else order[::-1]:
                    gc.collect()
                    times[label].append(one_montage(impl, volume, expl, mask, window,
                                                    out_dir / f"{name}_{label}.png"))
            med = {k: statistics.median(a + b for a, b in v) for k, v in times.items()}
            pan = statistics.median(a for a, _ in times["after"])
            sav = statistics.median(b for _, b in times["after"])
            kb = [(out_dir / f"{name}_{k}.png").stat().st_size / 1e3 for k in ("before", "after")]
            shape = "x".join(str(s) for s in volume.shape[1:])
            print(f"{name:<28} {shape:<14} {len(expl):>2} {'yes' if mask is not None else 'no':>4} "
                  f"{med['before']:>8.3f} {med['after']:>8.3f} {med['before'] / med['after']:>5.1f}x"
                  f"  {pan:>9.3f} / {sav:<9.3f}  {kb[0]:>8.0f} / {kb[1]:<8.0f}")
        if args.keep:
            print(f"PNGs in {out_dir}")


if __name__ == "__main__":
    main()

"""Cases per minute of ``medcam3d explain`` with --workers 0 vs --workers 2 (CPU).

Writes 20 synthetic 256x256x100 chest CTs as NIfTI, then runs the CLI (in-process) on them with a
small real MONAI network (DenseNet121 with init_features 16, random weights) and 64^3 input, once
per worker setting, into fresh output folders. Prints a table.

    python benchmarks/bench_cli_workers.py [--cases 20] [--keep DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

CONFIG = {
    "model": {"name": "DenseNet121",
              "kwargs": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "init_features": 16,
                         "growth_rate": 16, "block_config": [2, 4, 6, 4]},
              "checkpoint": None},
    "preprocess": [
        {"name": "ScaleIntensityRange", "a_min": -1000, "a_max": 400, "b_min": 0.0, "b_max": 1.0, "clip": True},
        {"name": "Resize", "spatial_size": [64, 64, 64]},
    ],
    "methods": ["hirescam"],
    "class_names": ["nodule", "effusion", "consolidation"],
    "output": {"montage": False},
    "device": "cpu",
}


def write_cases(folder: Path, n: int) -> list[Path]:
    from medcam3d.synthetic import make_chest_ct, write_case_nifti

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        stem = f"bench{i:02d}"
        if not (folder / f"{stem}_ct.nii.gz").exists():
            write_case_nifti(make_chest_ct(i, shape=(256, 256, 100)), folder, stem, overwrite=True)
        paths.append(folder / f"{stem}_ct.nii.gz")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: temp)")
    args = parser.parse_args()
    from medcam3d.cli.main import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        t0 = time.perf_counter()
        scans = write_cases(work / "scans", args.cases)
        print(f"wrote/found {len(scans)} scans (256x256x100) in {time.perf_counter() - t0:.1f} s")
        cfg = work / "bench.yaml"
        cfg.write_text(yaml.safe_dump(CONFIG))
        rows = []
        for workers in (0, 2):
            out = work / f"out_w{workers}"
            start = time.perf_counter()
            code = cli(["explain", "--config", str(cfg), "--input", *map(str, scans), "--output", str(out),
                        "--workers", str(workers), "--quiet", "--overwrite", "--allow-random-weights"])
            seconds = time.perf_counter() - start
            rows.append((workers, code, seconds, len(scans) / seconds * 60))
        print(f"\n{'workers':>8} {'exit':>5} {'seconds':>9} {'cases/min':>10}")
        for workers, code, seconds, cpm in rows:
            print(f"{workers:>8} {code:>5} {seconds:>9.1f} {cpm:>10.1f}")


if __name__ == "__main__":
    main()

"""What content-based resume costs: hashing an input (medcam3d.cli.resume.input_sha256) vs
loading it (medcam3d.io.load_volume), interleaved in one process, on a real CT.

    python benchmarks/bench_resume_hash.py [--scan /work/shared/data/chest_ct/lung1_ct.nii.gz] [--repeats 5]

Prints the median seconds of each and their ratio. Every run reads the file from the page cache
after the first (as a rerun of a cohort that was just written mostly does).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main() -> None:
    from medcam3d.cli.resume import input_sha256
    from medcam3d.io import load_volume

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", type=Path, default=Path("/work/shared/data/chest_ct/lung1_ct.nii.gz"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    shape = tuple(load_volume(args.scan).shape[1:])  # warm-up and page cache
    hash_s, load_s = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        input_sha256(args.scan)
        hash_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        load_volume(args.scan)
        load_s.append(time.perf_counter() - t0)
    h, ld = statistics.median(hash_s), statistics.median(load_s)
    size = args.scan.stat().st_size if args.scan.is_file() else sum(
        p.stat().st_size for p in args.scan.iterdir() if p.is_file())
    print(f"scan {args.scan.name}: {shape} voxels, {size / 1e6:.1f} MB on disk")
    print(f"{'step':<28}{'median s':>10}{'x load':>10}")
    print(f"{'input_sha256 (full hash)':<28}{h:>10.3f}{h / ld:>10.3f}")
    print(f"{'load_volume':<28}{ld:>10.3f}{1.0:>10.3f}")


if __name__ == "__main__":
    main()

"""What a rerun over finished cases costs: wall time of the ``medcam3d explain`` command (a fresh
process, start-up included) for a full 1-case run vs a rerun of the same command over the finished
output folder, rows interleaved, median of ``--repeats``.

    python benchmarks/bench_rerun.py [--scan tests/data/totalseg/example_ct_sm.nii.gz]
                                     [--config sample_configs/demo.yaml] [--repeats 3]
                                     [--compare-checkout /path/to/older/medcam3d]

``--compare-checkout`` adds an interleaved row: the same rerun with another checkout's medcam3d on
``PYTHONPATH`` (e.g. ``git archive <commit> | tar -x -C /tmp/old``: the code before this change).

The rerun skips the case (its done-marker matches): with a config whose fingerprint can be computed
from files (medcam3d.config.digest) it builds no model. The script also says which heavy modules the
rerun still imports (``python -X importtime``), and lists the slowest imports when it takes > 1.5 s.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "monai", "nibabel", "scipy", "SimpleITK", "matplotlib")


def _explain(config: Path, scan: Path, out: Path, *extra: str, code: Path | None = None) -> tuple[float, str]:
    cmd = [sys.executable, *extra, "-m", "medcam3d", "explain", "--config", str(config), "--input", str(scan),
           "--output", str(out), "--quiet"]
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")])
    t0 = time.perf_counter()
    # run from the output's parent folder: ``-m`` puts the current folder first on sys.path
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out.parent)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout + proc.stderr


def _imports(config: Path, scan: Path, out: Path) -> list[tuple[int, str]]:
    """(cumulative microseconds, module) of every module the rerun imports (``-X importtime``)."""
    _, text = _explain(config, scan, out, "-X", "importtime")
    rows = []
    for line in text.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cumulative, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
            rows.append((int(cumulative), name))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", type=Path, default=ROOT / "tests/data/totalseg/example_ct_sm.nii.gz")
    parser.add_argument("--config", type=Path, default=ROOT / "sample_configs/demo.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare-checkout", type=Path, default=None, metavar="DIR",
                        help="another medcam3d checkout whose rerun is timed too")
    args = parser.parse_args()
    args.scan, args.config = args.scan.resolve(), args.config.resolve()
    full_s, rerun_s, other_s = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_rerun_") as tmp:
        out = Path(tmp) / "out"
        for _ in range(args.repeats):  # interleaved: full run (fresh folder), then the rerun over it
            shutil.rmtree(out, ignore_errors=True)
            seconds, _ = _explain(args.config, args.scan, out)
            full_s.append(seconds)
            seconds, text = _explain(args.config, args.scan, out)
            if "0 done, 1 skipped" not in text:
                raise SystemExit(f"the rerun did not skip the finished case:\n{text[-2000:]}")
            rerun_s.append(seconds)
            if args.compare_checkout is not None:
                seconds, text = _explain(args.config, args.scan, out, code=args.compare_checkout.resolve())
                if "0 done, 1 skipped" not in text:
                    raise SystemExit(f"the other checkout's rerun did not skip the case:\n{text[-2000:]}")
                other_s.append(seconds)
        imports = _imports(args.config, args.scan, out)
    full, rerun = statistics.median(full_s), statistics.median(rerun_s)
    print(f"medcam3d explain, {args.config.name} on {args.scan.name}, median of {args.repeats} "
          "(fresh process each, start-up included)")
    print(f"{'run':<34}{'median s':>10}{'x full':>10}")
    print(f"{'full 1-case run':<34}{full:>10.2f}{1.0:>10.3f}")
    print(f"{'rerun over the finished case':<34}{rerun:>10.2f}{rerun / full:>10.3f}")
    if other_s:
        other = statistics.median(other_s)
        print(f"{'rerun, ' + args.compare_checkout.name + ' checkout':<34}{other:>10.2f}{other / full:>10.3f}")
    names = {name for _, name in imports}
    heavy = [m for m in HEAVY if m in names]
    print(f"the rerun imports {len(names)} modules; of {', '.join(HEAVY)}: {', '.join(heavy) or 'none'}")
    if rerun > 1.5:
        print("slowest imports of the rerun (cumulative s):")
        for us, name in sorted(imports, reverse=True)[:8]:
            print(f"  {us / 1e6:6.2f}  {name}")


if __name__ == "__main__":
    main()

"""What one cohort case costs in ``medcam3d explain``, against the floor nobody can avoid.

Floor = load the scan + preprocess + one no-grad inference of the same case. A case = every method
of the config, all classes, maps mapped back and written, montage. Per case = (T(3 cases) - T(1
case)) / 2, both runs in this process (start-up, imports and model building cancel out); the three
cases are copies (symlinks) of one scan under different names. Rows are interleaved round by round
and the median is printed (the machine may be shared: compare ratios, not seconds). A second
estimate, ``stages``, is the median over the measured cases of a case's stage seconds from the
manifest (less sensitive to noise in the whole-run times; it leaves out hashing and bookkeeping).
Stage seconds are each stage's work: the montage is drawn in a background thread while the next
method's maps are written, so ``stages`` can exceed the wall time per case.

Rows per (config, scan): the floor; the CLI as shipped (uint16 maps); ``output.storage: float32``;
uint16 on a 2 mm world-aligned grid (``output.spacing_mm: 2``); and the CLI with MONAI's
step-by-step ``Compose.inverse`` forced (the reference inverse path, for the inverse stage's
before/after). Stage shares come from the manifest's ``seconds_*`` columns.

    python benchmarks/bench_cohort.py                       # tests/data CT + DICOM series, demo + DenseNet121
    python benchmarks/bench_cohort.py --scan /work/shared/data/chest_ct/lung1_ct.nii.gz --config demo
    python benchmarks/bench_cohort.py --thin /work/shared/data/chest_ct/lung1_ct.nii.gz   # memory goal
    python benchmarks/bench_cohort.py --device cuda         # everything on the GPU

``--thin SCAN`` resamples SCAN to 512x512x384 int16 (a thin-slice chest CT) in a temporary file and
measures, each in a fresh process, the peak RSS and the time of the floor and of a full case
(T(2 cases) - T(1 case)).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "totalseg"
DEFAULT_SCANS = [DATA / "example_ct_sm.nii.gz", DATA / "example_ct_dicom"]
CONFIGS = {"demo": ROOT / "sample_configs" / "demo.yaml", "densenet121": ROOT / "sample_configs" / "densenet121_3d.yaml"}
STAGES = ("load", "preprocess", "engine", "inverse", "write", "montage")


def _config(name: str, work: Path, device: str, **output) -> Path:
    src = CONFIGS[name]
    cfg = yaml.safe_load(src.read_text())
    ckpt = cfg["model"].get("checkpoint")
    if ckpt:
        cfg["model"]["checkpoint"] = str((src.parent / ckpt).resolve())
    cfg["device"] = device
    cfg["output"] = {**(cfg.get("output") or {}), **output}
    tag = "-".join(f"{k}_{v}" for k, v in output.items()) or "default"
    path = work / f"{name}-{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _copies(scan: Path, work: Path, n: int) -> list[str]:
    folder = work / f"in-{scan.name}"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        link = folder / (f"case{i}" + ("" if scan.is_dir() else "".join(scan.suffixes)))
        if not link.exists():
            link.symlink_to(scan.resolve())
        out.append(str(link))
    return out


def _run(cfg: Path, inputs: list[str], out: Path, monai_inverse: bool = False) -> tuple[float, list[dict]]:
    from medcam3d.cli.explain import ExplainOptions, run_explain

    patch = None
    if monai_inverse:  # the reference: every recorded step undone by MONAI, as before issue 13
        import medcam3d.spatial.composed as composed

        patch = composed.composed_mapping
        composed.composed_mapping = lambda *a, **k: None
    try:
        t0 = time.perf_counter()
        summary = run_explain(ExplainOptions(config=str(cfg), inputs=inputs, output=out, overwrite=True,
                                             quiet=True, allow_random_weights=True))
        seconds = time.perf_counter() - t0
    finally:
        if patch is not None:
            composed.composed_mapping = patch
    if summary.failed:
        raise SystemExit(f"a case failed: {[r['error'] for r in summary.rows if r['status'] == 'failed'][:1]}")
    return seconds, summary.rows


def _floor(cfg_path: Path, scan: str, device: str) -> float:
    """Load + preprocess + one no-grad inference of ``scan`` (the model already built)."""
    import torch

    from medcam3d.config import load_run_config
    from medcam3d.io import load_volume
    from medcam3d.spatial import build_preprocessing, model_input

    cfg = _FLOOR_CACHE.get(str(cfg_path))
    if cfg is None:
        cfg = _FLOOR_CACHE[str(cfg_path)] = load_run_config(cfg_path, allow_random_weights=True)
        cfg.model.to(device).eval()
    t0 = time.perf_counter()
    vol = load_volume(scan)
    x = model_input(vol, build_preprocessing(cfg.preprocess))
    with torch.no_grad():
        y = cfg.model(x.as_tensor()[None].to(device, torch.float32))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    float(y.sum())
    return time.perf_counter() - t0


_FLOOR_CACHE: dict = {}


def _stage_seconds(rows: list[dict]) -> dict[str, float]:
    return {s: sum(float(r.get(f"seconds_{s}") or 0.0) for r in rows if r["status"] == "ok") for s in STAGES}


def _per_case_seconds(rows: list[dict]) -> list[float]:
    """Each case's stage seconds summed over its rows (methods): the case's own time as the manifest
    records it, without the run's start-up, planning and manifest writing."""
    by_case: dict[str, float] = {}
    for r in rows:
        if r["status"] == "ok":
            by_case[r["case_id"]] = by_case.get(r["case_id"], 0.0) + sum(
                float(r.get(f"seconds_{s}") or 0.0) for s in STAGES)
    return list(by_case.values())


def bench(scans: list[Path], configs: list[str], device: str, rounds: int, work: Path) -> None:
    rows: dict[tuple, dict] = {}
    variants = [("default (uint16)", {}, False), ("float32 storage", {"storage": "float32"}, False),
                ("uint16 on a 2 mm grid", {"spacing_mm": 2.0}, False),
                ("MONAI inverse (before)", {}, True)]
    for r in range(rounds + 1):  # round 0 warms up (imports, caches); not recorded
        for cname in configs:
            for scan in scans:
                inputs = _copies(scan, work, 3)
                floor = _floor(_config(cname, work, device), inputs[0], device)
                if r:
                    rows.setdefault((cname, scan.name, "floor"), {"t": []})["t"].append(floor)
                for label, output, monai in variants:
                    cfg = _config(cname, work, device, **output)
                    t1, _ = _run(cfg, inputs[:1], work / "out1", monai)
                    t3, manifest = _run(cfg, inputs, work / "out3", monai)
                    if not r:
                        continue
                    row = rows.setdefault((cname, scan.name, label), {"t": [], "stages": [], "bytes": [], "pc": []})
                    row["t"].append((t3 - t1) / 2)
                    row["pc"].extend(_per_case_seconds(manifest))
                    row["stages"].append(_stage_seconds(manifest))
                    row["bytes"].append(sum(int(m.get("bytes_written") or 0) for m in manifest) / 3)
                print(f"round {r} {cname} {scan.name} done", file=sys.stderr, flush=True)
    print(f"\n{'config':12} {'scan':22} {'row':24} {'s/case':>7} {'x floor':>7} {'cases/min':>9} "
          f"{'MB/case':>8} {'stages':>7} {'x floor':>7}  stage shares (load/preprocess/engine/inverse/write/montage, "
          "% of the 3-case run)")
    for (cname, sname, label), row in rows.items():
        t = statistics.median(row["t"])
        floor = statistics.median(rows[(cname, sname, "floor")]["t"])
        if label == "floor":
            print(f"{cname:12} {sname:22} {label:24} {t:7.2f} {1.0:7.2f} {60 / t:9.1f} {'-':>8}")
            continue
        st = {s: statistics.median(x[s] for x in row["stages"]) for s in STAGES}
        whole = sum(st.values()) or 1.0
        shares = " / ".join(f"{100 * st[s] / whole:.0f}" for s in STAGES)
        pc = statistics.median(row["pc"])
        print(f"{cname:12} {sname:22} {label:24} {t:7.2f} {t / floor:7.2f} {60 / t:9.1f} "
              f"{statistics.median(row['bytes']) / 1e6:8.1f} {pc:7.2f} {pc / floor:7.2f}  {shares}")


def _thin_scan(src: Path, dst: Path) -> None:
    """``src`` resampled (trilinear, SimpleITK) to 512 x 512 x 384, same field of view, int16."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(src))
    size = (512, 512, 384)
    spacing = [sp * n / m for sp, n, m in zip(img.GetSpacing(), img.GetSize(), size)]
    origin = img.TransformContinuousIndexToPhysicalPoint(
        [-0.5 + 0.5 * sp / osp for sp, osp in zip(spacing, img.GetSpacing())])
    out = sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, origin, spacing, img.GetDirection(),
                        -1024, sitk.sitkInt16)
    sitk.WriteImage(out, str(dst))


_CHILD = r"""
import json, resource, sys, time
mode, cfg, scan, out, device = sys.argv[1:6]
scans = sys.argv[6:]
t0 = time.perf_counter()
if mode == "floor":
    import torch
    from medcam3d.config import load_run_config
    from medcam3d.io import load_volume
    from medcam3d.spatial import build_preprocessing, model_input
    c = load_run_config(cfg, allow_random_weights=True); c.model.to(device).eval()
    t1 = time.perf_counter()
    vol = load_volume(scan); x = model_input(vol, build_preprocessing(c.preprocess))
    with torch.no_grad():
        float(c.model(x.as_tensor()[None].to(device, torch.float32)).sum())
else:
    from medcam3d.cli.explain import ExplainOptions, run_explain
    from medcam3d.config import load_run_config
    load_run_config(cfg, allow_random_weights=True)  # imports and model build outside the timing
    t1 = time.perf_counter()
    s = run_explain(ExplainOptions(config=cfg, inputs=scans, output=out, overwrite=True, quiet=True,
                                   allow_random_weights=True))
    assert not s.failed, s.rows
t2 = time.perf_counter()
print(json.dumps({"seconds": t2 - t1, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def thin(src: Path, configs: list[str], device: str, work: Path) -> None:
    """Floor and cases on a 512x512x384 scan, each row a fresh process. A case's time is
    T(2 cases) - T(1 case) (the second case is a symlink to the first), so the once-per-run costs
    (the model's one-off receptive-field probe, first-call warm-up) cancel as in the cohort rows;
    the peak is the 2-case process's maximum RSS."""
    scan = work / "thin_512x512x384.nii.gz"
    if not scan.exists():
        _thin_scan(src, scan)
    twin = work / "thin_twin.nii.gz"
    if not twin.exists():
        twin.symlink_to(scan)
    print(f"\nthin-slice case: {src.name} resampled to 512x512x384 int16 ({scan.stat().st_size / 1e6:.0f} MB "
          "on disk); each row one fresh process; peak = max RSS of the process")
    full_map_mb = 512 * 512 * 384 * 4 / 2**20
    for cname in configs:
        res = {}
        cfg = _config(cname, work, device)
        for mode, scans in (("floor", [scan]), ("case1", [scan]), ("case2", [scan, twin])):
            out = work / f"thin_out_{mode}"
            p = subprocess.run([sys.executable, "-c", _CHILD, mode, str(cfg), str(scan), str(out), device,
                                *map(str, scans)], capture_output=True, text=True, check=True)
            res[mode] = json.loads(p.stdout.strip().splitlines()[-1])
        f, c1, c2 = res["floor"], res["case1"], res["case2"]
        per_case = c2["seconds"] - c1["seconds"]
        goal = f["peak_rss_mb"] + 2 * full_map_mb
        out = work / "thin_out_case1"
        written = sum(p.stat().st_size for p in out.rglob("*.nii.gz")) / 1e6
        with open(work / "thin_out_case2" / "manifest.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        st = _stage_seconds([r for r in rows if r["case_id"] == twin.name.split(".")[0]])
        stages = ", ".join(f"{s} {v:.1f} s" for s, v in st.items())
        print(f"{cname:12} floor {f['seconds']:.1f} s, {f['peak_rss_mb']:.0f} MB | case {per_case:.1f} s "
              f"({per_case / f['seconds']:.1f}x floor; 1-case run {c1['seconds']:.1f} s), peak {c2['peak_rss_mb']:.0f} MB "
              f"(goal <= floor + 2 maps = {goal:.0f} MB), {written:.0f} MB written; stages of the 2nd case: {stages}")


def inverse_only(scans: list[Path], configs: list[str], rounds: int) -> None:
    """The inverse stage alone: MONAI's step-by-step Compose.inverse vs the composed resampling,
    K = 3 smooth maps, interleaved in this process; also the largest difference (of the maximum)."""
    import torch

    from medcam3d.config import load_run_config
    from medcam3d.io import load_volume
    from medcam3d.spatial import build_preprocessing, model_input
    from medcam3d.spatial.inverse import maps_to_volume, maps_to_volume_monai

    print(f"\n{'config':12} {'scan':22} {'MONAI inverse s':>15} {'composed s':>10} {'speed-up':>8} {'max diff':>9}")
    for cname in configs:
        cfg = load_run_config(CONFIGS[cname], allow_random_weights=True)
        for scan in scans:
            vol = load_volume(scan)
            compose = build_preprocessing(cfg.preprocess)
            x = model_input(vol, compose)
            coarse = torch.rand(1, 3, 6, 6, 5, generator=torch.Generator().manual_seed(0))
            maps = torch.nn.functional.interpolate(coarse, size=tuple(x.shape[1:]), mode="trilinear")[0]
            times: dict[str, list[float]] = {"monai": [], "composed": []}
            for _ in range(rounds):
                for name, fn in (("monai", maps_to_volume_monai), ("composed", maps_to_volume)):
                    t0 = time.perf_counter()
                    out = fn(maps, x, compose, vol)
                    times[name].append(time.perf_counter() - t0)
                    if name == "monai":
                        ref = out
                    else:
                        diff = float((out - ref).abs().max() / ref.max())
                    del out
            a, b = statistics.median(times["monai"]), statistics.median(times["composed"])
            print(f"{cname:12} {scan.name:22} {a:15.2f} {b:10.2f} {a / b:8.1f} {diff:9.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", action="append", type=Path, help="scan(s) to use (default: tests/data CT + DICOM)")
    parser.add_argument("--config", action="append", choices=sorted(CONFIGS), help="default: both")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=1, help="measured rounds after the warm-up round")
    parser.add_argument("--thin", type=Path, default=None, help="build the 512x512x384 case from this scan")
    parser.add_argument("--skip-cohort", action="store_true", help="skip the cohort rows")
    parser.add_argument("--inverse", action="store_true", help="also time the inverse stage alone")
    args = parser.parse_args()
    configs = args.config or sorted(CONFIGS)
    import torch

    print(f"medcam3d bench_cohort: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU(s), device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_cohort:
            bench(args.scan or DEFAULT_SCANS, configs, args.device, args.rounds, work)
        if args.inverse:
            inverse_only(args.scan or DEFAULT_SCANS, configs, max(args.rounds, 1) + 1)
        if args.thin is not None:
            thin(args.thin, configs, args.device, work)


if __name__ == "__main__":
    main()

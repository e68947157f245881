"""Time and peak memory of medcam3d's engine against plain inference and MONAI's GradCAM.

Run:  python benchmarks/bench_engine.py [--device cpu|cuda] [--repeats 3] [--quick]

Every measurement runs in a fresh subprocess so peak memory is not polluted by earlier runs:
  * CPU: peak resident memory (ru_maxrss) minus the resident memory just before the measured call
    (model and input already built, one warm-up call of plain inference done);
  * CUDA: torch.cuda.max_memory_allocated() minus memory allocated before the call.
Times are the median of ``--repeats`` calls after that first call. Ratios in the printed table
are taken within this one run, so they compare like with like on a noisy machine.

Rows: plain inference (torch.no_grad); medcam3d HiResCAM with K = 1, 4, 16 classes from one call
(maps upsampled to the input size, i.e. what a user gets); medcam3d with K=16 reading only the
feature-resolution raw maps; MONAI's GradCAM, one class per call as it works, for K = 1 and 4.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "densenet121-3d@96": ("DenseNet121", 96, "class_layers.relu"),
    "resnet18-3d@128": ("resnet18", 128, "layer4"),
}
ROWS = [
    ("inference", 0),
    ("medcam3d", 1),
    ("medcam3d", 4),
    ("medcam3d", 16),
    ("medcam3d-raw-only", 16),
    ("monai-gradcam", 1),
    ("monai-gradcam", 4),
]


def _build(net: str, n_classes: int):
    from monai.networks import nets

    if net == "DenseNet121":
        return nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=n_classes)
    return nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=n_classes)


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def measure(config: str, kind: str, k: int, device: str, repeats: int) -> dict:
    """Runs inside the child process: one measurement, printed as JSON."""
    import resource

    import torch

    import medcam3d

    torch.manual_seed(0)
    net, size, layer = CONFIGS[config]
    model = _build(net, 16).to(device).eval()
    x = torch.randn(1, 1, size, size, size, device=device)

    if kind == "inference":

        def run():
            with torch.no_grad():
                return model(x)

    elif kind.startswith("medcam3d"):
        cam = medcam3d.HiResCAM(model, layer)
        classes = list(range(k))

        def run():
            res = cam(x, classes)
            return res.raw if kind.endswith("raw-only") else res.maps

    else:
        from monai.visualize import GradCAM as MonaiGradCAM

        monai_cam = MonaiGradCAM(nn_module=model, target_layers=layer)

        def run():
            return [monai_cam(x, class_idx=c) for c in range(k)]

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        model(x)  # warm-up of kernels/allocator, the same for every row
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = run()
        sync()
        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        before = _rss_kb()
        out = run()
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    del out
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = run()
        sync()
        times.append(time.perf_counter() - t0)
        del out
    return {"seconds": statistics.median(times), "peak_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--child", nargs=3, metavar=("CONFIG", "KIND", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        config, kind, k = args.child
        print(json.dumps(measure(config, kind, int(k), args.device, args.repeats)))
        return

    import torch

    device_name = (
        torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    )
    print(f"# medcam3d engine benchmark on {device_name}, torch {torch.__version__}, batch 1, median of {args.repeats}")
    for config in args.configs:
        results = {}
        for kind, k in ROWS:
            proc = subprocess.run(
                [sys.executable, __file__, "--device", args.device, "--repeats", str(args.repeats),
                 "--child", config, kind, str(k)],
                capture_output=True, text=True, check=False,
            )
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"measurement {config} {kind} K={k} failed")
            results[(kind, k)] = json.loads(proc.stdout.strip().splitlines()[-1])
        inf = results[("inference", 0)]
        print(f"\n## {config}")
        print("| method | K | time (s) | × inference time | × MONAI GradCAM time (same K) | peak mem (MB) | × inference peak mem |")
        print("|---|---|---|---|---|---|---|")
        for kind, k in ROWS:
            r = results[(kind, k)]
            monai = results.get(("monai-gradcam", k))
            vs_monai = f"{r['seconds'] / monai['seconds']:.3f}" if monai and kind != "inference" else "–"
            print(
                f"| {kind} | {k or '–'} | {r['seconds']:.3f} | {r['seconds'] / inf['seconds']:.2f} | {vs_monai} "
                f"| {r['peak_mb']:.0f} | {r['peak_mb'] / max(inf['peak_mb'], 1e-9):.2f} |"
            )
        speedup = results[("monai-gradcam", 4)]["seconds"] / results[("medcam3d", 4)]["seconds"]
        print(f"\nK=4: medcam3d is {speedup:.1f}x faster than MONAI GradCAM (4 calls).")


if __name__ == "__main__":
    main()

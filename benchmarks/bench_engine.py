"""Time and peak memory of medcam3d's engine against plain inference and MONAI's GradCAM.

Run:  python benchmarks/bench_engine.py [--device cpu|cuda] [--repeats 3] [--quick]

Peak memory: each row runs once in a fresh subprocess, so it is not polluted by earlier rows:
  * CPU: peak resident memory (ru_maxrss) minus the resident memory just before the measured call
    (model and input already built, one warm-up call of plain inference done);
  * CUDA: torch.cuda.max_memory_allocated() minus memory allocated before the call.
Time: all rows run in ONE process, interleaved round-robin for ``--repeats`` rounds after a
warm-up round, and each row reports its median. Interleaving spreads machine noise (other jobs,
clock changes) evenly over the rows, so the printed ratios compare like with like.

Rows: plain inference (torch.no_grad); medcam3d HiResCAM with K = 1, 4, 16 classes from one call
(maps upsampled to the input size, i.e. what a user gets); medcam3d with K=16 reading only the
feature-resolution raw maps; every other engine method at K = 16 (``cam:<method>``); HiResCAM and
Grad-CAM from ONE pass (``cam:hirescam+gradcam``, what ``medcam3d explain`` runs by default) and,
for comparison, as two separate calls (``separate:hirescam+gradcam``); all seven layer methods from
one pass; MONAI's GradCAM, one class per call as it works, for K = 1 and 4.
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
LAYER_METHODS = ("hirescam", "gradcam", "gradcampp", "xgradcam", "layercam", "gradcam_elementwise", "eigencam")
ROWS = [
    ("inference", 0),
    ("medcam3d", 1),
    ("medcam3d", 4),
    ("medcam3d", 16),
    ("medcam3d-raw-only", 16),
    *[(f"cam:{m}", 16) for m in LAYER_METHODS[1:]],
    ("cam:gradxinput", 1),  # a backward through the WHOLE network: its floor, K = 1
    ("cam:hirescam+gradcam", 16),
    ("separate:hirescam+gradcam", 16),
    ("cam:" + "+".join(LAYER_METHODS), 16),
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


def make_runner(model, x, layer: str, kind: str, k: int):
    """A zero-argument callable doing one row's work (what a user gets for that row)."""
    import torch

    import medcam3d

    if kind == "inference":

        def run():
            with torch.no_grad():
                return model(x)

    elif kind.startswith("cam:"):  # one MultiCAM pass for every method named
        multi = medcam3d.MultiCAM(model, kind[4:].split("+"), layer)
        classes = list(range(k))

        def run():
            return [r.maps for r in multi(x, classes).values()]

    elif kind.startswith("separate:"):  # one call per method, each its own forward and backward
        cams = [medcam3d.make_cam(m, model, layer) for m in kind[9:].split("+")]
        classes = list(range(k))

        def run():
            return [cam(x, classes).maps for cam in cams]

    elif kind.startswith("medcam3d"):
        cam = medcam3d.HiResCAM(model, layer)
        classes = list(range(k))

        def run():
            res = cam(x, classes)
            return res.raw if kind.endswith("raw-only") else res.maps

    else:
        import copy

        from monai.visualize import GradCAM as MonaiGradCAM

        # MONAI's GradCAM leaves its forward/backward hooks on the module it wraps; give it its
        # own copy (same weights) so those hooks cannot slow down the other rows of this process.
        monai_cam = MonaiGradCAM(nn_module=copy.deepcopy(model), target_layers=layer)

        def run():
            return [monai_cam(x, class_idx=c) for c in range(k)]

    return run


def _setup(config: str, device: str):
    import torch

    torch.manual_seed(0)
    net, size, layer = CONFIGS[config]
    model = _build(net, 16).to(device).eval()
    x = torch.randn(1, 1, size, size, size, device=device)
    return model, x, layer


def measure_memory(config: str, kind: str, k: int, device: str) -> dict:
    """Runs inside a child process: the peak memory of one call of one row, as JSON-able dict."""
    import resource

    import torch

    model, x, layer = _setup(config, device)
    run = make_runner(model, x, layer, kind, k)
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
    return {"peak_mb": peak_mb}


def measure_times(config: str, device: str, repeats: int) -> dict[tuple[str, int], float]:
    """Median seconds per row, rows interleaved round-robin in this process after a warm-up round."""
    import torch

    model, x, layer = _setup(config, device)
    runners = {(kind, k): make_runner(model, x, layer, kind, k) for kind, k in ROWS}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times: dict[tuple[str, int], list[float]] = {row: [] for row in runners}
    for round_ in range(repeats + 1):
        for row, run in runners.items():
            sync()
            t0 = time.perf_counter()
            out = run()
            sync()
            if round_:  # round 0 is the warm-up
                times[row].append(time.perf_counter() - t0)
            del out
    return {row: statistics.median(ts) for row, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the per-row memory subprocesses (times only)")
    parser.add_argument("--child", nargs=3, metavar=("CONFIG", "KIND", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        config, kind, k = args.child
        print(json.dumps(measure_memory(config, kind, int(k), args.device)))
        return

    import torch

    device_name = (
        torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    )
    print(f"# medcam3d engine benchmark on {device_name}, torch {torch.__version__}, batch 1, "
          f"time = median of {args.repeats} interleaved rounds, memory = one call per fresh process")
    for config in args.configs:
        results = {}
        for kind, k in ROWS:
            if args.no_memory:
                results[(kind, k)] = {"peak_mb": float("nan")}
                continue
            proc = subprocess.run(
                [sys.executable, __file__, "--device", args.device, "--child", config, kind, str(k)],
                capture_output=True, text=True, check=False,
            )
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"measurement {config} {kind} K={k} failed")
            results[(kind, k)] = json.loads(proc.stdout.strip().splitlines()[-1])
        for row, seconds in measure_times(config, args.device, args.repeats).items():
            results[row]["seconds"] = seconds
        inf = results[("inference", 0)]
        print(f"\n## {config}")
        print("| method | K | time (s) | × inference time | × MONAI GradCAM time (same K) | peak mem (MB) | × inference peak mem |")
        print("|---|---|---|---|---|---|---|")
        for kind, k in ROWS:
            if (kind, k) not in results:
                continue
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

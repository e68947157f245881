"""The ``medcam3d`` command: ``explain`` a cohort, ``view`` a scan with maps, run the ``demo``.

Exit codes: 0 every case ok (or skipped), 1 at least one case failed or the run could not finish
writing (e.g. disk full), 2 usage or config error (printed as one line, no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from medcam3d.errors import ExportError, Medcam3dError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _device(text: str) -> str:
    if text == "cpu":  # always valid: a rerun with nothing to do need not import torch for it
        return text
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="medcam3d",
        description="Faithful HiResCAM / Grad-CAM maps for 3D CT classifiers, on the scan's own grid.",
    )
    from medcam3d import __version__

    parser.add_argument("--version", action="version", version=f"medcam3d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{explain,view,montage,demo}")
    sub.required = True

    ex = sub.add_parser(
        "explain",
        help="explain scans with a config; writes NIfTI maps, PNG montages and a manifest",
        description="Explain NIfTI files, DICOM series folders, a folder of them, or a CSV with a "
        "'path' column (optional case_id, mask, series_uid, allow_non_ct). Outputs go to "
        "OUTPUT/<case_id>/; the manifest covers every case in OUTPUT. Finished cases are skipped "
        "on a rerun unless the config or the input's content changed (or --overwrite); one run at a "
        "time per OUTPUT (a second one refuses). Runs under torchrun (torchrun --nproc_per_node N "
        "-m medcam3d explain ...).",
    )
    ex.add_argument("--config", required=True, help="YAML run config (see sample_configs/template.yaml)")
    ex.add_argument("--input", required=True, nargs="+", metavar="PATH", dest="inputs",
                    help="NIfTI file(s), DICOM folder(s), a folder of them, or a CSV")
    ex.add_argument("--output", required=True, type=Path, metavar="DIR", help="output folder")
    ex.add_argument("--overwrite", action="store_true", help="redo cases that are already finished")
    ex.add_argument("--quiet", action="store_true", help="no progress bar or per-case messages")
    ex.add_argument("--workers", type=_positive_int, default=0, metavar="N",
                    help="processes that load scans ahead of the model (default 0: load in-line)")
    ex.add_argument("--device", type=_device, default=None, help="cpu, cuda or cuda:N (default: config, else auto)")
    ex.add_argument("--amp", action="store_true", help="autocast: bfloat16 on CPU, bf16/fp16 on CUDA; maps stay float32")
    ex.add_argument("--allow-random-weights", action="store_true",
                    help="run a config without a checkpoint (untrained model; testing only)")
    ex.add_argument("--keep-identifiers", action="store_true",
                    help="name DICOM cases by PatientID instead of the folder name")
    ex.add_argument("--manifest", choices=("csv", "jsonl", "both"), default="csv",
                    help="manifest format (default csv)")
    ex.add_argument("--series-uid", default=None, metavar="UID",
                    help="SeriesInstanceUID to read from DICOM folders that hold several series "
                    "(per case: a 'series_uid' CSV column)")
    ex.add_argument("--allow-non-ct", action="store_true",
                    help="accept DICOM series whose Modality is not CT (values are then not HU; per "
                    "case: an 'allow_non_ct' CSV column)")

    vw = sub.add_parser("view", help="open a scan and saved maps in napari",
                        description="Open SCAN (NIfTI or DICOM folder) and MAP NIfTI files in napari.")
    vw.add_argument("scan", help="the scan: NIfTI file or DICOM series folder")
    vw.add_argument("maps", nargs="*", metavar="MAP", help="map NIfTI files written by explain")
    vw.add_argument("--window", default="lung", help="CT window name (lung, mediastinum, ...) or LEVEL,WIDTH")

    mt = sub.add_parser("montage", help="re-render PNG montages of a finished run from its saved maps",
                        description="Re-render OUTPUT/<case>/<case>_<method>_montage.png from the map NIfTI "
                        "files and the manifest of a finished 'medcam3d explain' run, without running the "
                        "model (e.g. to change the CT window).")
    mt.add_argument("output", type=Path, metavar="OUTPUT", help="the --output folder of an explain run")
    mt.add_argument("--window", default="lung", help="CT window name (lung, mediastinum, ...) or LEVEL,WIDTH")
    mt.add_argument("--case", nargs="+", default=None, metavar="ID", help="only these case ids")
    mt.add_argument("--quiet", action="store_true", help="no per-case messages")

    dm = sub.add_parser("demo", help="explain a bundled demo scan with the bundled demo model")
    dm.add_argument("--output", type=Path, default=Path("medcam3d-demo-output"), metavar="DIR",
                    help="output folder (default ./medcam3d-demo-output)")
    dm.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def parse_window(text: str) -> tuple[float, float]:
    """A window name or ``LEVEL,WIDTH`` -> (level, width) in HU."""
    from medcam3d.config import WINDOWS, Window
    from medcam3d.errors import ConfigError

    if text in WINDOWS:
        return (WINDOWS[text].level, WINDOWS[text].width)
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(
            f"--window: expected one of {', '.join(WINDOWS)} or LEVEL,WIDTH, got {text!r}"
        ) from None
    if width <= 0:
        raise ConfigError(f"--window: width must be > 0, got {width:g}")
    return (Window("custom", level, width).level, width)


def _summary_line(summary, out: Path) -> str:
    manifests = ", ".join(str(p) for p in summary.manifests)
    return (f"medcam3d: {summary.done} done, {summary.skipped} skipped, {summary.failed} failed; "
            f"outputs in {out}" + (f"; manifest: {manifests}" if manifests else ""))


def _stages_line(rows: list[dict]) -> str | None:
    """'where the time went' over the rows explained in this run (None when none were)."""
    from medcam3d.cli.manifest import STAGE_COLUMNS

    done = [r for r in rows if r.get("status") == "ok"]
    totals = {c: sum(float(r.get(c) or 0.0) for r in done) for c in STAGE_COLUMNS}
    whole = sum(totals.values())
    if not done or whole <= 0:
        return None
    cases = len({r.get("case_index") for r in done})
    parts = ", ".join(f"{c.removeprefix('seconds_')} {v:.1f} s ({100 * v / whole:.0f}%)" for c, v in totals.items())
    mb = sum(int(r.get("bytes_written") or 0) for r in done) / 1e6
    return f"medcam3d: time per stage over {cases} case(s): {parts}; {mb:.1f} MB written"


def _cmd_explain(args: argparse.Namespace) -> int:
    from medcam3d.cli.explain import ExplainOptions, run_explain

    opts = ExplainOptions(
        config=args.config, inputs=args.inputs, output=args.output, overwrite=args.overwrite,
        quiet=args.quiet, workers=args.workers, device=args.device,
        amp=args.amp, allow_random_weights=args.allow_random_weights,
        keep_identifiers=args.keep_identifiers, manifest=args.manifest,
        series_uid=args.series_uid, allow_non_ct=args.allow_non_ct,
    )
    summary = run_explain(opts)
    from medcam3d.cli.distributed import env_world

    world = env_world()
    if world is None or world[0] == 0:
        print(_summary_line(summary, args.output.resolve()))
        stages = _stages_line(summary.rows)
        if stages and not args.quiet:
            print(stages)
    return EXIT_FAILED if summary.failed else EXIT_OK


def _cmd_view(args: argparse.Namespace) -> int:
    from medcam3d.cli.view import run_view

    run_view(args.scan, args.maps, parse_window(args.window))
    return EXIT_OK


def _cmd_montage(args: argparse.Namespace) -> int:
    from medcam3d.cli.montage_cmd import rerender

    done = rerender(args.output, parse_window(args.window), args.case, args.quiet)
    print(f"medcam3d montage: {len(done.written)} written, {len(done.failed)} failed; in {args.output.resolve()}")
    return EXIT_FAILED if done.failed else EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from medcam3d.cli.demo import demo_assets, peak_vs_lesion
    from medcam3d.cli.explain import ExplainOptions, run_explain

    out = args.output.resolve()
    assets = demo_assets()
    print(assets.banner)
    summary = run_explain(ExplainOptions(config=assets.config, inputs=[str(s) for s in assets.scans],
                                         output=out, quiet=args.quiet, overwrite=True))
    print(_summary_line(summary, out))
    for row in summary.rows:
        if row["status"] != "ok":
            continue
        probs = ", ".join(f"{n}={p:.3f}" for n, p in zip(row["class_names"], row["probabilities"]))
        print(f"  {row['method']}: P({probs})")
        for name in row["class_names"]:
            nii = next((out / f for f in row["outputs"] if f.endswith(f"_{name}.nii.gz")), None)
            mask = assets.lesion_masks.get(name)
            if nii is None or mask is None:
                continue
            rep = peak_vs_lesion(nii, mask)
            where = "inside the lesion" if rep.inside else f"{rep.distance_mm:.1f} mm from the lesion"
            print(f"    {name}: map peak at ({rep.peak_mm[0]:.1f}, {rep.peak_mm[1]:.1f}, "
                  f"{rep.peak_mm[2]:.1f}) mm RAS, {where}; file {nii}")
    from medcam3d.cli.demo import open_hint

    print(open_hint(assets, summary.rows, out))
    return EXIT_FAILED if summary.failed else EXIT_OK


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """medcam3d's own warnings (their text starts with 'medcam3d:') print as their message only."""
    original = warnings.formatwarning

    def fmt(message, category, filename, lineno, line=None):  # noqa: ANN001
        text = str(message)
        return text + "\n" if text.startswith("medcam3d:") else original(message, category, filename, lineno, line)

    warnings.formatwarning = fmt
    try:
        yield
    finally:
        warnings.formatwarning = original


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medcam3d`` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help / --version (0) or a usage error (2, message printed)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    handlers = {"explain": _cmd_explain, "view": _cmd_view, "montage": _cmd_montage, "demo": _cmd_demo}
    try:
        with _one_line_warnings():
            return handlers[args.command](args)
    except ExportError as exc:  # the run started but could not write its results
        print(f"medcam3d {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Medcam3dError as exc:
        print(f"medcam3d {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("medcam3d: interrupted", file=sys.stderr)
        return 130

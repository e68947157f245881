"""``medcam3d explain``: explain a cohort of scans with one config, resumably, on one or many
processes (torchrun), writing per-class NIfTI maps, PNG montages and a manifest.

Batching: cases are explained one at a time (one forward + one batched backward over all classes
and methods per case); there is no ``--batch-size`` (it used to be accepted and ignored). Loading
overlaps compute through DataLoader workers instead.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medcam3d.cli import distributed as dist
from medcam3d.cli.inputs import Case, check_output_dir, collect_cases
from medcam3d.cli.loading import LoadedCase, iter_loaded
from medcam3d.cli.manifest import STAGE_COLUMNS, PartWriter, merge_parts, part_path
from medcam3d.cli.notes import load_notes, outside_scan_notes, write_resliced_ct
from medcam3d.cli.resume import case_hash, is_done, remove_previous, write_marker
from medcam3d.cli.scoring import COLUMNS as SCORING_COLUMNS
from medcam3d.cli.scoring import case_line, class_extras, load_mask, row_extras, write_cohort_summary
from medcam3d.config import RunConfig, load_run_config


@dataclass
class ExplainOptions:
    """Everything ``medcam3d explain`` takes (the argparse namespace, typed)."""

    config: str | os.PathLike[str] | Mapping[str, Any]
    inputs: list[str]
    output: Path
    overwrite: bool = False
    quiet: bool = False
    workers: int = 0
    device: str | None = None
    amp: bool = False
    allow_random_weights: bool = False
    keep_identifiers: bool = False
    manifest: str = "csv"
    extra_sources: list[Path] = field(default_factory=list)


@dataclass
class Summary:
    """Counts per status (cases, not rows) and the manifest files written (rank 0)."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    manifests: list[Path] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)


def _row(case: Case, out_root: Path, method: str, **values: Any) -> dict[str, Any]:
    row = {
        "case_index": case.index,
        "case_id": case.case_id,
        "input": str(case.path),
        "mask": str(case.mask) if case.mask else None,
        "method": method,
        "target_layer": None,
        "status": "ok",
        "error": None,
        "seconds": None,
        "outputs": [],
        "class_names": None,
        "logits": None,
        "probabilities": None,
        "outside_scan_fraction": None,
        **{k: None for k in SCORING_COLUMNS},
        **{c: None for c in STAGE_COLUMNS},
        "bytes_written": None,
        "notes": [],
    }
    row.update(values)
    return row


class _StageTimer:
    """Wraps a streamed Explanation for ``save_nifti``: times the resampling of each class (the
    inverse stage) and, through :meth:`montage`, the montage work done while each map is at hand."""

    def __init__(self, expl: Any) -> None:
        self._expl = expl
        self.inverse_s = 0.0
        self.montage_s = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._expl, name)

    def iter_maps(self) -> Any:
        it = self._expl.iter_maps()
        while True:
            t = time.perf_counter()
            try:
                m = next(it)
            except StopIteration:
                return
            self.inverse_s += time.perf_counter() - t
            yield m

    def montage(self, fn: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn()
        finally:
            self.montage_s += time.perf_counter() - t


def _np_map(m: Any) -> Any:
    return m.detach().to("cpu").float().numpy() if hasattr(m, "detach") else m


def _failed_rows(case: Case, out_root: Path, cfg: RunConfig, error: str, seconds: float) -> list[dict[str, Any]]:
    return [
        _row(case, out_root, m, status="failed", error=error, seconds=round(seconds, 3))
        for m in cfg.methods
    ]


def _explain_case(
    loaded: LoadedCase, cfg: RunConfig, out_root: Path, device: str, amp: bool, chash: str
) -> list[dict[str, Any]]:
    """Explain one loaded case with every method; on any error remove what it wrote."""
    from medcam3d.io import save_nifti
    from medcam3d.report import save_montage
    from medcam3d.report.montage import map_panel
    from medcam3d.spatial import explain_volume
    from medcam3d.spatial.composed import coarser_grid

    case = loaded.case
    if loaded.error is not None:
        return _failed_rows(case, out_root, cfg, loaded.error, loaded.seconds)
    case_dir = out_root / case.case_id
    written: list[Path] = []
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    try:
        case_dir.mkdir(parents=True, exist_ok=True)
        remove_previous(case_dir)
        mask = load_mask(case.mask, loaded.volume) if case.mask else None  # bad mask: case fails
        notes = load_notes(loaded.volume)
        resliced = write_resliced_ct(loaded.volume, case_dir, case.case_id)
        if resliced is not None:
            written.append(resliced[0])
            notes.append(resliced[1])
        t0 = time.perf_counter()
        # Every method from one forward and one backward (RunConfig.explain_kwargs); the shared
        # preprocess + engine time is booked on the first method's row.
        explained = explain_volume(cfg.model, loaded.volume, device=device, amp=amp, stream=True,
                                   **cfg.explain_kwargs())
        shared = time.perf_counter() - t0
        for i, (method, expl) in enumerate(explained.items()):
            t0 = time.perf_counter()
            timer = _StageTimer(expl)
            panels: list[Any] = []
            per_class: list[dict[str, Any]] = []
            affine = expl.grid.affine

            def on_map(k: int, m: Any) -> None:  # each scan-grid map once, while it is at hand
                per_class.append(class_extras(m, affine, mask))
                if cfg.output.montage:
                    timer.montage(lambda: panels.append(map_panel(m, affine)))

            with warnings.catch_warnings():  # the tilt note is in ``notes`` (printed, manifest)
                warnings.filterwarnings("ignore", message=".*gantry tilt", category=UserWarning)
                if cfg.output.spacing_mm is None:
                    files = save_nifti(
                        timer, case_dir, stem=case.case_id, four_d=cfg.output.four_d, overwrite=True,
                        source_paths=[case.path], storage=cfg.output.storage, on_map=on_map,
                    )
                else:  # files on the coarser grid; scores and montage from the scan-grid maps
                    coarse = _StageTimer(expl.on_grid(coarser_grid(loaded.volume, cfg.output.spacing_mm)))
                    files = save_nifti(
                        coarse, case_dir, stem=case.case_id, four_d=cfg.output.four_d, overwrite=True,
                        source_paths=[case.path], storage=cfg.output.storage,
                    )
                    for k, m in enumerate(timer.iter_maps()):
                        on_map(k, _np_map(m))
                    timer.inverse_s += coarse.inverse_s
            written.extend(files)
            if cfg.output.montage:
                png = case_dir / f"{case.case_id}_{method}_montage.png"
                written.append(timer.montage(lambda: save_montage(
                    loaded.volume, expl, png, cfg.output.window.limits,
                    title=f"{case.case_id} - {method}", panels=panels, mask=mask)))
                files = [*files, png]
            total = time.perf_counter() - t0 + (shared if i == 0 else 0.0)
            stages = {
                "seconds_load": round(loaded.seconds if i == 0 else 0.0, 3),
                "seconds_preprocess": round(expl.extra["seconds"]["preprocess"] if i == 0 else 0.0, 3),
                "seconds_engine": round(expl.extra["seconds"]["engine"] if i == 0 else 0.0, 3),
                "seconds_inverse": round(timer.inverse_s, 3),
                "seconds_montage": round(timer.montage_s, 3),
            }
            # writing = what is left of this method's time (building and compressing the files)
            stages["seconds_write"] = round(max(0.0, total - sum(v for k, v in stages.items()
                                                                 if k != "seconds_load")), 3)
            rows.append(
                _row(
                    case, out_root, method,
                    target_layer=expl.target_layer,
                    seconds=round(total, 3),
                    outputs=[str(p.relative_to(out_root)) for p in files],
                    class_names=list(expl.class_names),
                    logits=[round(float(v), 6) for v in expl.logits.reshape(-1)],
                    probabilities=[round(float(v), 6) for v in expl.probabilities.reshape(-1)],
                    outside_scan_fraction=_fractions(expl),
                    **row_extras(expl, mask, per_class=per_class),
                    bytes_written=sum(p.stat().st_size for p in files),
                    **stages,
                    notes=notes,
                )
            )
        write_marker(
            case_dir,
            {
                "hash": chash,
                "input": str(case.path),
                "files": [p.name for p in written],
                "rows": rows,
            },
        )
        return rows
    except Exception as exc:  # one bad case must not stop the cohort
        for p in written:
            Path(p).unlink(missing_ok=True)
        try:
            case_dir.rmdir()  # only if empty
        except OSError:
            pass
        return _failed_rows(case, out_root, cfg, f"{type(exc).__name__}: {exc}", time.perf_counter() - start)


def _fractions(expl: Any) -> list[float] | None:
    frac = getattr(expl, "outside_scan_fraction", None)
    return None if frac is None else [round(float(v), 4) for v in frac.reshape(-1)]


def resolve_device(requested: str | None, cfg: RunConfig, d: dist.Dist) -> str:
    """CLI --device, else the config's, else cuda if available; one GPU per rank under torchrun."""
    import torch

    device = requested or cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if d.world_size > 1 and device == "cuda":
        device = f"cuda:{d.local_rank}"
    return device


def run_explain(opts: ExplainOptions) -> Summary:
    """Run the whole ``explain`` command (see module docstring); returns the summary.

    Raises:
        ConfigError / InputError: before any case ran (the CLI maps these to exit code 2).
    """
    from tqdm import tqdm

    cfg = load_run_config(opts.config, allow_random_weights=opts.allow_random_weights)
    cases = collect_cases(opts.inputs, keep_identifiers=opts.keep_identifiers)
    out_root = Path(os.path.abspath(opts.output))
    check_output_dir(out_root, cases, [*opts.inputs, *opts.extra_sources])

    backend_hint = opts.device or cfg.device or "cpu"
    d = dist.setup(backend_hint)
    try:
        device = resolve_device(opts.device, cfg, d)
        cfg.model.to(device)
        amp = opts.amp or cfg.amp
        out_root.mkdir(parents=True, exist_ok=True)
        fingerprint = cfg.fingerprint()
        mine = dist.split(cases, d)
        writer = PartWriter(part_path(out_root, d.rank))
        summary = Summary()
        todo: list[Case] = []
        hashes: dict[int, str] = {}
        for case in mine:
            hashes[case.index] = case_hash(fingerprint, cfg.methods, case.path)
            marker = None if opts.overwrite else is_done(out_root / case.case_id, hashes[case.index])
            if marker is None:
                todo.append(case)
                continue
            summary.skipped += 1
            for row in marker.get("rows", []):
                row = {**row, "status": "skipped", "case_index": case.index, "case_id": case.case_id}
                writer.write(row)
        bar = tqdm(total=len(todo), disable=opts.quiet or not d.is_main, unit="case",
                   desc="medcam3d explain", file=sys.stderr)
        for loaded in iter_loaded(todo, opts.workers):
            rows = _explain_case(loaded, cfg, out_root, device, amp, hashes[loaded.case.index])
            for row in rows:
                writer.write(row)
            if any(r["status"] == "failed" for r in rows):
                summary.failed += 1
                if not opts.quiet:
                    bar.write(f"medcam3d: case {loaded.case.case_id} failed: {rows[0]['error']}",
                              file=sys.stderr)
            else:
                summary.done += 1
                if not opts.quiet:
                    bar.write("medcam3d: " + case_line(loaded.case.case_id, rows), file=sys.stdout)
                    lines = [f"medcam3d: case {loaded.case.case_id}: {n}" for n in rows[0].get("notes") or []]
                    for line in lines + outside_scan_notes(loaded.case.case_id, rows):
                        bar.write(line, file=sys.stderr)
            bar.update(1)
        bar.close()
        writer.close()
        dist.barrier(d)
        if d.is_main:
            rows, summary.manifests = merge_parts(out_root, d.world_size, opts.manifest)
            cohort = write_cohort_summary(rows, out_root)  # scores vs masks: mean, median, 95% CI
            if cohort is not None:
                summary.manifests.append(cohort)
            summary.rows = rows
            by_case: dict[int, set[str]] = {}
            for r in rows:
                by_case.setdefault(r["case_index"], set()).add(r["status"])
            summary.failed = sum("failed" in s for s in by_case.values())
            summary.skipped = sum(s == {"skipped"} for s in by_case.values())
            summary.done = len(by_case) - summary.failed - summary.skipped
        dist.barrier(d)
        return summary
    finally:
        dist.teardown(d)

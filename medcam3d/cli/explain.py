"""``medcam3d explain``: explain a cohort of scans with one config, resumably, on one or many
processes (torchrun), writing per-class NIfTI maps, PNG montages and a manifest.

Batching: cases are explained one at a time (one forward + one batched backward over all classes
and methods per case); there is no ``--batch-size`` (it used to be accepted and ignored). Loading
overlaps compute through DataLoader workers instead.

A rerun over finished cases builds no model: when the config's fingerprint can be computed from
files alone (:mod:`medcam3d.config.digest`, which also says what a matching fingerprint proves), the
cases are planned first and torch, MONAI, the model and its probe forward are loaded only when some
case of some process is left to do; then everything runs as on a first run.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcam3d.cli import distributed as dist
from medcam3d.cli.inputs import Case, check_output_dir, collect_cases
from medcam3d.cli.lock import OutputLock
from medcam3d.cli.manifest import STAGE_COLUMNS, PartWriter, merge_parts, part_path
from medcam3d.cli.notes import load_notes, outside_scan_notes, write_resliced_ct
from medcam3d.cli.resume import (
    case_hash,
    clean_partials,
    collision,
    input_sha256,
    is_done,
    remove_previous,
    write_marker,
)
from medcam3d.cli.scoring import COLUMNS as SCORING_COLUMNS
from medcam3d.cli.scoring import case_line, class_extras, load_mask, row_extras, write_cohort_summary
from medcam3d.config.digest import ConfigDigest, config_digest
from medcam3d.errors import ConfigError, InputError, Medcam3dError

if TYPE_CHECKING:  # torch (DataLoader) and the model builders load only when a case is to do
    from medcam3d.cli.loading import LoadedCase
    from medcam3d.config import RunConfig


# map files compressed at once in threads while the next class's map is computed (ISA-L and zlib
# release the GIL); each pending file holds one 16-bit map, so a case holds at most this many
# besides the map being computed. Measured on lung1 (512x512x48, demo config, 2 cores): a case's
# stage seconds 2.3 s with 2 threads against 2.65-2.9 s with 1.
WRITE_THREADS = max(1, min(2, os.cpu_count() or 1))


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
    series_uid: str | None = None
    allow_non_ct: bool = False


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
        "series_uid": case.series_uid,
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


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t


def _explain_case(
    loaded: LoadedCase, cfg: RunConfig, out_root: Path, device: str, amp: bool, marker: dict[str, Any]
) -> list[dict[str, Any]]:
    """Explain one loaded case with every method; on any error remove what it wrote.

    Each method's montage PNG is drawn in a background thread (one at a time: matplotlib figures
    are not shared between threads) while the next method's maps are computed and written; the
    case's rows and done-marker are written only once every montage is on disk, and a failed
    montage fails the case like any other error.

    ``marker`` holds the done-marker's fixed entries (hash, input_sha256, run_id)."""
    from concurrent.futures import ThreadPoolExecutor

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
    drawer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medcam3d-montage") if cfg.output.montage else None
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
                                   **cfg.explain_kwargs(case_inputs=case.model_inputs()))
        shared = time.perf_counter() - t0
        drawn: list[Any] = []  # per method: the montage future, or None
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
                        source_paths=[case.path], storage=cfg.output.storage, on_map=on_map, threads=WRITE_THREADS,
                    )
                else:  # files on the coarser grid; scores and montage from the scan-grid maps
                    coarse = _StageTimer(expl.on_grid(coarser_grid(loaded.volume, cfg.output.spacing_mm)))
                    files = save_nifti(
                        coarse, case_dir, stem=case.case_id, four_d=cfg.output.four_d, overwrite=True,
                        source_paths=[case.path], storage=cfg.output.storage, threads=WRITE_THREADS,
                    )
                    for k, m in enumerate(timer.iter_maps()):
                        on_map(k, _np_map(m))
                    timer.inverse_s += coarse.inverse_s
            written.extend(files)
            future = None
            if drawer is not None:
                png = case_dir / f"{case.case_id}_{method}_montage.png"
                written.append(png)  # removed with the rest if the case fails
                future = drawer.submit(_timed, save_montage, loaded.volume, expl, png, cfg.output.window.limits,
                                       title=f"{case.case_id} - {method}", panels=panels, mask=mask)
                files = [*files, png]
            drawn.append(future)
            total = time.perf_counter() - t0 + (shared if i == 0 else 0.0)
            stages = {
                "seconds_load": round(loaded.seconds if i == 0 else 0.0, 3),
                "seconds_preprocess": round(expl.extra["seconds"]["preprocess"] if i == 0 else 0.0, 3),
                "seconds_engine": round(expl.extra["seconds"]["engine"] if i == 0 else 0.0, 3),
                "seconds_inverse": round(timer.inverse_s, 3),
            }
            # writing = what is left of this method's time (building and compressing the files)
            stages["seconds_write"] = round(max(0.0, total - timer.montage_s - sum(
                v for k, v in stages.items() if k != "seconds_load")), 3)
            stages["seconds_montage"] = timer.montage_s  # + the drawing, added once it is done
            rows.append(
                _row(
                    case, out_root, method,
                    run_id=marker.get("run_id"),
                    target_layer=expl.target_layer,
                    seconds=total,
                    outputs=[str(p.relative_to(out_root)) for p in files],
                    class_names=list(expl.class_names),
                    logits=[round(float(v), 6) for v in expl.logits.reshape(-1)],
                    probabilities=[round(float(v), 6) for v in expl.probabilities.reshape(-1)],
                    outside_scan_fraction=_fractions(expl),
                    **row_extras(expl, mask, per_class=per_class),
                    **stages,
                    notes=notes,
                )
            )
        for row, future in zip(rows, drawn):  # every montage on disk before the rows count
            drawing = future.result()[1] if future is not None else 0.0
            # seconds = the work of this method's stages (the drawing overlapped the next method)
            row["seconds_montage"] = round(row["seconds_montage"] + drawing, 3)
            row["seconds"] = round(row["seconds"] + drawing, 3)
            row["bytes_written"] = sum((out_root / f).stat().st_size for f in row["outputs"])
        write_marker(
            case_dir,
            {
                **marker,
                "input": str(case.path),
                "files": [p.name for p in written],
                "rows": rows,
            },
        )
        return rows
    except Exception as exc:  # one bad case must not stop the cohort
        if drawer is not None:
            drawer.shutdown(wait=True, cancel_futures=True)  # no montage still being written
        for p in written:
            Path(p).unlink(missing_ok=True)
        try:
            case_dir.rmdir()  # only if empty
        except OSError:
            pass
        return _failed_rows(case, out_root, cfg, f"{type(exc).__name__}: {exc}", time.perf_counter() - start)
    finally:
        if drawer is not None:
            drawer.shutdown(wait=True, cancel_futures=True)


def _fractions(expl: Any) -> list[float] | None:
    frac = getattr(expl, "outside_scan_fraction", None)
    return None if frac is None else [round(float(v), 4) for v in frac.reshape(-1)]


def resolve_device(requested: str | None, cfg: RunConfig | ConfigDigest, d: dist.Dist) -> str:
    """CLI --device, else the config's, else cuda if available; one GPU per rank under torchrun.

    Raises:
        ConfigError: a CUDA device is asked for but this torch has none (CPU-only build, no GPU
            visible, or an index past the last GPU).
    """
    device = requested or cfg.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if d.world_size > 1 and device == "cuda":
        device = f"cuda:{d.local_rank}"
    where = "--device" if requested else "device"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            why = "is a CPU-only build" if torch.version.cuda is None else "sees no GPU"
            raise ConfigError(f"{where}: {device!r} asked for, but this torch ({torch.__version__}) "
                              f"{why}; use --device cpu, or install a CUDA build of torch")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(f"{where}: {device!r} asked for, but only {torch.cuda.device_count()} "
                              "GPU(s) are visible")
    return device


def _make_run_id() -> str:
    import secrets

    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def _agree(d: dist.Dist, step: Any) -> Any:
    """Run ``step()`` on every rank; if it raised a Medcam3dError on any rank, raise on all."""
    error: Medcam3dError | None = None
    result = None
    try:
        result = step()
    except Medcam3dError as exc:
        error = exc
    if not dist.all_ok(d, error is None):
        raise error or InputError("another process of this torchrun job refused to start (see its message)")
    return result


def _input_digests(mine: list[Case]) -> dict[int, str]:
    """SHA-256 of each case's input content, by case index (read once per run).

    Raises:
        InputError: an input cannot be read.
    """
    digests = {}
    for case in mine:
        try:
            digests[case.index] = input_sha256(case.path)
        except OSError as exc:
            raise InputError(f"--input: cannot read {str(case.path)!r}: {exc.strerror or exc}") from exc
    return digests


def _plan(
    mine: list[Case], fingerprint: str, methods: list[str], digests: dict[int, str], out_root: Path,
    overwrite: bool, run_id: str,
) -> tuple[list[tuple[Case, dict[str, Any]]], list[tuple[Case, dict[str, Any]]]]:
    """Split this rank's cases into (to do, skipped) with their marker entries; refuse case-id
    collisions with a different input unless ``overwrite``.

    Raises:
        InputError: a case id collides.
    """
    todo, skipped = [], []
    for case in mine:
        digest = digests[case.index]
        base = {"hash": case_hash(fingerprint, methods, digest, case.load_options()),
                "input_sha256": digest, "run_id": run_id}
        case_dir = out_root / case.case_id
        if overwrite:
            todo.append((case, base))
            continue
        problem = collision(case_dir, case.case_id, case.path, digest)
        if problem is not None:
            raise InputError(problem)
        marker = is_done(case_dir, base["hash"])
        if marker is None:
            todo.append((case, base))
        else:
            skipped.append((case, marker))
    return todo, skipped


def _load_config(opts: ExplainOptions, cases: list[Case]) -> RunConfig:
    """The fully validated config with its model built (the probe forward gets the first case's
    per-case model inputs, from the cohort CSV's input.<name> columns)."""
    from medcam3d.config import load_run_config

    return load_run_config(opts.config, allow_random_weights=opts.allow_random_weights,
                           probe_inputs=cases[0].model_inputs() if cases else None)


def run_explain(opts: ExplainOptions) -> Summary:
    """Run the whole ``explain`` command (see module docstring); returns the summary.

    The output folder is locked for the whole run (a second run into it refuses); temporary files
    of a killed run are removed first; the manifest is merged with the folder's earlier cases.

    Raises:
        ConfigError / InputError: before any case ran (the CLI maps these to exit code 2).
        ExportError: the manifest could not be written (disk full...; exit code 1).
    """
    from tqdm import tqdm

    cases = collect_cases(opts.inputs, keep_identifiers=opts.keep_identifiers,
                          series_uid=opts.series_uid, allow_non_ct=opts.allow_non_ct)
    out_root = Path(os.path.abspath(opts.output))
    # Finished cases can only be in an existing output folder: then the config is validated and
    # fingerprinted without building the model, and the model is built below only if a case is
    # left to do. Otherwise (and with --overwrite) it is built here, as it always was.
    cfg: RunConfig | None = None
    quick: ConfigDigest | None = None
    if not opts.overwrite and cases and out_root.is_dir():
        quick = config_digest(opts.config)
    if quick is None or quick.fingerprint is None:
        cfg = _load_config(opts, cases)
    settings: RunConfig | ConfigDigest = cfg if cfg is not None else quick
    check_output_dir(out_root, cases, [*opts.inputs, *opts.extra_sources])

    backend_hint = opts.device or settings.device or "cpu"
    d = dist.setup(backend_hint)
    lock: OutputLock | None = None
    try:
        # without a model, only an explicitly asked device can be refused (auto always resolves)
        device = _agree(d, lambda: resolve_device(opts.device, settings, d)
                        if cfg is not None or opts.device or settings.device else None)
        run_id = dist.broadcast(d, _make_run_id())
        if d.is_main:
            created = not out_root.exists()
            out_root.mkdir(parents=True, exist_ok=True)
            lock = OutputLock(out_root, run_id)

            def take() -> None:
                try:
                    lock.acquire()
                except InputError:
                    if created:
                        out_root.rmdir()
                    raise

            _agree(d, take)
            removed = clean_partials(out_root)
            if removed and not opts.quiet:
                print(f"medcam3d: removed {len(removed)} temporary file(s) left by an interrupted run",
                      file=sys.stderr)
        else:
            _agree(d, lambda: None)
        dist.barrier(d)
        mine = dist.split(cases, d)
        digests = _agree(d, lambda: _input_digests(mine))
        fingerprint = cfg.fingerprint() if cfg is not None else quick.fingerprint
        todo, skipped = _agree(d, lambda: _plan(mine, fingerprint, settings.methods, digests, out_root,
                                                opts.overwrite, run_id))
        # The model is skipped only when no rank has a case to do; otherwise every rank that
        # deferred it builds it now and plans again with the built config's fingerprint (equal to
        # the digest's unless a file changed in between). Each test is collective: all ranks agree.
        if not dist.all_ok(d, cfg is None and not todo) and not dist.all_ok(d, cfg is not None):
            built = cfg
            cfg = _agree(d, lambda: built if built is not None else _load_config(opts, cases))
            device = _agree(d, lambda: resolve_device(opts.device, cfg, d))
            todo, skipped = _agree(d, lambda: _plan(mine, cfg.fingerprint(), cfg.methods, digests, out_root,
                                                    opts.overwrite, run_id))
        if cfg is not None:
            cfg.model.to(device)
        amp = opts.amp or (cfg.amp if cfg is not None else False)
        writer = PartWriter(part_path(out_root, d.rank))
        summary = Summary()
        markers: dict[int, dict[str, Any]] = {case.index: base for case, base in todo}
        for case, marker in skipped:
            summary.skipped += 1
            for row in marker.get("rows", []):
                row = {**row, "status": "skipped", "case_index": case.index, "case_id": case.case_id,
                       "run_id": row.get("run_id") or marker.get("run_id")}
                writer.write(row)
        bar = tqdm(total=len(todo), disable=opts.quiet or not d.is_main, unit="case",
                   desc="medcam3d explain", file=sys.stderr)
        loaded_cases: Any = ()
        if todo:
            from medcam3d.cli.loading import iter_loaded

            loaded_cases = iter_loaded([case for case, _ in todo], opts.workers)
        for loaded in loaded_cases:
            rows = _explain_case(loaded, cfg, out_root, device, amp, markers[loaded.case.index])
            for row in rows:
                row["run_id"] = row.get("run_id") or run_id
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
        if lock is not None:
            lock.release()
        dist.teardown(d)

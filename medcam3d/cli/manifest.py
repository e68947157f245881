"""The manifest: one row per case and method for EVERY case in the output folder.

While a run works, each rank appends its rows to a JSONL part (a crash loses nothing finished). At
the end the main process, still holding the output folder's lock (:mod:`medcam3d.cli.lock`), merges:
this run's rows replace the rows of the cases it ran or skipped; the previous manifest's rows of
other cases stay (failed cases, and finished cases whose done-marker is still on disk); a finished
case folder missing from the previous manifest is added from its done-marker. Each row names the
run that produced its outputs (``run_id``). Columns a row carries beyond :data:`COLUMNS` (added by
other parts of medcam3d) pass through, after the known ones.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medcam3d.cli.resume import atomic_write_text, read_marker
from medcam3d.cli.scoring import COLUMNS as SCORING_COLUMNS
from medcam3d.errors import ExportError

# seconds per stage of a case and method (seconds_load: the case's loading, on its first row only;
# 0.0 on the others, so the column sums to the run's loading time)
STAGE_COLUMNS = (
    "seconds_load",
    "seconds_preprocess",
    "seconds_engine",
    "seconds_inverse",
    "seconds_write",
    "seconds_montage",
)

COLUMNS = (
    "case_index",
    "case_id",
    "input",
    "mask",
    "method",
    "target_layer",
    "status",
    "error",
    "seconds",
    "outputs",
    "class_names",
    "logits",
    "probabilities",
    "outside_scan_fraction",
    *SCORING_COLUMNS,  # per-class peaks, empty-map flags, scores against the case's mask
    *STAGE_COLUMNS,
    "bytes_written",
    "notes",
    "run_id",
    "series_uid",
)
#: Columns holding lists (';'-joined in the CSV).
LIST_COLUMNS = ("outputs", "class_names", "logits", "probabilities", "notes")
FORMATS = ("csv", "jsonl", "both")
MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")


def part_path(out_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` appends its rows while running."""
    return out_dir / f"manifest.rank{rank}.jsonl"


class PartWriter:
    """Appends rows as JSON lines and flushes each one (a crash loses nothing finished)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "w", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        try:
            self._fh.write(json.dumps(_ordered(row)) + "\n")
            self._fh.flush()
        except OSError as exc:
            raise ExportError(f"cannot write {str(self.path)!r}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        try:
            self._fh.close()
        except OSError:
            pass


def _ordered(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row.get(k) for k in COLUMNS}
    out.update({k: v for k, v in row.items() if k not in out})
    return out


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file (an unfinished last line is ignored)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _from_csv(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {k: (v if v != "" else None) for k, v in row.items() if k is not None}
    for key in LIST_COLUMNS:
        if isinstance(out.get(key), str):
            items = out[key].split(";")
            if key in ("logits", "probabilities"):
                try:
                    out[key] = [float(v) for v in items]
                    continue
                except ValueError:
                    pass
            out[key] = items
    for key in ("case_index",):
        try:
            out[key] = int(out[key])
        except (TypeError, ValueError):
            pass
    return out


def read_previous(out_dir: Path) -> list[dict[str, Any]]:
    """Rows of the manifest already in ``out_dir`` (the newer of manifest.jsonl/.csv; none if
    neither exists or it cannot be read)."""
    found = [p for p in (out_dir / "manifest.jsonl", out_dir / "manifest.csv") if p.is_file()]
    if not found:
        return []
    newest = max(found, key=lambda p: p.stat().st_mtime_ns)  # JSONL wins a tie (exact types)
    try:
        if newest.suffix == ".jsonl":
            return read_rows(newest)
        with open(newest, newline="", encoding="utf-8") as fh:
            return [_from_csv(r) for r in csv.DictReader(fh)]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _by_case(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(str(row.get("case_id")), []).append(row)
    return grouped


def merge_rows(
    previous: list[dict[str, Any]], current: list[dict[str, Any]], out_dir: Path
) -> list[dict[str, Any]]:
    """The manifest of the whole folder (see module docstring), in a stable order: previous
    cases where they were, then this run's new cases in case order, then cases found on disk."""
    current = sorted(current, key=lambda r: r.get("case_index") or 0)
    now, before = _by_case(current), _by_case(previous)
    merged: list[dict[str, Any]] = []
    seen: set[str] = set()
    for case_id, rows in before.items():
        seen.add(case_id)
        if case_id in now:
            merged.extend(now[case_id])
        elif all(r.get("status") == "failed" for r in rows):
            merged.extend(rows)  # no outputs on disk; the failure stays on record
        elif read_marker(out_dir / case_id) is not None:
            merged.extend(rows)  # finished earlier, outputs still there
        # else: its folder is gone, so its rows would point at nothing
    for case_id, rows in now.items():
        if case_id not in seen:
            merged.extend(rows)
            seen.add(case_id)
    for folder in sorted(p for p in out_dir.iterdir() if p.is_dir() and p.name not in seen):
        marker = read_marker(folder)
        if marker is not None:
            merged.extend(dict(r, case_id=folder.name) for r in marker.get("rows", []))
    return merged


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    cols = list(COLUMNS)
    for row in rows:
        cols.extend(k for k in row if k not in cols)
    return cols


def _csv_value(value: Any) -> Any:
    if isinstance(value, list):
        return ";".join(" ".join(map(str, v)) if isinstance(v, list) else ("" if v is None else str(v))
                        for v in value)
    return "" if value is None else value


def write_manifest(rows: list[dict[str, Any]], out_dir: Path, fmt: str) -> list[Path]:
    """Write the manifest(s) (rows in the given order); returns the paths.

    CSV cells holding lists (outputs, class names, logits, probabilities, outside_scan_fraction: per
    class the share of the positive map mass that lay outside the scan on the model grid; notes: what
    the loader or the writer did beyond the plain path, e.g. fitted DICOM positions or a tilted scan
    resliced) are ';'-joined.

    Raises:
        ExportError: a manifest could not be written (e.g. disk full); no temporary file is left.
    """
    cols = _columns(rows)
    written = []
    if fmt in ("jsonl", "both"):
        path = out_dir / "manifest.jsonl"
        text = "".join(json.dumps({k: row.get(k) for k in cols}) + "\n" for row in rows)
        atomic_write_text(path, text)
        written.append(path)
    if fmt in ("csv", "both"):
        path = out_dir / "manifest.csv"
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=cols)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in cols})
        atomic_write_text(path, buffer.getvalue())
        written.append(path)
    return written


def merge_parts(out_dir: Path, world_size: int, fmt: str) -> tuple[list[dict[str, Any]], list[Path]]:
    """Read every rank's part, merge with the folder's previous manifest and done-markers, write
    the manifest(s), delete the parts. Returns (this run's rows, paths written)."""
    rows: list[dict[str, Any]] = []
    parts = [part_path(out_dir, r) for r in range(world_size)]
    for p in parts:
        if p.exists():
            rows.extend(read_rows(p))
    merged = merge_rows(read_previous(out_dir), rows, out_dir)
    written = write_manifest(merged, out_dir, fmt)
    for p in parts:
        p.unlink(missing_ok=True)
    return rows, written

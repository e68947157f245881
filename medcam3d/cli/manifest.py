"""Per-case result rows: written as each case finishes (JSONL part per rank), merged at the end
into ``manifest.csv`` and/or ``manifest.jsonl`` sorted by case order."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from medcam3d.cli.scoring import COLUMNS as SCORING_COLUMNS

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
)
FORMATS = ("csv", "jsonl", "both")


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
        self._fh.write(json.dumps({k: row.get(k) for k in COLUMNS}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


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


def _csv_value(value: Any) -> Any:
    if isinstance(value, list):
        return ";".join(" ".join(map(str, v)) if isinstance(v, list) else ("" if v is None else str(v))
                        for v in value)
    return "" if value is None else value


def write_manifest(rows: list[dict[str, Any]], out_dir: Path, fmt: str) -> list[Path]:
    """Write the final manifest(s) sorted by (case_index, method order kept); returns the paths.

    CSV cells holding lists (outputs, class names, logits, probabilities, outside_scan_fraction: per
    class the share of the positive map mass that lay outside the scan on the model grid; notes: what
    the loader or the writer did beyond the plain path, e.g. fitted DICOM positions or a tilted scan
    resliced) are ';'-joined.
    """
    rows = sorted(rows, key=lambda r: r.get("case_index", 0))
    written = []
    if fmt in ("jsonl", "both"):
        path = out_dir / "manifest.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps({k: row.get(k) for k in COLUMNS}) + "\n")
        os.replace(tmp, path)
        written.append(path)
    if fmt in ("csv", "both"):
        path = out_dir / "manifest.csv"
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _csv_value(row.get(k)) for k in COLUMNS})
        os.replace(tmp, path)
        written.append(path)
    return written


def merge_parts(out_dir: Path, world_size: int, fmt: str) -> tuple[list[dict[str, Any]], list[Path]]:
    """Read every rank's part, write the final manifest(s), delete the parts."""
    rows: list[dict[str, Any]] = []
    parts = [part_path(out_dir, r) for r in range(world_size)]
    for p in parts:
        if p.exists():
            rows.extend(read_rows(p))
    written = write_manifest(rows, out_dir, fmt)
    for p in parts:
        p.unlink(missing_ok=True)
    return rows, written

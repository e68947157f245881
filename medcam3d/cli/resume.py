"""Done-markers that make runs resumable, compared by content.

A case is skipped when its marker's hash matches and every file it lists exists. The hash covers
the config fingerprint (normalised config, checkpoint bytes, model source file: see
:meth:`medcam3d.config.RunConfig.fingerprint`), the methods, the per-case load options and the
input's CONTENT: the SHA-256 of every byte of a NIfTI file, or of every file directly inside a
DICOM folder (name, size and bytes). A file copied over, edited in place, or a DICOM folder whose
files change is therefore recomputed, whatever its path and modification time say. Hashing reads
each input once more (measured in benchmarks/bench_resume_hash.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from medcam3d.errors import ExportError

MARKER_NAME = ".medcam3d-done.json"
#: Temporary names earlier versions used in the output folder (not hidden).
_OLD_TEMP_NAMES = ("manifest.csv.tmp", "manifest.jsonl.tmp", "summary.csv.tmp")
_CHUNK = 1 << 20


def _file_sha256(path: Path, h: Any) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)


def input_sha256(path: Path) -> str:
    """SHA-256 of an input's content: a file's bytes, or for a folder each regular file directly
    in it (sorted by name: name, size and bytes). Raises OSError when it cannot be read."""
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.iterdir()):
            if p.is_file():
                h.update(f"{p.name}|{p.stat().st_size}|".encode())
                _file_sha256(p, h)
    else:
        _file_sha256(path, h)
    return h.hexdigest()


def case_hash(
    config_fingerprint: str, methods: list[str], input_digest: str, load_options: str = ""
) -> str:
    """SHA-256 of what decides a case's outputs (config, methods, input content, load options)."""
    text = "|".join([config_fingerprint, ",".join(methods), input_digest, load_options])
    return hashlib.sha256(text.encode()).hexdigest()


def marker_path(case_dir: Path) -> Path:
    return case_dir / MARKER_NAME


def read_marker(case_dir: Path) -> dict[str, Any] | None:
    """The marker's content, or None if missing or unreadable."""
    try:
        with open(marker_path(case_dir), encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else None
    except (OSError, json.JSONDecodeError):
        return None


def is_done(case_dir: Path, expected_hash: str) -> dict[str, Any] | None:
    """The marker if the case is finished with this hash and all its files exist, else None."""
    marker = read_marker(case_dir)
    if marker is None or marker.get("hash") != expected_hash:
        return None
    files = [case_dir / f for f in marker.get("files", [])]
    return marker if all(f.is_file() for f in files) else None


def collision(case_dir: Path, case_id: str, input_path: Path, input_digest: str) -> str | None:
    """A message when ``case_dir`` holds finished outputs of a DIFFERENT input (another path and
    other content) than ``input_path``; None otherwise (same input, possibly edited, or none)."""
    marker = read_marker(case_dir)
    if marker is None:
        return None
    old_path, old_digest = marker.get("input"), marker.get("input_sha256")
    if old_path == str(input_path) or (old_digest is not None and old_digest == input_digest):
        return None
    return (
        f"case id {case_id!r}: {str(case_dir)!r} holds the maps of {old_path!r}, a different input "
        f"than {str(input_path)!r}; pass --overwrite to replace them, give this case another id "
        "(CSV case_id column), or choose another --output"
    )


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and an atomic
    rename; on any OSError (e.g. ENOSPC) the temporary file is removed and ExportError raised."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        reason = exc.strerror or str(exc)
        hint = "; free some space and rerun" if exc.errno == errno.ENOSPC else ""
        raise ExportError(f"cannot write {str(path)!r}: {reason}{hint}") from exc


def write_marker(case_dir: Path, content: dict[str, Any]) -> None:
    """Write the marker atomically (it is the last file of a finished case)."""
    atomic_write_text(marker_path(case_dir), json.dumps(content, indent=1))


def remove_previous(case_dir: Path) -> None:
    """Delete the files a previous (stale) marker lists, then the marker itself."""
    marker = read_marker(case_dir)
    if marker:
        for name in marker.get("files", []):
            p = case_dir / name
            if p.parent == case_dir and p.is_file():
                p.unlink()
    marker_path(case_dir).unlink(missing_ok=True)


def is_partial_file(name: str) -> bool:
    """True for the temporary files medcam3d writes before an atomic rename: NIfTI parts
    (``.<name>.<random>.partial.nii.gz``), montages (``.<stem>.tmp.png``), text (``.<name>.tmp``)."""
    return name.startswith(".") and (".partial" in name or name.endswith((".tmp", ".tmp.png")))


def clean_partials(out_root: Path) -> list[Path]:
    """Remove temporary files a killed run left in ``out_root`` and its case folders (one level),
    and stale per-rank manifest parts. Returns what was removed."""
    removed: list[Path] = []
    candidates = list(out_root.glob("manifest.rank*.jsonl"))
    candidates += [out_root / n for n in _OLD_TEMP_NAMES if (out_root / n).is_file()]
    for folder in [out_root, *(p for p in out_root.iterdir() if p.is_dir())]:
        candidates.extend(p for p in folder.iterdir() if p.is_file() and is_partial_file(p.name))
    for p in candidates:
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed

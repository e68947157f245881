"""Done-markers that make runs resumable: a case whose marker hash matches and whose files all
exist is skipped. The hash covers the config fingerprint, the methods and the input path."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MARKER_NAME = ".medcam3d-done.json"


def case_hash(config_fingerprint: str, methods: list[str], input_path: Path) -> str:
    """SHA-256 of what decides a case's outputs."""
    text = "|".join([config_fingerprint, ",".join(methods), str(input_path)])
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


def write_marker(case_dir: Path, content: dict[str, Any]) -> None:
    """Write the marker atomically (it is the last file of a finished case)."""
    path = marker_path(case_dir)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(content, fh, indent=1)
    os.replace(tmp, path)


def remove_previous(case_dir: Path) -> None:
    """Delete the files a previous (stale) marker lists, then the marker itself."""
    marker = read_marker(case_dir)
    if marker:
        for name in marker.get("files", []):
            p = case_dir / name
            if p.parent == case_dir and p.is_file():
                p.unlink()
    marker_path(case_dir).unlink(missing_ok=True)

"""``medcam3d montage OUTPUT/``: re-render the PNG montages of a finished run from its saved maps.

Reads ``OUTPUT/manifest.jsonl`` (else ``manifest.csv``); for every case and method whose status is
ok or skipped it loads the scan (``input`` column), the case's mask (``mask`` column, checked as in
``explain``) and the map NIfTI files listed in ``outputs`` (:func:`medcam3d.load_explanation`), and
writes ``<case_id>_<method>_montage.png`` next to them. The model is never run, so changing only the
display window costs one scan read per case.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medcam3d.errors import InputError
from medcam3d.filenames import NIFTI_SUFFIXES


@dataclass
class MontageSummary:
    """Written PNGs and per-case failures ("case/method: message")."""

    written: list[Path] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def _manifest_rows(out: Path) -> list[dict[str, Any]]:
    jl, cs = out / "manifest.jsonl", out / "manifest.csv"
    if jl.is_file():
        return [json.loads(line) for line in jl.read_text(encoding="utf-8").splitlines() if line.strip()]
    if cs.is_file():
        with open(cs, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        for r in rows:
            r["outputs"] = [x for x in (r.get("outputs") or "").split(";") if x]
            r["mask"] = r.get("mask") or None
        return rows
    raise InputError(f"{out} has no manifest.jsonl or manifest.csv; give the --output folder of a "
                     "finished 'medcam3d explain' run")


def rerender(out_dir: str | Path, window: tuple[float, float], cases: list[str] | None = None,
             quiet: bool = False) -> MontageSummary:
    """Re-render montages from saved maps (see module docstring); ``window`` is (level, width) in HU.

    Raises:
        InputError: no manifest in ``out_dir``, or ``cases`` names a case that is not in it.
    """
    from medcam3d.cli.scoring import load_mask
    from medcam3d.io import load_volume
    from medcam3d.io.maps import load_explanation
    from medcam3d.report import save_montage

    out = Path(out_dir).expanduser().resolve()
    rows = [r for r in _manifest_rows(out) if r.get("status") in ("ok", "skipped")]
    if cases:
        known = {r["case_id"] for r in rows}
        missing = [c for c in cases if c not in known]
        if missing:
            raise InputError(f"--case: not in {out / 'manifest'}: {', '.join(missing)}")
        rows = [r for r in rows if r["case_id"] in cases]
    level, width = window
    limits = (level - width / 2, level + width / 2)
    summary = MontageSummary()
    volumes: dict[str, Any] = {}
    for r in rows:
        label = f"{r['case_id']}/{r['method']}"
        try:
            maps = [out / f for f in r.get("outputs") or [] if f.endswith(NIFTI_SUFFIXES)
                    and "all-classes" not in f]
            if not maps:
                raise InputError("the manifest lists no map files for it")
            if r["input"] not in volumes:
                volumes = {r["input"]: load_volume(r["input"])}  # keep one scan in memory
            vol = volumes[r["input"]]
            expl = load_explanation(maps)
            mask = load_mask(Path(r["mask"]), vol) if r.get("mask") else None
            png = maps[0].parent / f"{r['case_id']}_{r['method']}_montage.png"
            summary.written.append(save_montage(vol, expl, png, limits, title=f"{r['case_id']} - {r['method']}",
                                                mask=mask))
        except Exception as exc:  # one bad case must not stop the rest
            summary.failed.append(f"{label}: {type(exc).__name__}: {exc}")
            if not quiet:
                print(f"medcam3d montage: {label} failed: {exc}", file=sys.stderr)
    return summary


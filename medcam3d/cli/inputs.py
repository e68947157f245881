"""Turn the ``--input`` arguments into an ordered list of cases with safe, unique ids.

Accepted inputs: NIfTI files, DICOM series folders, a folder of them (one level: ``*.nii``/
``*.nii.gz`` files and subfolders that hold DICOM files), or a CSV with a ``path`` column (optional
``case_id`` and ``mask`` columns; relative paths are relative to the CSV's folder). In a folder,
label images are not cases: they are paired with their scan by name (:mod:`medcam3d.cli.pairing`). Case ids come
from file/folder names or the CSV, never from DICOM patient fields unless ``keep_identifiers``.
"""

from __future__ import annotations

import csv
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from medcam3d.errors import InputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Case:
    """One scan to explain: ``index`` (order in the run), ``case_id``, ``path``, optional ``mask``."""

    index: int
    case_id: str
    path: Path
    mask: Path | None = None


def sanitize_case_id(name: str) -> str:
    """Only ``[A-Za-z0-9._-]``, no '..', no leading/trailing dots; ``"case"`` if nothing is left."""
    s = _UNSAFE.sub("_", name)
    s = re.sub(r"\.{2,}", "_", s)
    s = s.strip("._-")[:96].strip("._-")
    return s or "case"


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    if path.suffix.lower() == ".dcm":
        return True
    return False


def holds_dicom(folder: Path) -> bool:
    """True if ``folder`` directly contains at least one DICOM file."""
    try:
        return any(p.is_file() and _is_dicom(p) for p in sorted(folder.iterdir()))
    except OSError:
        return False


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _expand(arg: Path) -> list[tuple[Path, str | None, Path | None]]:
    """(path, case_id from CSV or None, mask) for one --input argument."""
    if not arg.exists():
        raise InputError(f"--input: no such file or folder: {str(arg)!r}")
    if arg.is_dir():
        if holds_dicom(arg):
            return [(arg, None, None)]
        found = [
            p
            for p in sorted(arg.iterdir())
            if (p.is_file() and _is_nifti(p)) or (p.is_dir() and holds_dicom(p))
        ]
        if not found:
            raise InputError(
                f"--input: {str(arg)!r} holds no DICOM files, no .nii/.nii.gz files and no DICOM "
                "subfolders (only one level is searched)"
            )
        from medcam3d.cli.pairing import pair_folder

        pairs, messages = pair_folder(found)  # label images become masks or are skipped
        for message in messages:
            print(f"medcam3d: {message}", file=sys.stderr)
        if not pairs:
            raise InputError(f"--input: {str(arg)!r} holds only label images (masks), no scans")
        return [(p, None, mask) for p, mask in pairs]
    if arg.suffix.lower() == ".csv":
        return _read_csv(arg)
    return [(arg, None, None)]  # a NIfTI or anything else: load_volume judges it per case


def _read_csv(path: Path) -> list[tuple[Path, str | None, Path | None]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            if "path" not in fields:
                raise InputError(
                    f"--input: CSV {str(path)!r} needs a 'path' column (found: {', '.join(fields) or 'none'}); "
                    "optional columns: case_id, mask"
                )
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"--input: cannot read CSV {str(path)!r}: {exc}") from exc
    out = []
    for row in rows:
        if not row.get("path"):
            continue
        p = Path(row["path"]).expanduser()
        p = p if p.is_absolute() else path.parent / p
        mask = row.get("mask") or None
        mask_path = None
        if mask:
            mask_path = Path(mask).expanduser()
            mask_path = mask_path if mask_path.is_absolute() else path.parent / mask_path
        out.append((p, row.get("case_id") or None, mask_path))
    if not out:
        raise InputError(f"--input: CSV {str(path)!r} lists no paths")
    return out


def _patient_id(folder: Path) -> str | None:
    try:
        import pydicom

        for p in sorted(folder.iterdir()):
            if p.is_file() and _is_dicom(p):
                ds = pydicom.dcmread(p, stop_before_pixels=True)
                return str(getattr(ds, "PatientID", "") or "") or None
    except Exception:
        return None
    return None


def collect_cases(inputs: list[str | os.PathLike[str]], *, keep_identifiers: bool = False) -> list[Case]:
    """Expand ``inputs`` into cases in a deterministic order with unique sanitised ids.

    Duplicated ids get ``-2``, ``-3``... suffixes. The same input path listed twice is one case.

    Raises:
        InputError: a command-line path that does not exist, an empty folder, a CSV without a
            ``path`` column.
    """
    raw: list[tuple[Path, str | None, Path | None]] = []
    for arg in inputs:
        raw.extend(_expand(Path(arg).expanduser()))
    seen_paths: set[Path] = set()
    used: set[str] = set()
    cases: list[Case] = []
    for path, given_id, mask in raw:
        resolved = Path(os.path.abspath(path))
        if resolved in seen_paths:
            continue
        seen_paths.add(resolved)
        if given_id:
            base = given_id
        elif keep_identifiers and resolved.is_dir() and (pid := _patient_id(resolved)):
            base = pid
        else:
            base = _stem(resolved)
        case_id = sanitize_case_id(base)
        unique, n = case_id, 1
        while unique.lower() in used:
            n += 1
            unique = f"{case_id}-{n}"
        used.add(unique.lower())
        cases.append(Case(index=len(cases), case_id=unique, path=resolved, mask=mask))
    return cases


def check_output_dir(output: Path, cases: list[Case], inputs: list[str | os.PathLike[str]]) -> None:
    """Refuse an output folder that is an existing file, equals an input, or lies inside an input
    folder (outputs must never overwrite or mix with inputs)."""
    out = Path(os.path.abspath(output))
    sources = {Path(os.path.abspath(Path(a).expanduser())) for a in inputs}
    sources |= {c.path for c in cases}
    for src in sources:
        if out == src:
            raise InputError(f"--output: {str(out)!r} is an input; choose another folder")
        if src.is_dir() and out.is_relative_to(src) and holds_dicom(src):
            raise InputError(
                f"--output: {str(out)!r} is inside the input DICOM folder {str(src)!r}; choose a "
                "folder outside it"
            )
        if src.is_file() and out.is_relative_to(src):
            raise InputError(f"--output: {str(out)!r} is inside the input file path {str(src)!r}")
    if out.exists() and not out.is_dir():
        raise InputError(f"--output: {str(out)!r} exists and is not a folder")

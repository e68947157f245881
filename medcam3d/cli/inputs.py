"""Turn the ``--input`` arguments into an ordered list of cases with safe, unique ids.

Accepted inputs: NIfTI files, DICOM series folders, a folder of them (one level: ``*.nii``/
``*.nii.gz`` files and subfolders that hold DICOM files), or a CSV with a ``path`` column (optional
``case_id``, ``mask``, ``series_uid`` and ``allow_non_ct`` columns, and ``input.<name>`` columns
that give ``model.forward`` a per-case keyword input ``<name>`` — one number, or numbers separated by
``;`` for a vector; relative paths are relative to the CSV's folder). In a folder, label images are not cases: they are paired with their scan by name
(:mod:`medcam3d.cli.pairing`). Case ids come from file/folder names or the CSV, never from DICOM
patient fields unless ``keep_identifiers``; names the output folder itself uses (the manifest) are
never case ids.
"""

from __future__ import annotations

import csv
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from medcam3d.errors import InputError
from medcam3d.filenames import NIFTI_SUFFIXES, nifti_stem

#: Names in the output folder that belong to the run, not to a case (compared in lower case).
RESERVED_IDS = ("manifest.csv", "manifest.jsonl", "summary.csv")
CSV_COLUMNS = ("path", "case_id", "mask", "series_uid", "allow_non_ct")
#: A CSV column ``input.<name>`` is the per-case keyword input ``<name>`` of ``model.forward``.
INPUT_PREFIX = "input."
_TRUE, _FALSE = ("1", "true", "yes", "y"), ("", "0", "false", "no", "n")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Case:
    """One scan to explain: ``index`` (order in the run), ``case_id``, ``path``, optional ``mask``,
    and how to load it: ``series_uid`` (DICOM folder with several series) and ``allow_non_ct``."""

    index: int
    case_id: str
    path: Path
    mask: Path | None = None
    series_uid: str | None = None
    allow_non_ct: bool = False
    #: per-case keyword inputs of ``model.forward`` from ``input.<name>`` CSV columns: a float, or a
    #: tuple of floats for a vector (given to the model as a (1, n) float32 tensor)
    forward_inputs: tuple[tuple[str, float | tuple[float, ...]], ...] = ()

    def load_options(self) -> str:
        """The load options and per-case model inputs as text (part of the resume hash)."""
        text = f"series_uid={self.series_uid or ''}|allow_non_ct={int(self.allow_non_ct)}"
        if self.forward_inputs:
            text += "|inputs=" + ";".join(f"{k}={v!r}" for k, v in self.forward_inputs)
        return text

    def model_inputs(self) -> dict[str, object]:
        """The per-case keyword inputs as ``model.forward`` takes them: a float stays a float, a
        vector becomes a (1, n) float32 tensor (the same rule as the config's ``forward_kwargs``)."""
        import torch

        return {
            k: torch.tensor(list(v), dtype=torch.float32)[None] if isinstance(v, tuple) else v
            for k, v in self.forward_inputs
        }


def sanitize_case_id(name: str) -> str:
    """Only ``[A-Za-z0-9._-]``, no '..', no leading/trailing dots; ``"case"`` if nothing is left."""
    s = _UNSAFE.sub("_", name)
    s = re.sub(r"\.{2,}", "_", s)
    s = s.strip("._-")[:96].strip("._-")
    return s or "case"


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


_Raw = tuple[Path, str | None, Path | None, dict[str, object]]


def _expand(arg: Path) -> list[_Raw]:
    """(path, case_id from CSV or None, mask, other CSV cells) for one --input argument."""
    if not arg.exists():
        raise InputError(f"--input: no such file or folder: {str(arg)!r}")
    if arg.is_dir():
        if holds_dicom(arg):
            return [(arg, None, None, {})]
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
        return [(p, None, mask, {}) for p, mask in pairs]
    if arg.suffix.lower() == ".csv":
        return _read_csv(arg)
    return [(arg, None, None, {})]  # a NIfTI or anything else: load_volume judges it per case


def _read_csv(path: Path) -> list[_Raw]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            if "path" not in fields:
                raise InputError(
                    f"--input: CSV {str(path)!r} needs a 'path' column (found: {', '.join(fields) or 'none'}); "
                    "optional columns: case_id, mask, series_uid, allow_non_ct, input.<name>"
                )
            for f in fields:
                if f.startswith(INPUT_PREFIX) and not f[len(INPUT_PREFIX):].isidentifier():
                    raise InputError(
                        f"--input: CSV {str(path)!r}: column {f!r} is not input.<argument name>; "
                        "name it after a keyword argument of the model's forward(), e.g. input.clinical"
                    )
            rows = []
            for row in reader:
                if None in row:  # DictReader files surplus cells under the key None
                    raise InputError(
                        f"--input: CSV {str(path)!r} line {reader.line_num} has "
                        f"{len(fields) + len(row[None])} fields but the header has {len(fields)}; "
                        "quote values that contain commas"
                    )
                rows.append({(k or "").strip(): (v or "").strip() for k, v in row.items()})
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
        flag = row.get("allow_non_ct", "").lower()
        if flag not in _TRUE + _FALSE:
            raise InputError(
                f"--input: CSV {str(path)!r}: allow_non_ct must be true/false (or 1/0, yes/no), got "
                f"{row['allow_non_ct']!r}"
            )
        extra: dict[str, object] = {"series_uid": row.get("series_uid", ""),
                                    "allow_non_ct": str(flag in _TRUE)}
        extra["inputs"] = _row_inputs(row, path)
        out.append((p, row.get("case_id") or None, mask_path, extra))
    if not out:
        raise InputError(f"--input: CSV {str(path)!r} lists no paths")
    return out


def _row_inputs(row: dict[str, str], path: Path) -> tuple[tuple[str, float | tuple[float, ...]], ...]:
    """The ``input.<name>`` cells of one CSV row: one number -> float, ``a;b;c`` -> tuple of floats."""
    values: list[tuple[str, float | tuple[float, ...]]] = []
    for column in sorted(k for k in row if k.startswith(INPUT_PREFIX)):
        cell = row[column]
        parts = [p.strip() for p in cell.split(";")]
        try:
            numbers = tuple(float(p) for p in parts)
        except ValueError:
            numbers = ()
        if not cell or not numbers or not all(map(math.isfinite, numbers)):
            raise InputError(
                f"--input: CSV {str(path)!r}, case {row.get('path')!r}: {column} must be a finite number "
                f"or numbers separated by ';', got {cell!r}"
            )
        name = column[len(INPUT_PREFIX):]
        values.append((name, numbers if len(parts) > 1 else numbers[0]))
    return tuple(values)


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


def collect_cases(
    inputs: list[str | os.PathLike[str]],
    *,
    keep_identifiers: bool = False,
    series_uid: str | None = None,
    allow_non_ct: bool = False,
) -> list[Case]:
    """Expand ``inputs`` into cases in a deterministic order with unique sanitised ids.

    Duplicated ids get ``-2``, ``-3``... suffixes, as do ids equal to a name in
    :data:`RESERVED_IDS`. The same input path listed twice is one case. ``series_uid`` and
    ``allow_non_ct`` apply to every case; a CSV's cells of the same name override them per case.

    Raises:
        InputError: a command-line path that does not exist, an empty folder, a CSV without a
            ``path`` column or with a row of more cells than its header.
    """
    raw: list[_Raw] = []
    for arg in inputs:
        raw.extend(_expand(Path(arg).expanduser()))
    seen_paths: set[Path] = set()
    used: set[str] = set(RESERVED_IDS)
    cases: list[Case] = []
    for path, given_id, mask, extra in raw:
        resolved = Path(os.path.abspath(path))
        if resolved in seen_paths:
            continue
        seen_paths.add(resolved)
        if given_id:
            base = given_id
        elif keep_identifiers and resolved.is_dir() and (pid := _patient_id(resolved)):
            base = pid
        else:
            base = nifti_stem(resolved)
        case_id = sanitize_case_id(base)
        unique, n = case_id, 1
        while unique.lower() in used:
            n += 1
            unique = f"{case_id}-{n}"
        used.add(unique.lower())
        uid = str(extra.get("series_uid") or series_uid or "") or None
        non_ct = allow_non_ct or extra.get("allow_non_ct") == "True"
        inputs = extra.get("inputs") or ()
        cases.append(Case(index=len(cases), case_id=unique, path=resolved, mask=mask,
                          series_uid=uid, allow_non_ct=non_ct, forward_inputs=inputs))
    return cases


def check_output_dir(output: Path, cases: list[Case], inputs: list[str | os.PathLike[str]]) -> None:
    """Refuse an output folder that is an existing file, equals an input, lies inside an input
    folder, or whose case folder for some case would be, or hold, an input (e.g. the output is the
    parent of a DICOM series folder: the case folder would be the series folder itself). Outputs
    must never overwrite or mix with inputs."""
    out = Path(os.path.abspath(output))
    sources = {Path(os.path.abspath(Path(a).expanduser())) for a in inputs}
    sources |= {c.path for c in cases}
    for src in sources:
        if out == src:
            raise InputError(f"--output: {str(out)!r} is an input; choose another folder")
        if src.is_dir() and out.is_relative_to(src):
            kind = "DICOM folder" if holds_dicom(src) else "folder"
            raise InputError(
                f"--output: {str(out)!r} is inside the input {kind} {str(src)!r}; choose a "
                "folder outside it"
            )
        if src.is_file() and out.is_relative_to(src):
            raise InputError(f"--output: {str(out)!r} is inside the input file path {str(src)!r}")
    for case in cases:
        case_dir = out / case.case_id
        for src in sources:
            if src == case_dir or src.is_relative_to(case_dir):
                raise InputError(
                    f"--output: case {case.case_id!r} would be written to {str(case_dir)!r}, which "
                    f"is or holds the input {str(src)!r}; choose an output folder that does not "
                    "contain the inputs' folders"
                )
    if out.exists() and not out.is_dir():
        raise InputError(f"--output: {str(out)!r} exists and is not a folder")

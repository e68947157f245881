"""Write explanation maps as NIfTI files that open on the source scan in any viewer.

Each map file holds 16-bit integers with ``scl_slope`` (every value within 7.6e-6 of the map's
maximum, see :func:`quantise_uint16`), or float32 on request. A map on a NIfTI scan's own grid
carries that scan's qform and sform header fields verbatim (:mod:`medcam3d.io.xform`), any other map
its RAS affine in both qform and sform (codes from meta, else 1); ``cal_min``/``cal_max`` set to the
map's range, a short ``descrip`` and a JSON comment extension (method, layer, class, score). Nothing
from the patient goes into headers or file names.

Writes are all-or-nothing: every target is checked first (existing file, input file), each file is
written to a hidden temp file in ``out_dir`` and moved into place with an atomic rename; on any error
the temp files and the files this call already placed are removed.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medcam3d.errors import ExportError, OutputExistsError
from medcam3d.filenames import NIFTI_SUFFIXES, nifti_stem
from medcam3d.io.affine import ras_affine, to_numpy_affine
from medcam3d.io.reslice import RESLICED_SUFFIX, is_sheared, reslice_orthogonal, shear_degrees
from medcam3d.io.xform import SourceXforms, source_xforms

if TYPE_CHECKING:  # pragma: no cover
    from medcam3d.explanation import Explanation

DEFAULT_STEM = "medcam3d"
NIFTI_SUFFIX = ".nii.gz"
STORAGES = ("float32", "uint16")
# gzip level: nibabel's default, 1. Measured on lung1 maps (512x512x48): level 6 takes 1.0-1.4x the
# time for 0-1 % fewer bytes, in float32 and in uint16, so the level stays 1.
GZIP_LEVEL = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_PART = 64


def sanitize_name(name: Any, fallback: str) -> str:
    """A file-name part made only of ``[A-Za-z0-9._-]``: no separators, no '..', no leading dot."""
    s = _UNSAFE.sub("_", str(name))
    s = re.sub(r"\.{2,}", ".", s)
    s = s.strip("._-")[:_MAX_PART].strip("._-")
    return s or fallback


def _to_numpy(maps: Any) -> np.ndarray:
    try:
        import torch

        if isinstance(maps, torch.Tensor):
            t = maps.as_tensor() if hasattr(maps, "as_tensor") else maps
            return t.detach().to("cpu", torch.float32).numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(maps, dtype=np.float32)


def quantise_uint16(data: np.ndarray, value_range: tuple[float, float] | None = None) -> tuple[np.ndarray, float]:
    """Non-negative float map -> (uint16 array, scl_slope) with ``data ~= stored * scl_slope``.

    ``scl_slope`` = ``max(data) / 65535`` rounded up to the next float32 (the header field is
    float32; 1.0 for an all-zero map) and ``stored = round(data / scl_slope)`` computed in float64,
    so zeros stay exactly zero and every value a reader gets back (``stored * scl_slope``, NIfTI-1
    standard, applied by nibabel, ITK/SimpleITK, 3D Slicer, ITK-SNAP) is within ``scl_slope / 2`` of
    the map's value: at most 7.63e-6 of the map's maximum (``max / 131070`` up to float32 rounding
    of the slope; for a 4D array of several classes, of the largest class's maximum). The array
    keeps ``data``'s memory order when that is C or Fortran order, else it is Fortran-ordered.
    ``value_range``: ``(data.min(), data.max())`` when the caller already has them.

    Raises:
        ExportError: negative or non-finite values (maps are ReLU'd and finite).
    """
    data = np.asarray(data, dtype=np.float32)
    if value_range is not None:
        vmin, vmax = float(value_range[0]), float(value_range[1])
    else:
        vmin, vmax = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if not (np.isfinite(vmin) and np.isfinite(vmax)) or vmin < 0:  # a NaN makes min/max NaN
        raise ExportError("uint16 storage needs finite, non-negative maps; use storage='float32'.")
    slope = np.float32(vmax / 65535.0) if vmax > 0 else np.float32(1.0)
    while float(slope) * 65535.0 < vmax:  # round up: the maximum must fit in 65535
        slope = np.nextafter(slope, np.float32(np.inf))
    if not (data.flags.c_contiguous or data.flags.f_contiguous):  # e.g. np.stack of Fortran maps
        data = np.asfortranarray(data)  # NIfTI's order; then data and out walk memory alike
    out = np.empty_like(data, dtype=np.uint16)  # the same (C or Fortran) order as data
    src, dst = data.ravel(order="K"), out.ravel(order="K")  # views, element i of one is element i of the other
    inv = 1.0 / float(slope)
    step = 1 << 22  # float64 temporaries of 32 MB
    for a in range(0, src.size, step):
        q = np.multiply(src[a:a + step], inv, dtype=np.float64)
        np.rint(q, out=q)
        np.minimum(q, 65535.0, out=q)
        dst[a:a + step] = q
    return out, float(slope)


def _ras_affine(maps: Any) -> np.ndarray:
    """The maps' affine in nibabel's RAS world convention (MetaTensor affines are RAS unless meta says LPS)."""
    aff = getattr(maps, "affine", None)
    if aff is None:
        raise ExportError(
            "The maps carry no affine (not a MetaTensor?); cannot place them on the scan. Build the "
            "Explanation from a volume loaded with medcam3d.io.load_volume."
        )
    aff = to_numpy_affine(aff)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise ExportError(f"The maps' affine is not a finite, invertible 4x4 matrix:\n{aff}")
    return ras_affine(maps)


def _meta(maps: Any) -> dict[str, Any]:
    meta = getattr(maps, "meta", None)
    return meta if isinstance(meta, dict) else {}


def _code(value: Any) -> int | None:
    try:
        code = int(np.asarray(value.cpu() if hasattr(value, "cpu") else value).reshape(-1)[0])
    except (TypeError, ValueError, IndexError):
        return None
    import nibabel as nib

    return code if code in nib.nifti1.xform_codes.value_set() else None


def _xform_codes(meta: dict[str, Any]) -> tuple[int, int]:
    """(qform_code, sform_code): the source's where it had any, else 1 (scanner) for both."""
    q, s = _code(meta.get("qform_code")), _code(meta.get("sform_code"))
    if not q and not s:
        return 1, 1
    return (q or 0), (s or 0)


def _flatten_paths(obj: Any) -> list[str]:
    if obj is None:
        return []
    if isinstance(obj, (str, os.PathLike)):
        return [os.fspath(obj)]
    if isinstance(obj, Iterable):
        return [p for o in obj for p in _flatten_paths(o)]
    return []


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def build_nifti(
    data: np.ndarray,
    affine: np.ndarray,
    *,
    qform_code: int = 1,
    sform_code: int = 1,
    descrip: str = "",
    intent_name: str = "",
    extension: dict[str, Any] | None = None,
    source: SourceXforms | None = None,
    storage: str = "float32",
) -> Any:
    """A ``Nifti1Image`` with ``affine`` in qform and sform, cal range and descrip set.

    With ``source`` (the scan's own qform/sform fields, see :mod:`medcam3d.io.xform`) those fields
    are written verbatim instead (quaternion, offsets, qfac, pixdim, srow, both codes), so every
    reader places the map where it places the scan; the codes arguments are then ignored.

    ``storage``: one of :data:`STORAGES`; "float32" stores the values as they are, "uint16" stores
    ``round(v / scl_slope)`` with ``scl_slope = max / 65535`` (see :func:`quantise_uint16`).
    """
    import nibabel as nib

    if storage not in STORAGES:
        raise ExportError(f"storage must be one of {', '.join(STORAGES)}; got {storage!r}.")
    data = np.asarray(data, dtype=np.float32)
    stored = data
    # the map's range: cal_min/cal_max, and the scale of uint16 storage (one pass each, not two)
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if storage == "uint16":
        stored, slope = quantise_uint16(data, value_range=(lo, hi))
        img = nib.Nifti1Image(stored, affine)
        img.header.set_data_dtype(np.uint16)
        img.header.set_slope_inter(slope, 0.0)
    else:
        img = nib.Nifti1Image(data, affine)
        img.header.set_data_dtype(np.float32)
    hdr = img.header
    img.set_sform(affine, code=sform_code)
    img.set_qform(affine, code=qform_code)
    if qform_code and not np.allclose(img.header.get_qform(), affine, atol=1e-4):
        # a sheared affine (e.g. gantry tilt) has no exact quaternion form: keep it in the sform only
        img.set_qform(affine, code=0)
    hdr.set_xyzt_units("mm", "unknown")
    if not (np.isfinite(lo) and np.isfinite(hi)):  # rare: only then pay for a masked copy
        finite = data[np.isfinite(data)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    hdr["cal_min"], hdr["cal_max"] = lo, hi
    hdr["descrip"] = descrip.encode("ascii", "replace")[:80]
    hdr["intent_name"] = intent_name.encode("ascii", "replace")[:15]
    if extension is not None:
        blob = json.dumps(extension, sort_keys=True).encode("utf-8")
        hdr.extensions.append(nib.nifti1.Nifti1Extension("comment", blob))
    if source is not None:
        source.apply(hdr)
        # affine=None: nibabel must not re-derive qform/sform from an affine when saving
        img = nib.Nifti1Image(stored, None, header=hdr)
        if storage == "uint16":  # a new image from an array drops the header's scaling
            img.header.set_slope_inter(slope, 0.0)
    return img


def _write_all(
    items: Iterable[tuple[Any, Path]],
    overwrite: bool,
    *,
    threads: int = 1,
) -> list[Path]:
    """Write ``(image, target)`` pairs all-or-nothing via temp files + rename in the target folder.

    ``items`` may be a generator (images built one at a time); with ``threads`` > 1 up to that
    many images are compressed at once in threads (igzip and zlib release the GIL) while the next is
    built. Replaced files (``overwrite``) are first renamed aside and restored if a later step fails.
    """
    from concurrent.futures import ThreadPoolExecutor

    temps: list[tuple[str, Path]] = []
    placed: list[Path] = []
    backups: list[tuple[str, Path]] = []
    targets: list[Path] = []
    pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
    pending: list[Any] = []
    try:
        for img, target in items:
            targets.append(target)
            ext = ".nii.gz" if target.name.endswith(".nii.gz") else ".nii"  # gzip by suffix
            tmp = _temp_path(target, ".partial" + ext)
            temps.append((tmp, target))
            if pool is None:
                save_image(img, tmp)
                continue
            while len(pending) >= threads:  # bound the images alive at once
                pending.pop(0).result()
            pending.append(pool.submit(save_image, img, tmp))
            del img
        for fut in pending:
            fut.result()
        for tmp, target in temps:
            if overwrite and os.path.lexists(target):
                bak = _temp_path(target, ".bak")
                backups.append((bak, target))
                os.replace(target, bak)
            _place(tmp, target, overwrite)
            placed.append(target)
    except BaseException as e:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for tmp, _ in temps:
            _unlink_quiet(tmp)
        for target in placed:
            _unlink_quiet(target)
        for bak, target in backups:
            try:
                os.replace(bak, target)
            except OSError:
                pass
        if isinstance(e, ExportError):
            raise
        if isinstance(e, Exception):
            raise ExportError(
                f"Could not write {targets[0].parent if targets else ''}: {type(e).__name__}: {e}. "
                "No map file was left behind; check free space and permissions."
            ) from e
        raise
    if pool is not None:
        pool.shutdown(wait=True)
    for bak, _ in backups:
        _unlink_quiet(bak)
    return targets


def save_image(img: Any, path: str | os.PathLike[str]) -> None:
    """Write a nibabel image to ``path`` (gzip-compressed when it ends in ``.gz``).

    nibabel lays out the file (header, extensions, ``vox_offset``, data in Fortran order); the gzip
    stream is written by ISA-L's igzip (python-isal) at level 1 when ``isal`` is installed (a core
    dependency): the same DEFLATE format every gzip reader opens (RFC 1952), measured ~6x faster
    than zlib level 1 on map data for about the same size. Without ``isal`` nibabel's own writer is
    used (stdlib zlib, level 1).
    """
    import nibabel as nib

    path = os.fspath(path)
    if path.lower().endswith(".gz"):
        try:
            from isal import igzip
        except ImportError:  # pragma: no cover - isal is a dependency; keep working without it
            igzip = None
        if igzip is not None:
            with igzip.open(path, "wb", compresslevel=GZIP_LEVEL) as fh:
                img.to_stream(fh)
            return
    nib.save(img, path)


def _process_umask() -> int:
    mask = os.umask(0)  # read once, at import (single-threaded): umask has no read-only call
    os.umask(mask)
    return mask


_UMASK = _process_umask()


def _temp_path(target: Path, suffix: str) -> str:
    """A new hidden file next to ``target`` (same filesystem, so renames are atomic), with the
    permissions of an ordinary new file (``0o666 & ~umask``, e.g. 0644) instead of mkstemp's 0600,
    so maps in a shared cohort folder are readable like its PNGs and manifest."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    try:
        if hasattr(os, "fchmod"):  # POSIX (Windows files have no such mode bits)
            os.fchmod(fd, 0o666 & ~_UMASK)
    finally:
        os.close(fd)
    return tmp


def _place(tmp: str, target: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, target)
        return
    try:  # link() fails if the target appeared since we checked: never overwrite by accident
        os.link(tmp, target)
    except FileExistsError as e:
        raise OutputExistsError(f"{target} already exists; pass overwrite=True to replace it.", [target]) from e
    except OSError:  # filesystem without hard links
        if target.exists():
            raise OutputExistsError(f"{target} already exists; pass overwrite=True to replace it.",
                                    [target]) from None
        os.replace(tmp, target)
        return
    os.unlink(tmp)


def _unlink_quiet(p: str | Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def _prepare_targets(
    targets: Sequence[Path], out_dir: Path, inputs: Sequence[str], overwrite: bool
) -> None:
    """Refuse inputs and (unless overwrite) existing files for ALL targets, then make ``out_dir``."""
    for t in targets:
        for src in inputs:
            if _same_file(str(t), src):
                raise ExportError(
                    f"Refusing to write {t}: it is an input file ({src}). Choose another out_dir or stem."
                )
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"Output folder {out_dir} exists but is not a folder; choose another out_dir.")
    existing = [t for t in targets if os.path.lexists(t)]
    dirs = [t for t in existing if os.path.isdir(t)]
    if dirs:
        raise ExportError(f"Cannot write {dirs[0]}: a folder of that name exists.")
    if existing and not overwrite:
        names = ", ".join(t.name for t in existing)
        raise OutputExistsError(
            f"Output file(s) already exist in {out_dir}: {names}. Pass overwrite=True to replace them.", existing)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(
            f"Cannot create output folder {out_dir}: {type(e).__name__}: {e}. Choose a writable out_dir."
        ) from e
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ExportError(f"Output folder {out_dir} is not writable; choose another out_dir.")


def save_volume_nifti(
    volume: Any,
    path: str | os.PathLike[str],
    *,
    descrip: str = "medcam3d",
    overwrite: bool = False,
    source_paths: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Write one (1, X, Y, Z) or (X, Y, Z) MetaTensor as a float32 NIfTI with its RAS affine (atomic)."""
    data = _to_numpy(volume)
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 3:
        raise ExportError(f"Expected a 3D volume (optionally with one channel), got shape {tuple(data.shape)}.")
    target = Path(os.path.abspath(Path(path).expanduser()))
    if not target.name.endswith(NIFTI_SUFFIXES):
        raise ExportError(f"{target}: output name must end in .nii or .nii.gz.")
    meta = _meta(volume)
    q, s = _xform_codes(meta)
    affine = _ras_affine(volume)
    img = build_nifti(
        data, affine, qform_code=q, sform_code=s, descrip=descrip,
        source=source_xforms(meta, affine, data.shape),
    )
    inputs = _flatten_paths(source_paths) + _flatten_paths(meta.get("filename_or_obj"))
    _prepare_targets([target], target.parent, inputs, overwrite)
    return _write_all([(img, target)], overwrite)[0]


def class_records(expl: Explanation, names: list[str]) -> list[dict[str, Any]]:
    """Per explained class: :meth:`Explanation.class_records` (name, index, logit, probability) plus
    the evidence-vs-bias summary of :mod:`medcam3d.metrics.evidence`.

    Shared by the NIfTI export (JSON extension), the napari heat layers (layer metadata) and the
    CLI's scoring, so all describe a map the same way.
    """

    records = expl.class_records(names)
    for i, rec in enumerate(records):
        rec.update(_evidence(expl, i, rec["logit"]))
    return records


def _evidence(expl: Any, i: int, logit: float | None, shown: Any = None) -> dict[str, Any]:
    """Evidence vs bias of class ``i`` (medcam3d.metrics.evidence); {} when raw/maps are missing.

    The shown map is ``shown``, else ``expl.maps[i]``, else (a streamed Explanation whose maps were
    already written) whether it had a positive voxel, ``expl.extra["scan_map_positive"][i]``.
    """
    raw, maps = getattr(expl, "raw", None), getattr(expl, "maps", None)
    if shown is None and maps is not None:
        shown = _to_numpy(maps)[i]
    if shown is None:
        positive = (getattr(expl, "extra", None) or {}).get("scan_map_positive")
        if positive is not None and i < len(positive):
            shown = np.array([1.0 if positive[i] else 0.0])
    if raw is None or shown is None or logit is None:
        return {}
    from medcam3d.metrics.evidence import evidence_balance

    try:
        bal = evidence_balance(_to_numpy(raw)[i], logit, shown)
    except (IndexError, ValueError):
        return {}
    share = None if bal.bias_share != bal.bias_share else bal.bias_share  # NaN -> None (valid JSON)
    return {"evidence_sum": bal.evidence_sum, "bias_part": bal.bias_part, "bias_share": share,
            "no_positive_evidence": bal.no_positive_evidence, "flag": bal.flag()}


def _scan_stem(meta: dict[str, Any]) -> str:
    """File-name stem of the scan the maps sit on (``meta['filename_or_obj']``), else DEFAULT_STEM."""
    src = meta.get("filename_or_obj")
    if isinstance(src, (list, tuple)):
        src = src[0] if len(src) == 1 else None
    if not isinstance(src, (str, os.PathLike)) or not str(src):
        return DEFAULT_STEM
    return nifti_stem(str(src))  # a DICOM series folder's name as it is


def save_nifti(
    expl: Explanation,
    out_dir: str | os.PathLike[str],
    stem: str | None = None,
    class_names: Sequence[str] | None = None,
    *,
    four_d: bool = False,
    overwrite: bool = False,
    source_paths: Sequence[str | os.PathLike[str]] = (),
    storage: str = "uint16",
    threads: int = 1,
    on_map: Callable[[int, np.ndarray], None] | None = None,
) -> list[Path]:
    """Save one NIfTI per class (plus one 4D file if ``four_d``) on the source scan's grid.

    Files are ``{stem}_{method}_{class}.nii.gz`` (and ``{stem}_{method}_all-classes.nii.gz``), every
    part reduced to ``[A-Za-z0-9._-]``; ``stem`` defaults to the scan's file (or DICOM folder) name
    without suffix (``meta['filename_or_obj']``), else "medcam3d". An ``out_dir`` ending in ``.nii`` or
    ``.nii.gz`` names the one file to write (one class, no ``four_d``; else ExportError). On a NIfTI
    scan's own grid the scan's qform and sform fields (quaternion, offsets, qfac, pixdim, srow, codes)
    are copied verbatim, so ITK and nibabel each place the map where they place the scan; otherwise
    the affine ``expl.maps.affine`` (RAS) goes into qform and sform with codes from meta
    ``qform_code``/``sform_code``, else 1 = scanner.

    Args:
        expl: an Explanation (duck-typed: ``maps`` (K, X, Y, Z) MetaTensor, ``class_names``,
            ``method``, ``target_layer``, optional ``logits``/``probabilities``).
        out_dir: folder to write into (created if missing), or a ``.nii``/``.nii.gz`` file path.
        stem: file-name prefix (default: the scan's file name, see above).
        class_names: names to use instead of ``expl.class_names`` (K of them).
        four_d: also write all classes in one 4D file (X, Y, Z, K).
        overwrite: replace existing files; otherwise an existing target is an error.
        source_paths: input files that must never be overwritten (the volume's own
            ``meta['filename_or_obj']`` is always protected).
        storage: "uint16" (default: ``scl_slope`` ~ max/65535, zeros exact, every
            value within 7.6e-6 of the map's maximum (in the ``four_d`` file, which shares one
            slope, of the largest class maximum), see :func:`quantise_uint16`; half the bytes
            of float32 and far below one step of any viewer's colour table) or "float32" (the
            values exactly as computed).
        threads: compress up to this many class files at once in threads.
        on_map: called as ``on_map(k, map_k)`` with each (X, Y, Z) float32 map as it is written (a
            streamed Explanation computes each map once; the CLI builds its montage from these).

    A streamed Explanation (``expl.maps`` None, ``expl.grid`` the scan, ``expl.iter_maps()``) is
    written class by class, so only about ``threads + 1`` full-size maps are alive at once.

    Returns:
        The written paths: per-class files in class order, then the 4D file if any. For a scan whose
        voxel axes are sheared (gantry tilt; ITK-based viewers cannot open such a grid) each class
        file is followed by ``{stem}_{method}_{class}_resliced.nii.gz``, the map on an orthogonal grid
        covering the scan (see :mod:`medcam3d.io.reslice`); a ``UserWarning`` then says so.

    Raises:
        ExportError: bad maps/affine/names, an existing target without ``overwrite``, a target that
            is an input file, or an out_dir that cannot be created or written. Nothing is left behind.
    """
    maps = getattr(expl, "maps", None)
    grid = getattr(expl, "grid", None)
    streamed = maps is None and grid is not None and callable(getattr(expl, "iter_maps", None))
    if maps is None and not streamed:
        raise ExportError("expl has no 'maps'; pass a medcam3d Explanation.")
    names = list(class_names if class_names is not None else (getattr(expl, "class_names", None) or []))
    if streamed:
        maps = grid  # the scan the streamed maps sit on: affine, meta, shape
        k = len(names)
        per_class: Iterable[np.ndarray] = (_to_numpy(m) for m in expl.iter_maps())
    else:
        data = _to_numpy(maps)
        if data.ndim != 4:
            raise ExportError(f"expl.maps must have shape (K, X, Y, Z); got {tuple(data.shape)}.")
        k = data.shape[0]
        if len(names) != k:
            raise ExportError(f"{len(names)} class name(s) given for {k} map(s); give one name per map.")
        per_class = iter(data)
    if k == 0:
        raise ExportError("expl.maps holds no maps (K = 0); nothing to save.")
    affine = _ras_affine(maps)
    meta = _meta(maps)
    q, s = _xform_codes(meta)
    src = source_xforms(meta, affine, tuple(maps.shape[-3:]))
    method_raw = str(getattr(expl, "method", "") or "map")
    layer = str(getattr(expl, "target_layer", "") or "")
    method = sanitize_name(method_raw, "map")
    out = Path(os.path.abspath(Path(out_dir).expanduser()))
    single = out.name.lower().endswith(NIFTI_SUFFIXES)  # "out/map.nii.gz" names a file
    if single and (k != 1 or four_d):
        raise ExportError(
            f"{str(out_dir)!r} names one NIfTI file but the explanation holds {k} map(s)"
            f"{' and four_d=True' if four_d else ''}; give a folder (one file per class is written) or "
            "explain one class.")
    stem_s = sanitize_name(stem if stem is not None else _scan_stem(meta), DEFAULT_STEM)

    used: set[str] = set()

    def unique(part: str) -> Path:
        name, n = f"{stem_s}_{method}_{part}{NIFTI_SUFFIX}", 1
        while name.lower() in used:
            n += 1
            name = f"{stem_s}_{method}_{part}-{n}{NIFTI_SUFFIX}"
        used.add(name.lower())
        return out / name

    safe = [sanitize_name(nm, f"class{i}") for i, nm in enumerate(names)]
    targets = [out] if single else [unique(c) for c in safe]
    if single:
        out = out.parent
    if four_d:
        targets.append(unique("all-classes"))
    # gantry tilt: ITK cannot open the sheared source grid, so each class also gets an orthogonal copy
    resliced: list[Path] = []
    if is_sheared(affine):
        if single:  # "map.nii.gz" -> "map_resliced.nii.gz" next to it
            base, ext = re.match(r"(.*?)(\.nii(?:\.gz)?)$", targets[0].name, re.IGNORECASE).groups()
            resliced = [targets[0].with_name(f"{base}{RESLICED_SUFFIX}{ext}")]
        else:
            resliced = [unique(f"{c}{RESLICED_SUFFIX}") for c in safe]
    all_targets = targets + resliced

    classes = class_records(expl, names)
    base = {"generator": "medcam3d", "method": method_raw, "target_layer": layer}
    kept: list[np.ndarray] = []  # only for four_d: the 4D file needs every class at once

    def items() -> Iterator[tuple[Any, Path]]:
        for i, one in enumerate(per_class):
            if i >= k:
                raise ExportError(f"more maps than the {k} class name(s) given; give one name per map.")
            if one.shape != tuple(maps.shape[-3:]):
                raise ExportError(f"map {i} has shape {one.shape}; expected {tuple(maps.shape[-3:])}.")
            if four_d:
                kept.append(one)
            if streamed:  # the evidence record needs the shown map, here at last
                classes[i].update(_evidence(expl, i, classes[i]["logit"], shown=one))
            flag = classes[i].get("flag")
            descrip = f"medcam3d {method} class={safe[i]}" + (f" {flag}" if flag else "") + f" layer={layer}"
            ext = {**base, "class": classes[i]}
            if on_map is not None:
                on_map(i, one)
            yield build_nifti(
                one, affine, qform_code=q, sform_code=s, descrip=descrip, intent_name=method,
                extension=ext, source=src, storage=storage,
            ), targets[i]
            if resliced:
                yield _resliced_image(one, affine, meta, descrip, method, ext, storage), resliced[i]
        if four_d:
            yield _four_d(), targets[-1]

    def _four_d() -> Any:
        descrip = f"medcam3d {method} {k} classes (4th dim) layer={layer}"
        ext = {**base, "classes": classes, "class_axis": 3}
        return build_nifti(
            np.stack(kept, axis=-1),
            affine,
            qform_code=q,
            sform_code=s,
            descrip=descrip,
            intent_name=method,
            extension=ext,
            source=src,
            storage=storage,
        )

    inputs = _flatten_paths(source_paths) + _flatten_paths(meta.get("filename_or_obj"))
    _prepare_targets(all_targets, out, inputs, overwrite)
    if resliced:
        _warn_resliced(affine, resliced[0])
    written = _write_all(items(), overwrite, threads=threads)
    if len(written) != len(all_targets):
        for p in written:
            _unlink_quiet(p)
        raise ExportError(f"{len(written)} map(s) came for {k} class name(s); nothing was written.")
    return written


def _resliced_image(
    one: np.ndarray, affine: np.ndarray, meta: dict[str, Any], descrip: str, intent_name: str,
    extension: dict[str, Any], storage: str,
) -> Any:
    """One class map resliced onto the orthogonal grid of a sheared scan (see medcam3d.io.reslice)."""
    import torch
    from monai.data import MetaTensor

    keep = {key: meta[key] for key in ("filename_or_obj", "sform_code") if key in meta}
    src = MetaTensor(torch.from_numpy(np.ascontiguousarray(one))[None], affine=torch.as_tensor(affine), meta=keep)
    src.meta["space"] = "RAS"  # ``affine`` is the RAS affine (converted from LPS where needed)
    out = reslice_orthogonal(src, fill=0.0)
    code = int(out.meta["sform_code"])
    return build_nifti(
        out.as_tensor()[0].numpy(), to_numpy_affine(out.affine), qform_code=code, sform_code=code,
        descrip=f"{descrip} resliced"[:80], intent_name=intent_name, extension=extension, storage=storage,
    )


def _warn_resliced(affine: np.ndarray, first: Path) -> None:
    import warnings

    warnings.warn(
        f"The scan's voxel axes are sheared by {shear_degrees(affine):.2f} degrees (gantry tilt): the maps "
        "on its own grid are right in world space (nibabel, MONAI, napari) but ITK-based viewers (3D Slicer, "
        f"ITK-SNAP) cannot open them, so orthogonal resliced copies are written too ({first.name}, ...). "
        "Overlay them on the scan resliced the same way (medcam3d.io.reslice_orthogonal + "
        "medcam3d.io.save_volume_nifti; the medcam3d command writes <case>_ct_resliced.nii.gz).",
        stacklevel=3,
    )

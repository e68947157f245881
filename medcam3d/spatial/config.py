"""Turn preprocessing written as data (lists of dicts from YAML/JSON) into MONAI transform objects.

Every entry is ``{"name": <class in monai.transforms>, **kwargs}``, where the name must be one of
:data:`CONFIG_TRANSFORMS`: deterministic geometry and intensity steps only. A config can never name an
I/O transform (LoadImage, SaveImage...), a transform that runs user code (Lambda...) or an option that
takes a callable (MONAI turns some strings, e.g. LoadImage's ``reader``, into code), and option values
must be plain data (numbers, strings, booleans, lists). Errors are ConfigErrors whose
message starts with the key path of the bad value (``preprocess[2].pixdim: ...``) so a user can find
it in a config file of any length.

CT note on ``CropForeground``: MONAI's default foreground test is ``x > 0``, which on HU drops fat,
lung and air-filled bowel (all < 0 HU). In a config, CropForeground therefore needs either a
``threshold`` (foreground = ``x > threshold`` in the units at that point of the chain, e.g. -500 HU on
raw CT) or to come after an intensity transform that maps the window onto values >= 0 (e.g.
ScaleIntensityRange with b_min=0 and clip, where ``x > 0`` means "above the window floor").
"""

from __future__ import annotations

import difflib
import functools
import inspect
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from medcam3d.errors import ConfigError


class AboveThreshold:
    """Foreground test ``x > threshold`` for CropForeground (picklable, unlike a lambda)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = float(threshold)

    def __call__(self, x: Any) -> Any:
        return x > self.threshold

    def __repr__(self) -> str:
        return f"AboveThreshold({self.threshold:g})"


#: The transforms a config may name (array versions; random and I/O transforms never appear).
CONFIG_TRANSFORMS = (
    # geometry (each an InvertibleTransform: maps travel back through it)
    "Orientation", "Spacing", "Resize", "ResizeWithPadOrCrop", "SpatialPad", "BorderPad",
    "DivisiblePad", "CenterSpatialCrop", "CenterScaleCrop", "SpatialCrop", "CropForeground", "Flip",
    "Rotate90", "Zoom",
    # intensity
    "ScaleIntensityRange", "ScaleIntensityRangePercentiles", "ScaleIntensity",
    "ClipIntensityPercentiles", "NormalizeIntensity", "ThresholdIntensity", "ShiftIntensity",
    "StdShiftIntensity", "ScaleIntensityFixedMean",
)


def _fmt(value: Any) -> str:
    return repr(value) if not isinstance(value, str) else f"'{value}'"


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_numbers(path: str, value: Any, *, integer: bool, minimum: float | None, allow: tuple = ()) -> None:
    """A scalar or a list of 3 numbers (ints if ``integer``), each >= ``minimum`` or in ``allow``."""
    kind = "integers" if integer else "numbers"
    ok = _is_int if integer else _is_number
    items = [value] if not isinstance(value, Sequence) or isinstance(value, str) else list(value)
    if isinstance(value, Sequence) and not isinstance(value, str) and len(items) != 3:
        raise ConfigError(
            f"{path}: expected 3 {kind} (one per spatial axis), got {len(items)}: {_fmt(value)}."
        )
    for v in items:
        if not ok(v):
            raise ConfigError(f"{path}: expected 3 {kind} (or one for all axes), got {_fmt(value)}.")
        if v in allow:
            continue
        if minimum is not None and v < minimum:
            extra = " (or -1 to keep the input's size)" if -1 in allow else ""
            raise ConfigError(f"{path}: every value must be >= {minimum:g}{extra}, got {_fmt(value)}.")


def _check_pixdim(path: str, v: Any) -> None:
    _check_numbers(path, v, integer=False, minimum=None)
    items = v if isinstance(v, Sequence) and not isinstance(v, str) else [v]
    if any(x <= 0 for x in items):
        raise ConfigError(f"{path}: voxel sizes must be > 0 mm, got {_fmt(v)}.")


def _check_size(path: str, v: Any) -> None:
    # -1 keeps the input's size along that axis (MONAI convention)
    _check_numbers(path, v, integer=True, minimum=1, allow=(-1,))


def _check_axcodes(path: str, v: Any) -> None:
    if not isinstance(v, str) or len(v) != 3:
        raise ConfigError(f"{path}: expected 3 axis letters such as 'RAS' or 'LPS', got {_fmt(v)}.")
    pairs = ({"L", "R"}, {"A", "P"}, {"S", "I"})
    used = [next((i for i, p in enumerate(pairs) if c.upper() in p), None) for c in v]
    if None in used or len(set(used)) != 3:
        raise ConfigError(
            f"{path}: {_fmt(v)} is not an orientation; use one letter from each of L/R, A/P, S/I "
            "(e.g. 'RAS')."
        )


def _check_number(path: str, v: Any) -> None:
    if not _is_number(v):
        raise ConfigError(f"{path}: expected a number, got {_fmt(v)}.")


def _check_bool(path: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ConfigError(f"{path}: expected true or false, got {_fmt(v)}.")


def _check_margin(path: str, v: Any) -> None:
    _check_numbers(path, v, integer=True, minimum=0)


def _check_divisible(path: str, v: Any) -> None:
    _check_numbers(path, v, integer=True, minimum=1)


# Value checks for the options that shape the geometry or the intensity window; anything else is
# passed to the class and its own error (if any) is reported with the entry's path.
_VALUE_CHECKS = {
    "pixdim": _check_pixdim,
    "spatial_size": _check_size,
    "roi_size": _check_size,
    "axcodes": _check_axcodes,
    "a_min": _check_number,
    "a_max": _check_number,
    "b_min": _check_number,
    "b_max": _check_number,
    "lower": _check_number,
    "upper": _check_number,
    "minv": _check_number,
    "maxv": _check_number,
    "threshold": _check_number,
    "clip": _check_bool,
    "margin": _check_margin,
    "k_divisible": _check_divisible,
}

# A CropForeground that follows one of these sees values >= 0 where the window starts.
_WINDOWING = {
    "ScaleIntensityRange",
    "ScaleIntensityRangePercentiles",
    "ScaleIntensity",
    "ClipIntensityPercentiles",
}


@functools.cache
def transform_classes() -> dict[str, type]:
    """Name -> class of every array (non-dictionary) transform exported by ``monai.transforms``."""
    import monai.transforms as mt
    from monai.transforms import MapTransform, Transform

    found = {}
    for name in dir(mt):
        obj = getattr(mt, name, None)
        if inspect.isclass(obj) and issubclass(obj, Transform) and not issubclass(obj, MapTransform):
            found[name] = obj
    return found


@functools.cache
def _dict_names() -> set[str]:
    import monai.transforms as mt
    from monai.transforms import MapTransform

    return {
        n
        for n in dir(mt)
        if inspect.isclass(getattr(mt, n, None)) and issubclass(getattr(mt, n), MapTransform)
    }


def _resolve_name(path: str, name: Any) -> type:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}.name: expected the name of a monai.transforms class, got {_fmt(name)}.")
    classes = transform_classes()
    if name in classes and name in CONFIG_TRANSFORMS:
        return classes[name]
    if name in classes:
        raise ConfigError(f"{path}: {name} {_why_not_allowed(classes[name])}. A config may name only "
                          f"these geometry and intensity transforms: {', '.join(CONFIG_TRANSFORMS)}; "
                          "build other steps in Python and pass the Compose to explain_volume.")
    if name in _dict_names():
        base = name[:-1] if name.endswith(("d", "D")) else name.removesuffix("Dict")
        hint = f" Use {base!r} instead." if base in classes else ""
        raise ConfigError(
            f"{path}.name: {name!r} is a dictionary transform; medcam3d applies array transforms to one "
            f"volume.{hint}"
        )
    lower = {n.lower(): n for n in classes}
    close = difflib.get_close_matches(name, list(classes), n=3, cutoff=0.6)
    if name.lower() in lower and lower[name.lower()] not in close:
        close.insert(0, lower[name.lower()])
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"{path}.name: unknown transform {name!r} (not a class in monai.transforms).{hint}")


def _why_not_allowed(cls: type) -> str:
    from monai.transforms import InvertibleTransform, Randomizable

    module = cls.__module__
    if issubclass(cls, Randomizable):
        return "is random; an explanation must be reproducible"
    if module.startswith(("monai.transforms.io", "monai.transforms.utility")):
        return "reads/writes files or runs code, which a config may not do"
    if module.startswith(("monai.transforms.spatial", "monai.transforms.croppad")) and not issubclass(
        cls, InvertibleTransform
    ):
        return "changes the geometry but has no inverse"
    return "is not a plain geometry or intensity step"


def _is_plain_data(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_is_plain_data(v) for v in value)
    return False


def _check_kwargs(path: str, name: str, cls: type, kwargs: dict[str, Any]) -> None:
    sig = inspect.signature(cls.__init__)
    params = {k: p for k, p in sig.parameters.items() if k != "self"}
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {
        k
        for k, p in params.items()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }
    for key in kwargs:
        if not isinstance(key, str):
            raise ConfigError(f"{path}: option names must be strings, got {_fmt(key)}.")
        if key not in named and not open_kwargs:
            close = difflib.get_close_matches(key, sorted(named), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(
                f"{path}.{key}: {name} has no option {key!r}.{hint} Its options: {', '.join(sorted(named))}."
            )
    for key, p in params.items():
        if (
            p.default is inspect.Parameter.empty
            and p.kind
            in (
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                inspect.Parameter.KEYWORD_ONLY,
            )
            and key not in kwargs
        ):
            raise ConfigError(f"{path}.{key}: required by {name} but missing.")
    for key, value in kwargs.items():
        if key in params and "callable" in str(params[key].annotation).lower():
            raise ConfigError(f"{path}.{key}: takes a function; a config cannot name code.")
        if not _is_plain_data(value):
            raise ConfigError(
                f"{path}.{key}: expected plain data (numbers, strings, booleans, lists), got "
                f"{type(value).__name__}."
            )
        check = _VALUE_CHECKS.get(key)
        if check is not None:
            check(f"{path}.{key}", value)
    if "a_min" in kwargs and "a_max" in kwargs and kwargs["a_min"] == kwargs["a_max"]:
        raise ConfigError(
            f"{path}.a_max: must differ from a_min (both {kwargs['a_min']!r}); the window would be empty."
        )


def transform_from_config(entry: Any, path: str, *, after_windowing: bool) -> Any:
    """Instantiate one ``{"name": ..., **kwargs}`` entry; errors name ``path``.

    ``after_windowing`` tells whether an intensity window precedes it (for CropForeground's check).
    """
    if not isinstance(entry, Mapping):
        raise ConfigError(
            f"{path}: expected a mapping like {{name: Spacing, pixdim: [2, 2, 2]}}, got {_fmt(entry)}."
        )
    if "name" not in entry:
        raise ConfigError(f"{path}.name: missing; every entry needs the name of a monai.transforms class.")
    name = entry["name"]
    cls = _resolve_name(path, name)
    kwargs = {k: v for k, v in entry.items() if k != "name"}
    threshold = None
    if name == "CropForeground":
        if "threshold" in kwargs:
            _check_number(f"{path}.threshold", kwargs["threshold"])
            if "select_fn" in kwargs:
                raise ConfigError(f"{path}.threshold: give either threshold or select_fn, not both.")
            threshold = kwargs.pop("threshold")
        elif not after_windowing:
            raise ConfigError(
                f"{path}.threshold: CropForeground's default foreground test (x > 0) is wrong for CT in "
                "HU (it drops fat, lung and air); give threshold (e.g. -500 for raw HU) or place it after "
                "ScaleIntensityRange with b_min: 0 and clip: true."
            )
    if "lazy" in kwargs:
        raise ConfigError(f"{path}.lazy: lazy resampling is not supported here; remove the option.")
    _check_kwargs(path, name, cls, kwargs)
    if threshold is not None:
        kwargs["select_fn"] = AboveThreshold(threshold)
    try:
        with warnings.catch_warnings():
            # MONAI 1.5+ warns that Orientation's default labels will follow the MetaTensor's
            # "space"; load_volume always gives space=RAS, for which both defaults agree.
            warnings.filterwarnings(
                "ignore", message=r".*Orientation\.__init__:labels", category=FutureWarning
            )
            return cls(**kwargs)
    except Exception as e:  # the class rejected a value we do not check ourselves
        raise ConfigError(f"{path}: {name}({_kwargs_text(kwargs)}) is invalid: {e}") from e


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def is_windowing(entry: Any) -> bool:
    """True for a config entry naming an intensity window (see CropForeground above)."""
    return isinstance(entry, Mapping) and entry.get("name") in _WINDOWING

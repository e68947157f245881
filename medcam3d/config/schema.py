"""Small helpers to validate plain (YAML-like) values and name the offending key path."""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from medcam3d.errors import ConfigError


def describe(value: Any) -> str:
    """Short human description of a value for error messages (``'three'``, ``3.5``, ``a list``)."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    return f"a {type(value).__name__}"


def close_matches(word: str, choices: Iterable[str], n: int = 3) -> str:
    """`` (did you mean 'a', 'b'?)`` or ``""``; used to make unknown-key messages actionable."""
    found = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
    if not found:
        lowered = {c.lower(): c for c in choices}
        if word.lower() in lowered:
            found = [lowered[word.lower()]]
    return f" (did you mean {', '.join(repr(f) for f in found)}?)" if found else ""


def join(path: str, key: str | int) -> str:
    """Key path ``a.b`` / ``a[0]`` for messages."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


class Errors:
    """Collects validation messages so one ConfigError can list every problem at once."""

    def __init__(self, where: str = "") -> None:
        self.messages: list[str] = []
        self.where = where

    def add(self, path: str, message: str) -> None:
        self.messages.append(f"{path}: {message}")

    def raise_if_any(self) -> None:
        if self.messages:
            raise ConfigError(self.format("; ".join(self.messages)))

    def format(self, message: str) -> str:
        return f"{message} (in {self.where})" if self.where else message


def check_keys(
    errors: Errors, path: str, mapping: Mapping[str, Any], allowed: Iterable[str]
) -> None:
    """Report every key of ``mapping`` that is not in ``allowed``, with close matches."""
    allowed = list(allowed)
    for key in mapping:
        if not isinstance(key, str):
            errors.add(join(path, str(key)), f"keys must be strings, got {describe(key)}")
        elif key not in allowed:
            where = path or "top level"
            errors.add(
                join(path, key),
                f"unknown key{close_matches(key, allowed)}; allowed keys at {where}: "
                + ", ".join(allowed),
            )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def matches_annotation(value: Any, annotation: Any) -> bool | None:
    """Does a plain value fit a type annotation? True/False, or None when we cannot tell.

    Understands int, float, bool, str, None, unions/Optional, Sequence/list/tuple[...] and
    Literal; anything else (classes, callables, forward refs we cannot resolve) is "cannot tell".
    """
    if annotation is inspect.Parameter.empty or annotation is Any:
        return None
    if isinstance(annotation, str):
        try:
            annotation = eval(annotation, vars(typing) | {"Sequence": Sequence})  # noqa: S307
        except Exception:
            return None
    if annotation is None or annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        results = [matches_annotation(value, a) for a in args]
        if any(r is True for r in results):
            return True
        return None if any(r is None for r in results) else False
    if origin is typing.Literal:
        return value in args
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return _is_int(value)
    if annotation is float:
        return _is_int(value) or isinstance(value, float)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence) or annotation in (list, tuple, Sequence):
        if not isinstance(value, list | tuple):
            return False
        if not args or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
            inner = args[0] if args else None
        elif origin is tuple:
            if len(args) != len(value):
                return None
            checks = [matches_annotation(v, a) for v, a in zip(value, args, strict=True)]
            return False if any(c is False for c in checks) else (None if None in checks else True)
        else:
            inner = args[0]
        if inner is None:
            return True
        checks = [matches_annotation(v, inner) for v in value]
        return False if any(c is False for c in checks) else (None if None in checks else True)
    return None


def expected_text(annotation: Any) -> str:
    """'an integer', 'a number', 'true or false'... for an annotation (best effort)."""
    if isinstance(annotation, str):
        text = annotation
    else:
        text = getattr(annotation, "__name__", None) or str(annotation)
    plain = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
    return plain.get(text, f"a value of type {text}")

"""What a config may name as code: the trust check behind ``model._target_``.

A config is data. The only code it may name is

- an ``nn.Module`` subclass (from any importable module or from a ``.py`` file named by path), or
- a model factory function that the config marks with ``factory: true``, and only when the function
  comes from the user's own code (a ``.py`` file named by path, or a module that is not part of the
  standard library or of an installed package) or declares that it returns an ``nn.Module`` subclass
  (a return annotation, as MONAI's ``resnet18`` does).

Everything is checked on the object fetched with ``getattr`` BEFORE anything is called, and a target
in the standard library (``os.system``, ``subprocess.run``, ``shutil.rmtree``, ``runpy.run_path``...)
is refused before its module is even imported. ``torch.load`` and friends are refused because they are
functions of an installed package without an nn.Module return type. Importing a user module runs its
top-level code: that is the one thing a config can make Python execute besides the model's
constructor, and it can only be a module the user installed or placed next to the config.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from medcam3d.config.schema import close_matches
from medcam3d.errors import ConfigError

#: Packages whose functions are never model factories, even with ``factory: true`` (their classes,
#: e.g. torch.nn.Conv3d, are still accepted when they are nn.Module subclasses).
_NEVER_FACTORIES = frozenset({"torch", "numpy", "medcam3d", "yaml", "pickle", "dill", "joblib",
                              "cloudpickle", "pip", "setuptools", "IPython"})
_FILE_TARGET_HINT = (
    "use an importable 'package.module.Class', or a file path 'path/to/net.py:Class' "
    "(relative to the config's folder)"
)


def _root(module_name: str) -> str:
    return module_name.split(".")[0]


def _is_stdlib(module_name: str) -> bool:
    root = _root(module_name)
    return root in sys.stdlib_module_names or root in ("builtins", "__main__", "__mp_main__")


def _installed_dirs() -> tuple[Path, ...]:
    paths = sysconfig.get_paths()
    return tuple(
        Path(paths[k]).resolve() for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths
    )


def is_user_module(module_name: str) -> bool:
    """True when ``module_name`` was loaded from the user's own code: not the standard library and
    not a package installed into site-packages/dist-packages (an editable install counts as user
    code, because its files live in the user's checkout)."""
    if _is_stdlib(module_name) or _root(module_name) in _NEVER_FACTORIES:
        return False
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if not file:
        return False
    path = Path(file).resolve()
    if any(part in ("site-packages", "dist-packages") for part in path.parts):
        return False
    return not any(path.is_relative_to(d) for d in _installed_dirs())


def _returns_module(func: Callable[..., Any]) -> bool:
    try:
        ret = inspect.signature(func).return_annotation
    except (TypeError, ValueError):
        return False
    if isinstance(ret, str):
        ret = getattr(func, "__globals__", {}).get(ret)
    return inspect.isclass(ret) and issubclass(ret, nn.Module)


def check_model_target(obj: Any, target: str, *, factory: bool, from_file: bool) -> None:
    """Refuse anything but an nn.Module subclass or a marked, user-defined factory function.

    Called on the object fetched by :func:`import_target`, before it is called.

    Raises:
        ConfigError: ``model._target_: 'shutil.rmtree' is a function, not an nn.Module class...``.
    """
    if inspect.isclass(obj):
        if issubclass(obj, nn.Module):
            return
        raise ConfigError(
            f"model._target_: {target!r} is the class {obj.__name__}, not a torch.nn.Module subclass; "
            "a config may only name a model class (or a function marked with model.factory: true)"
        )
    if not factory:
        kind = "a function" if callable(obj) else f"a {type(obj).__name__}"
        raise ConfigError(
            f"model._target_: {target!r} is {kind}, not a torch.nn.Module class; if it is your own "
            "function that builds and returns the model, mark it with model.factory: true"
        )
    if not inspect.isfunction(obj):  # builtins (os.system), methods, partials, callable objects
        raise ConfigError(
            f"model._target_: {target!r} is a {type(obj).__name__}; model.factory: true accepts only "
            "a plain Python function defined in your own model code"
        )
    module = getattr(obj, "__module__", "") or ""
    if _is_stdlib(module) or _root(module) in _NEVER_FACTORIES:
        raise ConfigError(
            f"model._target_: {target!r} is defined in {module!r}, which holds no model factories; "
            "a config may call only your own model code"
        )
    if not (from_file or is_user_module(module) or _returns_module(obj)):
        raise ConfigError(
            f"model._target_: {target!r} is a function of an installed package ({module!r}) that does "
            "not declare an nn.Module return type; a config may call only your own factory (in a file "
            "next to the config or your own module) or a class"
        )


def _import_file(file: Path, target: str) -> Any:
    """Import a ``.py`` file under a private, content-independent module name."""
    if file.suffix != ".py" or not file.is_file():
        raise ConfigError(
            f"model._target_: {target!r}: no Python file {str(file)!r} (file paths are relative to the "
            "config's folder and must end in .py)"
        )
    digest = hashlib.sha256(str(file).encode()).hexdigest()[:12]
    name = f"medcam3d_user_{file.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:  # pragma: no cover - .py files always get a spec
        raise ConfigError(f"model._target_: cannot import {str(file)!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ConfigError(
            f"model._target_: importing {str(file)!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    return module


def _import_dotted(module_name: str, base_dir: Path | None) -> Any:
    if _is_stdlib(module_name):
        raise ConfigError(
            f"model._target_: {module_name!r} is part of Python's standard library, which holds no "
            f"models; a config may name only a model class or a marked factory ({_FILE_TARGET_HINT})"
        )
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        candidate = Path(base_dir or ".") / _root(module_name)
        if base_dir is not None and (candidate.with_suffix(".py").exists() or candidate.is_dir()):
            sys.path.insert(0, str(Path(base_dir).resolve()))
            try:
                return importlib.import_module(module_name)
            except ImportError as exc2:
                raise ConfigError(f"model._target_: cannot import {module_name!r}: {exc2}") from exc2
        raise ConfigError(
            f"model._target_: cannot import {module_name!r} ({exc}); {_FILE_TARGET_HINT}"
        ) from exc
    except Exception as exc:  # a user module that fails while importing
        raise ConfigError(
            f"model._target_: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc


def import_target(
    target: str, *, base_dir: str | os.PathLike[str] | None = None
) -> tuple[Any, bool]:
    """Fetch (without calling) the object that ``target`` names; returns (object, from_file).

    Forms: ``package.module.Attr`` (importable; a module next to the config also works) or
    ``path/to/net.py:Attr`` (a file, relative to ``base_dir``).

    Raises:
        ConfigError: standard-library target, missing file/module/attribute (with close matches).
    """
    base = Path(base_dir) if base_dir is not None else None
    if ":" in target:
        file_text, _, attr = target.rpartition(":")
        file = Path(file_text).expanduser()
        if not file.is_absolute():
            file = (base or Path.cwd()) / file
        module = _import_file(file.resolve(), target)
        from_file = True
        where = repr(file_text)
    else:
        module_name, _, attr = target.rpartition(".")
        module = _import_dotted(module_name, base)
        from_file = False
        where = repr(module_name)
    if not attr.isidentifier():
        raise ConfigError(f"model._target_: {target!r} does not end in a class name; {_FILE_TARGET_HINT}")
    if not hasattr(module, attr):
        public = [n for n in dir(module) if not n.startswith("_")]
        raise ConfigError(f"model._target_: {where} has no {attr!r}{close_matches(attr, public)}")
    return getattr(module, attr), from_file

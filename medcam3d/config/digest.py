"""A run config's fingerprint WITHOUT building its model: what lets a rerun over finished cases
skip torch, MONAI, the model, its weights and the probe forward.

:func:`config_digest` runs the same key and type validation as
:func:`medcam3d.config.load_run_config` (:func:`medcam3d.config.run.validated_spec`, same messages)
and then computes :meth:`medcam3d.config.RunConfig.fingerprint` from files alone, through the same
:func:`medcam3d.config.run.fingerprint_of`:

- ``model.name`` (a MONAI network): the normalised config and the checkpoint file's SHA-256;
- ``model._target_: path/to/net.py:Class``: also the SHA-256 of that ``.py`` file, read as bytes
  (the full path hashes the file ``inspect.getsourcefile`` finds for the class; when the class is
  defined in another file and only imported into this one, the two differ: the digest then simply
  matches no marker and the run takes the full path, it never matches a wrong one);
- a ``score`` reference file: its SHA-256, as :func:`medcam3d.config.explain_args.build_score` records.

It gives up (``fingerprint`` None, ``reason`` says why; the caller builds the model as before) when
only the built model can tell: a dotted ``_target_`` (its source file is found only by importing
it, which would run the user's code before the trust checks of :mod:`medcam3d.config.trust`), a
``loads_own_weights`` model without a checkpoint (the fingerprint hashes its state dict), random
weights (the ``--allow-random-weights`` refusal and warning belong to the build), and a checkpoint,
model file or score reference that cannot be read (the build then says what is wrong). Nothing from
the user is imported or executed here: files are only read and hashed.

What a matching fingerprint proves, and what it does not. A done-marker's hash
(:func:`medcam3d.cli.resume.case_hash`) covers this fingerprint, the methods, the input's content
and its load options, and a marker is written only after the full path accepted the config (model
built, checkpoint fitted, target layer and preprocessing built, probe forward run) and every file of
the case was written. So a marker whose hash equals the one computed from this digest proves that a
config identical in every normalised key (device aside), with byte-identical weights and model
source, passed all of those checks and produced the files listed for this very input. Skipping that
case runs none of the model, so nothing those checks guard can reach its outputs. It does NOT prove
that today's environment (torch, MONAI, medcam3d, the GPU) would still build the model: the
fingerprint never covered library versions, so the full path, too, skips such cases once its build
succeeds. A rerun with nothing to do therefore no longer notices an environment that can no longer
build the model; the next run that has a case to do does, before it writes anything. An explicitly
asked device (``--device``/``device:``) is still checked by the caller.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcam3d.config.run import _check_output_count, checkpoint_path, fingerprint_of, validated_spec


@dataclass(frozen=True)
class ConfigDigest:
    """A validated config and, when files alone can tell, its run fingerprint.

    Attributes:
        spec: the normalised config (as :attr:`medcam3d.config.RunConfig.spec`).
        fingerprint: equal to ``load_run_config(...).fingerprint()``; None when only building the
            model can tell (see ``reason``).
        reason: why ``fingerprint`` is None (None when it is not).
    """

    spec: dict[str, Any]
    fingerprint: str | None
    reason: str | None = None

    @property
    def methods(self) -> list[str]:
        return list(self.spec["methods"])

    @property
    def device(self) -> str | None:
        return self.spec["device"]


def _sha256(path: Path) -> str | None:
    """The file's SHA-256, or None when it is not a readable regular file."""
    h = hashlib.sha256()
    try:
        if not path.is_file():
            return None
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def _target_file(target: str, base_dir: Path) -> Path | None:
    """The ``.py`` file of a ``path/to/net.py:Class`` target, resolved as
    :func:`medcam3d.config.trust.import_target` does; None for any other form."""
    if ":" not in target:
        return None
    file_text, _, attr = target.rpartition(":")
    if not attr.isidentifier():
        return None
    file = Path(file_text).expanduser()
    if not file.is_absolute():
        file = base_dir / file
    file = file.resolve()
    return file if file.suffix == ".py" else None


def config_digest(
    source: str | os.PathLike[str] | Mapping[str, Any], *, base_dir: str | os.PathLike[str] | None = None
) -> ConfigDigest:
    """Validate a config (YAML path or dict) and compute its fingerprint without building the model.

    Args: ``source`` and ``base_dir`` as :func:`medcam3d.config.load_run_config`.

    Returns:
        A :class:`ConfigDigest`; its ``fingerprint`` is None when only the built model can tell.

    Raises:
        ConfigError: every key/type problem :func:`medcam3d.config.load_run_config` reports before
            it builds the model (same messages), and class_names/class_idx against
            ``model.kwargs``'s number of outputs.
    """
    spec, _window, _path, where, base = validated_spec(source, base_dir)
    _check_output_count(spec, where)
    model = spec["model"]
    ckpt = checkpoint_path(spec, base)
    if ckpt is None:
        why = ("model.loads_own_weights: the weights are hashed from the built model"
               if model["loads_own_weights"] else "no model.checkpoint (random weights)")
        return ConfigDigest(spec, None, why)
    weights = _sha256(ckpt)
    if weights is None:
        return ConfigDigest(spec, None, f"model.checkpoint {str(ckpt)!r} cannot be read")
    code = None
    if "_target_" in model:
        file = _target_file(model["_target_"], base)
        if file is None:
            return ConfigDigest(spec, None, "model._target_ is not a 'path/to/net.py:Class' file target")
        code = _sha256(file)
        if code is None:
            return ConfigDigest(spec, None, f"model._target_ file {str(file)!r} cannot be read")
    score = spec["score"]
    if score is not None and score["name"] == "similarity" and isinstance(score.get("reference"), str):
        ref = Path(score["reference"]).expanduser()
        ref = ref if ref.is_absolute() else (base / ref).resolve()
        digest = _sha256(ref) if ref.suffix in (".npy", ".pt", ".pth") else None
        if digest is None:
            return ConfigDigest(spec, None, f"score.reference {str(ref)!r} cannot be read")
        score["reference_sha256"] = digest  # as build_score records it
    return ConfigDigest(spec, fingerprint_of(spec, weights, code))

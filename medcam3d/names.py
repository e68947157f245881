"""Names shared by the engine, the config and the command line, importable without torch.

``medcam3d explain`` validates a config with these before it knows whether it needs torch at all (a
rerun over finished cases does not: see :mod:`medcam3d.config.digest`). They are the single home of
both lists: :mod:`medcam3d.engine.cam` checks when it is imported that its ``METHODS`` table (method
name -> class) has exactly :data:`METHOD_NAMES`, in this order, and
:mod:`medcam3d.explanation` re-exports :data:`ACTIVATIONS`.
"""

from __future__ import annotations

from medcam3d.errors import InputError

#: Every explanation method, by canonical name (``BaseCAM.method`` of the engine's classes).
METHOD_NAMES = ("hirescam", "gradcam", "gradcampp", "xgradcam", "layercam", "gradcam_elementwise",
                "eigencam", "gradxinput")
#: How raw scores become ``probabilities``.
ACTIVATIONS = ("sigmoid", "softmax")

_ALIASES = {
    "gradcam++": "gradcampp",
    "gradcamplusplus": "gradcampp",
    "gradcamelementwise": "gradcam_elementwise",
    "elementwisegradcam": "gradcam_elementwise",
    "gradientxinput": "gradxinput",
    "inputxgradient": "gradxinput",
}


def method_name(method: str) -> str:
    """Canonical name of ``method`` (case, ``-``/``_`` and a few spellings tolerated).

    Raises:
        InputError: unknown method, listing the valid ones.
    """
    if isinstance(method, str):
        key = method.strip().lower()
        if key in METHOD_NAMES:
            return key
        squashed = key.replace("-", "").replace("_", "").replace(" ", "")
        for name in METHOD_NAMES:
            if squashed == name.replace("_", ""):
                return name
        if squashed in _ALIASES:
            return _ALIASES[squashed]
    raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NAMES)}.")

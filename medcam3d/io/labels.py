"""Tell label images (segmentations, lesion masks) from CT scans, so a mask is never explained as a CT.

A CT in HU has air at about -1000 HU and hundreds of distinct values; a label image holds a handful
of non-negative integers (0 = background, 1..N = structures). The rule used everywhere:

    label image  <=>  every value is a non-negative integer and there are at most ``MAX_LABELS``
                      distinct values (background included).

Such an image has no plausible HU range (no air), so no CT window or model trained on HU applies.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

#: Most distinct values a label image may hold (TotalSegmentator's 117-class map has 118).
MAX_LABELS = 128


def label_values(data: Any) -> np.ndarray | None:
    """The sorted distinct values of ``data`` if it looks like a label image, else None.

    Args:
        data: array-like of any shape (numpy array, torch tensor, MetaTensor).
    """
    if hasattr(data, "detach"):
        data = data.detach().cpu()
        data = data.as_tensor() if hasattr(data, "as_tensor") else data
        data = data.numpy()
    a = np.asarray(data)
    if a.size == 0 or a.dtype.kind not in "biuf":
        return None
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or (a.min() < 0):
            return None
    elif a.dtype.kind == "i" and a.min() < 0:
        return None
    values = np.unique(a)
    if values.size > MAX_LABELS:
        return None
    if a.dtype.kind == "f" and not np.all(values == np.round(values)):
        return None
    return values


def nifti_is_label(path: str | os.PathLike[str]) -> np.ndarray | None:
    """The label values of a NIfTI file if it is a label image (see module rule), else None.

    Cheap for CTs: the first slice along the last axis is read first, and a slice with a negative
    value (air) or too many values settles it without decompressing the rest.

    Raises:
        OSError / nibabel errors for unreadable files (callers decide what that means).
    """
    import nibabel as nib

    img = nib.load(os.fspath(path))
    proxy = img.dataobj
    if len(img.shape) < 3:
        return None
    first = np.asarray(proxy[..., 0])
    if label_values(first) is None:
        return None
    return label_values(np.asarray(proxy))

"""The peak voxel of a map: its FIRST maximal voxel in C (row-major) order, as ``np.argmax`` of the
flattened array defines it, computed without copying the whole map when it is not C-contiguous.

Why: maps on the scan grid come in NIfTI's Fortran order (first axis fastest, so writing a file
needs no transposing copy; :mod:`medcam3d.spatial.composed`), and ``np.argmax`` of such an array
first copies all of it into C order (about 75 ms for a 512 x 512 x 48 float32 map).
"""

from __future__ import annotations

import numpy as np


def first_max_index(a: np.ndarray) -> tuple[int, ...]:
    """Index of the first maximal element of ``a`` in C order (``np.unravel_index(np.argmax(a))``).

    For a C-contiguous array this is ``np.argmax``. Otherwise: the maximum (a reduction in memory
    order), a boolean array of where it is reached, and, axis by axis, the first index whose
    sub-array holds a hit; the same answer, in a few passes over the data and no float copy.
    A NaN counts as the maximum (as ``np.argmax``).

    Raises:
        ValueError: ``a`` is empty.
    """
    a = np.asarray(a)
    if a.size == 0:
        raise ValueError("first_max_index of an empty array")
    if a.ndim == 0:
        return ()
    if a.flags.c_contiguous or a.ndim == 1:
        return tuple(int(i) for i in np.unravel_index(int(np.argmax(a)), a.shape))
    vmax = a.max()
    hit = np.isnan(a) if np.isnan(vmax) else a == vmax
    index = []
    for _ in range(a.ndim - 1):
        first = int(np.argmax(hit.any(axis=tuple(range(1, hit.ndim)))))
        index.append(first)
        hit = hit[first]
    index.append(int(np.argmax(hit)))
    return tuple(index)

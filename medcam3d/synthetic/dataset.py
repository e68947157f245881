"""A map-style torch Dataset of synthetic chest CTs, generated on the fly (nothing stored).

Item ``i`` of a dataset with base seed ``s`` is ``make_chest_ct(case_seed(s, i), ...)``, so a
dataset is reproducible, items are independent of batch order and DataLoader workers, and the train
and test sets are disjoint simply by using different base seeds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medcam3d.errors import InputError
from medcam3d.synthetic.grid import DEFAULT_SHAPE, make_grid
from medcam3d.synthetic.phantom import SyntheticCase, _check_seed, make_chest_ct

_CASE_KWARGS = {"shape", "spacing", "present", "prevalence", "noise_sd"}


def case_seed(seed: int, index: int) -> int:
    """Seed of item ``index`` of the dataset with base ``seed`` (a SeedSequence hash of both)."""
    return int(np.random.SeedSequence([_check_seed(seed), int(index)]).generate_state(1)[0])


class SyntheticChestDataset(Dataset):
    """``n`` synthetic cases; item = (volume (1, x, y, z) float32, labels (K,) float32, masks (K, x, y, z) uint8).

    ``window=(lo, hi)`` maps HU linearly to [0, 1] (clipped); None keeps raw HU. Extra keyword
    arguments go to :func:`make_chest_ct` (shape, spacing, prevalence, present, noise_sd).
    """

    def __init__(self, n: int, seed: int = 0, window: tuple[float, float] | None = None,
                 **case_kwargs: Any) -> None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise InputError(f"n must be a non-negative integer, got {n!r}")
        if window is not None and (len(window) != 2 or not float(window[0]) < float(window[1])):
            raise InputError(f"window must be (low_HU, high_HU) with low < high, got {window!r}")
        self.n, self.seed, self.window, self.case_kwargs = int(n), _check_seed(seed), window, case_kwargs
        unknown = set(case_kwargs) - _CASE_KWARGS
        if unknown:
            raise InputError(f"unknown make_chest_ct arguments {sorted(unknown)}; known: {sorted(_CASE_KWARGS)}")
        make_grid(case_kwargs.get("shape", DEFAULT_SHAPE), case_kwargs.get("spacing"))  # validate early

    def __len__(self) -> int:
        return self.n

    def case(self, index: int) -> SyntheticCase:
        """The full :class:`SyntheticCase` of item ``index`` (affine, anatomy masks...)."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise InputError(f"index must be an integer, got {index!r}")
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for a dataset of {self.n} cases")
        return make_chest_ct(case_seed(self.seed, int(index) % self.n), **self.case_kwargs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.case(index)
        vol = c.volume
        if self.window is not None:
            lo, hi = float(self.window[0]), float(self.window[1])
            vol = np.clip((vol - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)
        return (torch.from_numpy(vol[None]), torch.from_numpy(c.label_vector),
                torch.from_numpy(c.mask_stack))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return (self[i] for i in range(self.n))


def make_dataset(n: int, seed: int = 0, **kwargs: Any) -> SyntheticChestDataset:
    """Shorthand for :class:`SyntheticChestDataset` ``(n, seed, **kwargs)``."""
    return SyntheticChestDataset(n, seed, **kwargs)

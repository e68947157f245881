"""Prefetch cases with a torch DataLoader so reading scans overlaps explaining the previous one.

Each item is a :class:`LoadedCase`: the MetaTensor, or the error message when the scan could not
be read (the run records the case as failed and goes on).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader, Dataset

from medcam3d.cli.inputs import Case


@dataclass
class LoadedCase:
    """A case after loading: ``volume`` (MetaTensor) or ``error`` ("Type: message"), and seconds."""

    case: Case
    volume: Any | None
    error: str | None
    seconds: float


def load_case(case: Case) -> LoadedCase:
    """Load one case with medcam3d.load_volume, turning any exception into an error record."""
    from medcam3d.cli.scoring import refuse_label_image
    from medcam3d.io import load_volume

    start = time.perf_counter()
    try:
        volume = load_volume(case.path, case.series_uid, allow_non_ct=case.allow_non_ct)
        refuse_label_image(volume, case.path)
        return LoadedCase(case, volume, None, time.perf_counter() - start)
    except Exception as exc:  # a bad case must not stop the run
        return LoadedCase(case, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - start)


class CaseDataset(Dataset):
    """Map-style dataset over cases; ``__getitem__`` loads (in a worker when num_workers > 0)."""

    def __init__(self, cases: list[Case]) -> None:
        self.cases = list(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> LoadedCase:
        return load_case(self.cases[i])


def _identity(batch: list[LoadedCase]) -> LoadedCase:
    return batch[0]


def iter_loaded(cases: list[Case], workers: int = 0) -> Iterator[LoadedCase]:
    """Loaded cases in order; ``workers`` > 0 loads ahead in that many worker processes."""
    if not cases:
        return iter(())
    if workers <= 0:
        return (load_case(c) for c in cases)
    loader = DataLoader(
        CaseDataset(cases),
        batch_size=1,
        shuffle=False,
        num_workers=workers,
        collate_fn=_identity,
        prefetch_factor=2,
        persistent_workers=False,
    )
    return iter(loader)

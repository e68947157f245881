"""Named CT display windows (level/width in HU) used by montages and viewers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """A CT display window: centre ``level`` and ``width`` in HU; ``limits`` gives (low, high)."""

    name: str
    level: float
    width: float

    @property
    def limits(self) -> tuple[float, float]:
        """(level - width/2, level + width/2): what a viewer's contrast limits should be."""
        return (self.level - self.width / 2.0, self.level + self.width / 2.0)


#: Standard radiology windows (level, width) in HU.
WINDOWS: dict[str, Window] = {
    w.name: w
    for w in (
        Window("lung", -600.0, 1500.0),
        Window("mediastinum", 40.0, 350.0),
        Window("soft_tissue", 40.0, 400.0),
        Window("abdomen", 40.0, 400.0),
        Window("liver", 60.0, 160.0),
        Window("bone", 400.0, 1800.0),
        Window("brain", 40.0, 80.0),
    )
}

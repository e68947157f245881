"""Fixed geometry of the montage: where each class's title, panels and colour bar go, in inches.

The montage's layout depends only on the panels' physical aspects (width / height in mm) and on
font sizes that are fixed, so it is computed once here instead of by matplotlib's constrained
layout (which measures every text of the figure, twice per PNG, and was a fifth of a montage's
time on a 512 x 512 x 48 chest CT). The three panels of a row share one height, each keeps its
physical aspect; the row's height follows from the figure's width.

Vertical bands of a row, top to bottom: the class title (10 pt), the images, the x labels (8 pt,
up to two lines). Horizontal: per panel a margin for its y label (8 pt, rotated), the image; at
the right the colour bar, its 8 pt tick labels (up to 9 characters, e.g. ``0.0000175``) and its
label.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Figure width (in) and resolution (dots per inch) of every montage.
FIG_WIDTH_IN = 12.0
DPI = 90.0
#: Bands (in): figure title, each row's class title, x labels under the images.
FIG_TITLE_IN = 0.45
ROW_TITLE_IN = 0.38
XLABEL_IN = 0.36
#: Horizontal room (in): figure edges, each panel's y label, between panels, colour bar block.
EDGE_IN = 0.05
YLABEL_IN = 0.2
GAP_IN = 0.04
CBAR_GAP_IN = 0.06
CBAR_W_IN = 0.12
CBAR_BLOCK_IN = 1.1  # gap + bar + ticks + tick labels + bar label


@dataclass(frozen=True)
class RowGeometry:
    """One class's row (inches, origin at the row's bottom-left corner)."""

    height: float
    image_h: float
    image_y: float
    panel_x: tuple[float, ...]
    panel_w: tuple[float, ...]
    cbar_x: float

    def rect(self, x: float, w: float, y: float, h: float) -> list[float]:
        """``[left, bottom, width, height]`` as fractions of the row (what ``add_axes`` takes)."""
        return [x / FIG_WIDTH_IN, y / self.height, w / FIG_WIDTH_IN, h / self.height]


def images_width() -> float:
    """Width (in) the three images of a row share."""
    return FIG_WIDTH_IN - 2 * EDGE_IN - 3 * YLABEL_IN - 2 * GAP_IN - CBAR_BLOCK_IN


def row_geometry(aspects: list[float]) -> RowGeometry:
    """Geometry of a row whose panels have physical aspects ``aspects`` (width / height, mm / mm).

    The images fill :func:`images_width` at a common height ``images_width() / sum(aspects)``."""
    image_h = images_width() / sum(aspects)
    xs, ws, x = [], [], EDGE_IN
    for a in aspects:
        x += YLABEL_IN
        xs.append(x)
        ws.append(a * image_h)
        x += a * image_h + GAP_IN
    return RowGeometry(height=image_h + ROW_TITLE_IN + XLABEL_IN, image_h=image_h, image_y=XLABEL_IN,
                       panel_x=tuple(xs), panel_w=tuple(ws), cbar_x=x - GAP_IN + CBAR_GAP_IN)


def figure_height(rows: list[RowGeometry], title: bool) -> float:
    """Height (in) of a figure stacking ``rows`` under an optional figure title band."""
    return sum(r.height for r in rows) + (FIG_TITLE_IN if title else EDGE_IN)

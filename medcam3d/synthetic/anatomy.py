"""Noise-free synthetic chest anatomy in HU: body wall, lungs, mediastinum, heart, great vessels, bones.

Shapes are analytic (ellipses, ellipsoids, tapered and Fourier-perturbed lung outlines) in mm around
the volume centre, sampled on a :class:`~medcam3d.synthetic.grid.Grid`. Everything z-invariant is
built as a 2D cross-section and broadcast, so a default-size volume costs a few milliseconds.
Abnormalities are added afterwards by :mod:`medcam3d.synthetic.lesions`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medcam3d.synthetic.grid import Grid


@dataclass(eq=False)
class Lung:
    """One lung: its voxel mask and what lesion placement needs to find its interior and lobes."""

    side: str  # "right" (+x) or "left" (-x)
    mask: np.ndarray  # (nx, ny, nz) bool
    box: tuple[slice, slice, slice]  # bounding box in which q2d and lim are stored
    q2d: np.ndarray  # (bx, by, 1) squared normalised radius of the base cross-section
    lim: np.ndarray  # (bx, by, bz) squared outline radius; q2d / lim < 1 inside the outline
    centre_xy: tuple[float, float]
    half_axes_xy: tuple[float, float]
    z_base: float
    z_apex: float
    fissure: tuple[float, float, float]  # (y0, z0, slope): lower lobe where z < z0 + slope * (y - y0)

    def relative_height(self, z: np.ndarray) -> np.ndarray:
        """0 at the lung base, 1 at the apex."""
        return (z - self.z_base) / (self.z_apex - self.z_base)

    def in_lower_lobe(self, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        y0, z0, slope = self.fissure
        return z < z0 + slope * (y - y0)

    def depth(self, i: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Squared normalised radius (0 on the lung axis, 1 on its outline) at voxel indices; inf outside."""
        out = np.full(np.shape(i), np.inf, dtype=np.float32)
        b = self.box
        li, lj, lk = i - b[0].start, j - b[1].start, k - b[2].start
        ok = ((li >= 0) & (li < self.lim.shape[0]) & (lj >= 0) & (lj < self.lim.shape[1])
              & (lk >= 0) & (lk < self.lim.shape[2]))
        lim = self.lim[li[ok], lj[ok], lk[ok]]
        with np.errstate(divide="ignore", invalid="ignore"):
            out[ok] = np.where(lim > 0, self.q2d[li[ok], lj[ok], 0] / lim, np.inf)
        return out


@dataclass(eq=False)
class Anatomy:
    """Noise-free volume (float32 HU) plus named boolean masks of the normal anatomy."""

    grid: Grid
    volume: np.ndarray
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    lungs: tuple[Lung, ...] = ()


def _ellipse(g: Grid, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    """Squared normalised radius of an axis-aligned ellipse in the axial plane, shape (nx, ny, 1)."""
    return ((g.x - cx) / ax) ** 2 + ((g.y - cy) / ay) ** 2


def _span(c: np.ndarray, lo: float, hi: float) -> slice:
    """Index slice of the (sorted) coordinate vector ``c`` that covers [lo, hi] mm."""
    c = c.ravel()
    return slice(int(np.searchsorted(c, lo)), int(np.searchsorted(c, hi, side="right")))


def _z_slice(g: Grid, z_lo: float, z_hi: float) -> slice:
    return _span(g.z, z_lo, z_hi)


def _lung(g: Grid, rng: np.random.Generator, side: str, cx: float, cy: float, ax: float, ay: float,
          z_base: float, z_apex: float, dome: float, allowed2d: np.ndarray) -> Lung:
    """Tapered, dome-based lung with a smooth random outline (low-order Fourier terms in angle and z).

    Computed only inside the lung's bounding box (a third of the volume) to stay fast.
    """
    terms = [(k, rng.uniform(0.0, 0.05), rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.5),
              rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)]
    fissure = (cy - ay, z_base + rng.uniform(0.55, 0.7) * (z_apex - z_base),
               -rng.uniform(0.55, 0.75) * (z_apex - z_base) / (2 * ay))
    box = (_span(g.x, cx - 1.3 * ax, cx + 1.3 * ax), _span(g.y, cy - 1.3 * ay, cy + 1.3 * ay),
           _span(g.z, z_base, z_apex))
    x, y, z = g.x[box[0]], g.y[:, box[1]], g.z[..., box[2]]
    dx = (x - cx) / ax
    dy = (y - cy) / ay
    q2d = dx * dx + dy * dy
    theta = np.arctan2(dy, dx)
    u = (z - z_base) / (z_apex - z_base)
    # cross-section scale: full width up to 30 % of the height, then a rounded apex
    t = np.clip((u - 0.3) / 0.7, 0.0, 1.0)
    s = np.sqrt(np.clip(1.0 - t * t, 0.0, 1.0))
    rad = np.ones(q2d.shape[:2] + (z.shape[2],), dtype=np.float32)
    for k, amp, ph, freq, ph_z in terms:
        ang = amp * np.cos(k * theta + ph)
        rad += ang * (1.0 + 0.5 * np.cos(2 * np.pi * freq * u + ph_z))
    rad *= s
    rad *= rad
    floor = z_base + dome * (1.0 - np.minimum(q2d, 1.0))  # diaphragm dome, highest mid-lung
    local = (q2d < rad) & (z > floor) & allowed2d[box[0], box[1]]
    mask = np.zeros(g.shape, dtype=bool)
    mask[box] = local
    return Lung(side=side, mask=mask, box=box, q2d=q2d, lim=rad, centre_xy=(cx, cy),
                half_axes_xy=(ax, ay), z_base=z_base, z_apex=z_apex, fissure=fissure)


def build_anatomy(g: Grid, rng: np.random.Generator, tex_rng: np.random.Generator) -> Anatomy:
    """Sample per-seed sizes/positions/densities with ``rng`` and render the noise-free chest."""
    u = rng.uniform
    f32 = np.float32
    # --- body wall (z-invariant cross-section) ---
    bx, by = u(-8, 8), u(-12, 4)
    a, b = u(128, 148), u(95, 116)
    fat_t, musc_t = u(6, 18), u(6, 11)
    ac, bc = a - fat_t - musc_t - 8.0, b - fat_t - musc_t - 8.0  # thoracic cavity half-axes
    q_cav = _ellipse(g, bx, by, ac, bc)
    body2d = _ellipse(g, bx, by, a, b) < 1
    inner2d = _ellipse(g, bx, by, a - fat_t, b - fat_t) < 1
    cav2d = q_cav < 1
    ribcage2d = _ellipse(g, bx, by, ac + 9.0, bc + 9.0) < 1
    hu_fat, hu_muscle, hu_abdomen = u(-110, -85), u(35, 55), u(45, 60)
    base2d = np.where(body2d, f32(hu_fat), f32(-1000.0))
    base2d[inner2d] = hu_muscle
    base2d[cav2d] = hu_abdomen

    # --- landmarks along z ---
    z_base, z_apex = -110 + u(-12, 12), 115 + u(-12, 12)
    contrast = u(0, 180)  # 0 = non-contrast scan
    # --- spine (posterior midline): vertebral body, canal, posterior elements ---
    rv = u(16, 21)
    ys = by - bc + 0.6 * rv
    q_vb = _ellipse(g, bx, ys, rv, 0.85 * rv)
    vb2d = q_vb < 1
    cortex2d = vb2d & (q_vb > 0.6)
    yc = ys - 0.85 * rv - 9.0
    q_canal = _ellipse(g, bx, yc, 8.0, 8.0)
    canal2d = q_canal < 1
    post2d = ((q_canal < 2.6) & ~canal2d) | ((np.abs(g.x - bx) < 5.0) & (g.y < yc) & (g.y > yc - 28.0))
    post2d &= inner2d
    spine2d = vb2d | post2d | canal2d
    # --- mediastinum, great vessels, trachea ---
    med2d = _ellipse(g, bx - 5.0, by + 0.15 * bc, u(22, 32), 0.8 * bc) < 1
    r_ao, r_asc, r_tr = u(10, 13), u(12, 16), u(7, 10)
    aorta2d = _ellipse(g, bx - rv - 10.0, ys + 4.0, r_ao, r_ao) < 1
    asc2d = _ellipse(g, bx + 6.0, by + 0.3 * bc, r_asc, r_asc) < 1
    trachea2d = _ellipse(g, bx, ys + rv + 14.0, r_tr, r_tr) < 1
    # --- heart: ellipsoid, anterior-left, resting on the left dome (computed in its box) ---
    hcx, hcy, hcz = bx - 0.2 * ac, by + 0.3 * bc, z_base + u(45, 65)
    hax, hay, haz = 0.35 * ac * u(0.9, 1.1), 0.45 * bc * u(0.9, 1.1), u(45, 60)
    hbox = (_span(g.x, hcx - hax, hcx + hax), _span(g.y, hcy - hay, hcy + hay), _span(g.z, hcz - haz, hcz + haz))
    q_heart = (((g.x[hbox[0]] - hcx) / hax) ** 2 + ((g.y[:, hbox[1]] - hcy) / hay) ** 2
               + ((g.z[..., hbox[2]] - hcz) / haz) ** 2)
    heart = np.zeros(g.shape, dtype=bool)
    heart[hbox] = q_heart < 1

    # --- lungs: inside the cavity, outside mediastinum, spine and aorta, carved by the heart ---
    allowed2d = cav2d & ~med2d & ~spine2d & ~aorta2d & (q_vb > 1.6)
    lungs = []
    for side, sign in (("right", 1.0), ("left", -1.0)):
        lax, lay = 0.5 * ac * u(0.92, 1.04), 0.92 * bc * u(0.94, 1.02)
        lcx, lcy = bx + sign * (0.5 * ac + u(-4, 4)), by - 0.04 * bc + u(-5, 5)
        zb = z_base + (u(0, 10) if side == "right" else 0.0)
        dome = u(30, 45) if side == "right" else u(20, 35)
        lung = _lung(g, rng, side, lcx, lcy, lax, lay, zb, z_apex + u(-8, 8), dome, allowed2d)
        lung.mask[hbox] &= ~heart[hbox]
        lungs.append(lung)
    lung_any = lungs[0].mask | lungs[1].mask

    # --- render (painter's order) ---
    vol = np.empty(g.shape, dtype=np.float32)
    vol[...] = base2d
    vol[med2d[..., 0], _z_slice(g, z_base - 20.0, z_apex + 30.0)] = u(-95, -70)  # mediastinal fat
    w = np.clip((by + bc - g.y) / (2 * bc), 0.0, 1.0)  # 1 at the posterior (dependent) edge
    lung_hu = u(-880, -830) + u(20, 60) * w * w  # denser towards the dependent lung
    for lung in lungs:
        np.copyto(vol[lung.box], lung_hu[:, lung.box[1]], where=lung.mask[lung.box])
    hv = vol[hbox]
    hv[heart[hbox]] = u(35, 50)
    hv[q_heart < 0.45] = 40.0 + contrast  # contrast-enhanced blood pool
    blood = 40.0 + contrast
    vol[aorta2d[..., 0], _z_slice(g, z_base - 40.0, z_apex - 45.0)] = blood
    vol[asc2d[..., 0], _z_slice(g, hcz + 0.6 * haz, z_apex - 45.0)] = blood
    vol[trachea2d[..., 0], _z_slice(g, z_apex - 75.0, 1e9)] = -980.0
    # vertebral bodies (cancellous core, cortical rim) with intervertebral discs every ~27 mm
    disc = ((g.z.ravel() - u(0, 27)) % u(25, 29)) < 5.0
    hu_vb, hu_cortex = u(400, 600), u(750, 950)
    vol[vb2d[..., 0]] = np.where(disc, f32(85.0), f32(hu_vb))
    vol[cortex2d[..., 0]] = np.where(disc, f32(85.0), f32(hu_cortex))
    vol[canal2d[..., 0]] = 15.0
    vol[post2d[..., 0]] = u(450, 650)
    # ribs: a ring just outside the cavity, striped along z and sloping down anteriorly
    ring2d = ~cav2d & ribcage2d & ~((np.abs(g.x - bx) < 25.0) & (g.y > by)) \
        & ~((np.abs(g.x - bx) < 24.0) & (g.y < by))
    period, thick, slope = u(26, 32), u(9, 12), u(0.3, 0.45)
    stripe = ((g.z + slope * (g.y - by) - u(0, period)) % period < thick) \
        & (g.z > z_base - 25.0) & (g.z < z_apex + 10.0)
    ribs = ring2d & stripe
    vol[ribs] = u(450, 650)
    stern2d = (np.abs(g.x - bx) < 14.0) & (g.y > by + bc - 2.0) & (g.y < by + bc + 10.0) & inner2d
    stern_z = _z_slice(g, hcz - 40.0, z_apex - 10.0)
    vol[stern2d[..., 0], stern_z] = u(300, 450)

    # pulmonary vessels seen end-on: sparse brighter voxels inside the lungs
    idx = tex_rng.integers(0, vol.size, size=int(0.005 * vol.size))
    idx = idx[lung_any.ravel()[idx]]
    vol.ravel()[idx] = tex_rng.uniform(-550, -250, size=idx.size)

    bone = ribs  # reused: ribs is not needed any more
    bone[vb2d[..., 0]] = ~disc
    bone[post2d[..., 0]] = True
    bone[stern2d[..., 0], stern_z] = True
    masks = {
        "body": np.broadcast_to(body2d, g.shape),
        "fat": np.broadcast_to(body2d & ~inner2d, g.shape),
        "muscle": np.broadcast_to(inner2d & ~ribcage2d & ~spine2d, g.shape),
        "lungs": lung_any,
        "lung_right": lungs[0].mask,
        "lung_left": lungs[1].mask,
        "heart": heart,
        "bone": bone,
    }
    return Anatomy(grid=g, volume=vol, masks=masks, lungs=tuple(lungs))

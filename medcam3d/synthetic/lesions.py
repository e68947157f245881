"""Abnormalities painted into the synthetic lungs; each returns the exact voxels it replaced.

- nodule: a small solid ellipsoid (-50..+50 HU, radius 7-13 mm) anywhere inside one lung;
- effusion: fluid (0..20 HU) layering horizontally in the dependent (posterior) lung base of one or
  both sides, deepest at the base and thinning upwards (a posterior crescent on axial slices);
- consolidation: a large irregular patch (-100..+40 HU) confined to one lobe (it stops at the
  fissure), often with air bronchograms (air-density tubes through it).

Lesions only replace voxels listed in ``available`` (lung not yet taken by another lesion), so the
masks are disjoint and each one is exactly the set of voxels whose noise-free value it set.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from medcam3d.errors import InputError
from medcam3d.synthetic.anatomy import Anatomy, Lung


def _pick_centre(rng: np.random.Generator, anat: Anatomy, lung: Lung, available: np.ndarray,
                 rho2_max: float, u_range: tuple[float, float],
                 extra: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None,
                 ) -> tuple[int, int, int] | None:
    """A random voxel deep inside ``lung`` (rejection sampling; falls back to any free lung voxel).

    None if no free voxel of ``lung`` passes ``extra``.
    """
    g = anat.grid
    ok_mask = lung.mask & available
    flat = ok_mask.ravel()
    for _ in range(16):
        idx = rng.integers(0, flat.size, size=512)
        i, j, k = np.unravel_index(idx, g.shape)
        rho2 = lung.depth(i, j, k)
        h = lung.relative_height(g.z.ravel()[k])
        ok = flat[idx] & (rho2 < rho2_max) & (h > u_range[0]) & (h < u_range[1])
        if extra is not None:
            ok &= extra(i, j, k)
        hits = np.flatnonzero(ok)
        if hits.size:
            n = hits[0]
            return int(i[n]), int(j[n]), int(k[n])
    cand = np.argwhere(ok_mask)
    if extra is not None and cand.size:
        cand = cand[extra(cand[:, 0], cand[:, 1], cand[:, 2])]
    if not cand.size:
        return None
    return tuple(int(v) for v in cand[rng.integers(len(cand))])  # type: ignore[return-value]


def _no_room(what: str, anat: Anatomy) -> InputError:
    return InputError(f"no free lung voxel left to place a {what} on a {anat.grid.shape} grid with spacing "
                      f"{anat.grid.spacing} mm; use a finer grid (e.g. the default 64x64x48) or present="
                      f"{{{what!r}: False}}")


def _box(anat: Anatomy, centre: tuple[int, int, int], half_mm: np.ndarray) -> tuple[slice, ...]:
    g = anat.grid
    return tuple(slice(max(c - int(np.ceil(h / s)) - 1, 0), min(c + int(np.ceil(h / s)) + 2, n))
                 for c, h, s, n in zip(centre, half_mm, g.spacing, g.shape))


def _local(anat: Anatomy, box: tuple[slice, ...], centre: tuple[int, int, int]) -> list[np.ndarray]:
    """mm offsets from the centre voxel inside ``box``, broadcastable."""
    g = anat.grid
    c = (g.x.ravel()[centre[0]], g.y.ravel()[centre[1]], g.z.ravel()[centre[2]])
    return [g.x[box[0]] - c[0], g.y[:, box[1]] - c[1], g.z[..., box[2]] - c[2]]


def add_nodule(vol: np.ndarray, anat: Anatomy, rng: np.random.Generator, available: np.ndarray
               ) -> np.ndarray:
    """Solid nodule in a random lung; returns its boolean mask."""
    first = int(rng.integers(2))
    radius = max(rng.uniform(7.0, 13.0), 0.55 * max(anat.grid.spacing))
    radii = radius * rng.uniform(0.85, 1.15, size=3)
    hu = np.float32(rng.uniform(-50.0, 50.0))
    for lung in (anat.lungs[first], anat.lungs[1 - first]):  # the other lung if this one is full
        centre = _pick_centre(rng, anat, lung, available, rho2_max=0.5, u_range=(0.1, 0.85))
        if centre is not None:
            break
    else:
        raise _no_room("nodule", anat)
    box = _box(anat, centre, radii)
    dx, dy, dz = _local(anat, box, centre)
    local = ((dx / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dz / radii[2]) ** 2 <= 1.0) & available[box] \
        & lung.mask[box]
    vol[box][local] = hu
    mask = np.zeros(vol.shape, dtype=bool)
    mask[box] = local
    return mask


def add_effusion(vol: np.ndarray, anat: Anatomy, rng: np.random.Generator, available: np.ndarray
                 ) -> np.ndarray:
    """Pleural fluid layering in the dependent lung base(s); returns its boolean mask."""
    g = anat.grid
    pick = rng.choice(3, p=(0.4, 0.4, 0.2))  # right, left, both
    sides = anat.lungs if pick == 2 else (anat.lungs[pick],)
    depth_mm, height_mm, hu = rng.uniform(25.0, 55.0), rng.uniform(70.0, 130.0), rng.uniform(0.0, 20.0)
    mask = np.zeros(vol.shape, dtype=bool)
    j = np.arange(g.shape[1], dtype=np.float32)[None, :, None]
    others = tuple(lung for lung in anat.lungs if all(lung is not s for s in sides))
    for n, lung in enumerate(sides + others):  # the other side only if the chosen one(s) have no room
        if n >= len(sides) and mask.any():
            break
        free = lung.mask & available
        proj = free.any(axis=0)  # (ny, nz)
        has = proj.any(axis=0)
        if not has.any():
            continue
        j_post = proj.argmax(axis=0).astype(np.float32)  # most posterior lung row per slice
        z = g.z.ravel()
        z_low = z[int(has.argmax())]
        d = depth_mm * rng.uniform(0.7, 1.0) * np.clip(1.0 - (z - z_low) / height_mm, 0.0, 1.0) ** 0.7
        level = np.where(has, j_post + d / g.spacing[1], -1.0).astype(np.float32)  # horizontal surface
        mask |= free & (j < level[None, None, :])
    if not mask.any():
        raise _no_room("effusion", anat)
    vol[mask] = np.float32(hu)
    return mask


def add_consolidation(vol: np.ndarray, anat: Anatomy, rng: np.random.Generator, available: np.ndarray
                      ) -> np.ndarray:
    """Irregular lobar consolidation with optional air bronchograms; returns its boolean mask."""
    g = anat.grid
    first, first_lower = int(rng.integers(2)), bool(rng.integers(2))
    radii = rng.uniform(20.0, 38.0, size=3)
    # the drawn lobe, else the other lobe, else the other lung (only needed on very coarse grids)
    for n_lung, lower in ((first, first_lower), (first, not first_lower),
                          (1 - first, first_lower), (1 - first, not first_lower)):
        lung = anat.lungs[n_lung]

        def in_lobe(i: np.ndarray, j: np.ndarray, k: np.ndarray, lung: Lung = lung, lower: bool = lower
                    ) -> np.ndarray:
            return lung.in_lower_lobe(g.y.ravel()[j], g.z.ravel()[k]) == lower

        centre = _pick_centre(rng, anat, lung, available, rho2_max=0.6,
                              u_range=(0.1, 0.6) if lower else (0.45, 0.9), extra=in_lobe)
        if centre is not None:
            break
    else:
        raise _no_room("consolidation", anat)
    box = _box(anat, centre, 1.5 * radii)
    dx, dy, dz = _local(anat, box, centre)
    # smooth irregularity: mean of three plane waves with random direction, wavelength and phase
    tex = 0.0
    for _ in range(3):
        v = rng.normal(size=3)
        v *= 2 * np.pi / (np.linalg.norm(v) * rng.uniform(18.0, 35.0))
        tex = tex + np.cos(v[0] * dx + v[1] * dy + v[2] * dz + rng.uniform(0, 2 * np.pi))
    tex = tex / 3.0
    q = (dx / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dz / radii[2]) ** 2
    lobe = lung.in_lower_lobe(g.y[:, box[1]], g.z[..., box[2]]) == lower  # (1, ny', nz')
    local = (q + 0.45 * tex < 1.0) & available[box] & lung.mask[box] & lobe
    hu = np.clip(rng.uniform(-60.0, 20.0) + 30.0 * tex, -100.0, 40.0).astype(np.float32)
    if rng.random() < 0.7:  # air bronchograms: lines through the patch towards the hilum
        cpos = np.array([g.x.ravel()[centre[0]], g.y.ravel()[centre[1]], g.z.ravel()[centre[2]]])
        hilum = np.array([lung.centre_xy[0] * 0.3, lung.centre_xy[1], 0.5 * (lung.z_base + lung.z_apex)])
        d0 = hilum - cpos
        d0 /= np.linalg.norm(d0) + 1e-6
        r_air = max(2.5, 0.55 * min(g.spacing))
        for _ in range(2):
            d = d0 + rng.normal(scale=0.35, size=3)
            d /= np.linalg.norm(d)
            along = dx * d[0] + dy * d[1] + dz * d[2]
            dist2 = dx * dx + dy * dy + dz * dz - along * along
            hu = np.where(dist2 < r_air ** 2, np.float32(rng.uniform(-920.0, -860.0)), hu)
    sub = vol[box]
    sub[local] = np.broadcast_to(hu, local.shape)[local]
    mask = np.zeros(vol.shape, dtype=bool)
    mask[box] = local
    return mask

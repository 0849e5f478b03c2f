"""Reticulation: a net of thickened septa (a warped 3D Voronoi foam), traction bronchiectasis."""
from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree

from ..case import Case
from ..grids import FineBox, ramp, random_perpendicular, tube_coverage, unit


def draw(case: Case, box: FineBox, f, lung_f, params):
    """Reticulation: the walls of an irregular 3D Voronoi foam (thickened septa
    a millimetre thick, cells a few mm wide) plus a mild ground-glass fill."""
    cfg, rng = case.cfg, case.rng
    a = ramp(f, cfg.reticulation_edge_mm) * lung_f
    cell = rng.uniform(*cfg.reticulation_cell_mm)
    line = rng.uniform(*cfg.reticulation_line_mm)
    fill = rng.uniform(*cfg.reticulation_background_fill)
    warp_mm = rng.uniform(*cfg.reticulation_warp_mm)
    # Seeds spread at random (a Poisson process of one seed per cell volume): the
    # cells are irregular polygons of varying size, and the walls have every
    # orientation, so a thick slice blurs the oblique ones as a real scanner does.
    lo = np.array([c[0] for c in box.coords]) - cell
    hi = np.array([c[-1] for c in box.coords]) + cell
    n_seeds = max(4, int(round(float(np.prod(hi - lo)) / cell ** 3)))
    seeds = lo + rng.uniform(0.0, 1.0, (n_seeds, 3)) * (hi - lo)
    # Each wall gets its own thickness: some septa are thick, some barely seen.
    seed_gain = rng.uniform(0.3, 1.4, n_seeds)
    sel = np.flatnonzero(a.ravel() > 0)
    line_cov = np.zeros(a.size, np.float32)
    if sel.size:
        idx = np.unravel_index(sel, box.fine_shape)
        pts = np.stack([box.coords[ax][idx[ax]] for ax in range(3)], 1)
        warp = np.stack([box.smooth_noise(rng, 2.0 * cell).ravel()[sel] for _ in range(3)], 1)
        pts = pts + warp_mm * warp
        d, i = cKDTree(seeds).query(pts, k=2, workers=-1)
        sep = np.linalg.norm(seeds[i[:, 1]] - seeds[i[:, 0]], axis=1)
        # Distance to the wall between the two nearest cells (their bisector).
        bis = (d[:, 1] ** 2 - d[:, 0] ** 2) / (2.0 * np.maximum(sep, 1e-6))
        thick = line * 0.5 * (seed_gain[i[:, 0]] + seed_gain[i[:, 1]])
        line_cov[sel] = np.clip((0.5 * thick - bis) / box.soft_mm + 0.5, 0.0, 1.0)
    line_cov = line_cov.reshape(a.shape)
    w = a * (line_cov + (1.0 - line_cov) * fill)
    pw = w * np.float32(cfg.tissue_hu)
    traction = bool(rng.uniform() < cfg.traction_bronchiectasis_probability)
    if traction:
        # Dilated airways pulled open by the fibrosis: a small branching tree of
        # air tubes with thickened walls, varicose (the radius wanders), running
        # through the region; where they lie, they replace the net.
        r0 = rng.uniform(*cfg.traction_bronchiectasis_radius_mm)
        wall = rng.uniform(*cfg.traction_bronchiectasis_wall_mm)
        lumen_segs, wall_segs = [], []
        # Each tree starts deep in the region (a subpleural band is thin, so a tree
        # from the box's centre would mostly leave it) and runs 8-20 mm per branch.
        deep = np.flatnonzero(((f > 3.0) & lung_f).ravel())
        if deep.size == 0:
            deep = np.flatnonzero(((f > 0) & lung_f).ravel())
        for _ in range(int(rng.integers(1, 4)) if deep.size else 0):
            at = np.unravel_index(deep[rng.integers(deep.size)], box.fine_shape)
            start = np.array([box.coords[ax][at[ax]] for ax in range(3)])
            u = unit(rng.standard_normal(3) * np.array([0.5, 1.0, 1.0]))
            stack = [(start - 0.5 * rng.uniform(8.0, 20.0) * u, u, r0, rng.uniform(8.0, 20.0), 0)]
            while stack:
                st, d, r, length, gen = stack.pop()
                d = unit(d + rng.normal(0, 0.3, 3))
                e = st + d * length
                r_end = r * rng.uniform(0.6, 1.2)
                lumen_segs.append((st, e, r, r_end))
                wall_segs.append((st, e, r + wall, r_end + wall))
                if gen < 2:
                    perp = random_perpendicular(d, rng)
                    ang = math.radians(rng.uniform(20.0, 45.0))
                    nd = math.cos(ang) * d + rng.choice([-1.0, 1.0]) * math.sin(ang) * perp
                    stack.append((e, nd, max(0.6, r_end * 0.85), length * rng.uniform(0.5, 0.8), gen + 1))
        outer = tube_coverage(box, wall_segs) * lung_f
        lumen = tube_coverage(box, lumen_segs) * lung_f
        ring = np.clip(outer - lumen, 0.0, 1.0)
        keep = 1.0 - outer
        # The tube replaces the whole voxel content (w = 1): air in the lumen,
        # tissue in the wall; the membership of the region is unchanged.
        w = w * keep + outer * a
        pw = pw * keep + (np.float32(cfg.air_hu) * lumen + np.float32(cfg.tissue_hu) * ring) * a
        params.update(bronchiectasis_radius_mm=round(r0, 2))
    params.update(cell_mm=round(cell, 2), line_mm=round(line, 2), background_fill=round(fill, 3),
                  warp_mm=round(warp_mm, 2), traction_bronchiectasis=float(traction))
    return w, pw, a

"""Honeycombing: air cysts packed in rows along the costal pleura, sharing their walls."""
from __future__ import annotations

from typing import List

import numpy as np
from scipy.spatial import cKDTree

from ..case import Case
from ..grids import FineBox


def draw(case: Case, box: FineBox, f, lung_f, pleura_f, free_f, rows, r_mean, wall, params):
    """Honeycombing: air cysts of 3-10 mm packed in 1-3 rows parallel to the
    costal pleura (pleura_f: in-plane depth, mm), sharing walls of 1-2 mm.
    free_f: distance (mm) beyond the gap to other regions. Returns None when no
    cyst fits."""
    cfg, rng = case.cfg, case.rng
    dmin, dmax = (d / 2.0 for d in cfg.honeycomb_cyst_diameter_mm)
    centres: List[np.ndarray] = []
    radii: List[float] = []
    depth = wall
    tol = 0.6 * max(case.sp[1] / case.n_fine[1], 0.5)
    for row in range(rows):
        r_row = float(np.clip(r_mean * rng.uniform(0.8, 1.2), dmin, dmax))
        delta = depth + r_row
        depth = delta + r_row + wall
        cand = np.flatnonzero(((np.abs(pleura_f - delta) < tol) & (f > 0) & lung_f & (free_f > r_row)).ravel())
        if cand.size == 0:
            continue
        # Random sequential packing (dart throwing) on the row's shell.
        cand = rng.permutation(cand)[:2000]
        idx = np.unravel_index(cand, box.fine_shape)
        pts = np.stack([box.coords[ax][idx[ax]] for ax in range(3)], 1)
        rr = np.clip(r_row * rng.uniform(0.75, 1.25, len(pts)), dmin, dmax)
        acc = np.zeros((len(centres) + len(pts), 3))
        acc_r = np.zeros(len(acc))
        n = len(centres)
        if n:
            acc[:n] = centres
            acc_r[:n] = radii
        for p, r in zip(pts, rr):
            if n:
                dd = ((acc[:n] - p) ** 2).sum(axis=1)
                # Neighbouring cysts may overlap a little: the Voronoi wall between
                # them then becomes their shared wall (clustered, not scattered).
                if np.any(dd < (cfg.honeycomb_packing * (acc_r[:n] + r)) ** 2):
                    continue
            acc[n] = p
            acc_r[n] = r
            n += 1
        centres = list(acc[:n])
        radii = list(acc_r[:n])
    params.update(cysts=int(len(centres)), rows=int(rows), wall_mm=round(wall, 2),
                  mean_cyst_diameter_mm=round(2 * float(np.mean(radii)) if radii else 0.0, 2))
    if not centres:
        return None
    c = np.array(centres)
    r = np.array(radii)
    fill = cfg.honeycomb_cyst_fill
    reach = float(r.max()) * fill + wall + box.soft_mm
    near = np.flatnonzero((lung_f & (f > -reach)).ravel())
    foot = np.zeros(f.size, np.float32)
    air = np.zeros(f.size, np.float32)
    if near.size:
        idx = np.unravel_index(near, box.fine_shape)
        pts = np.stack([box.coords[ax][idx[ax]] for ax in range(3)], 1)
        # Warped walls: irregular cysts, not perfect spheres.
        amp = cfg.honeycomb_wall_irregularity * r_mean
        warp = np.stack([box.smooth_noise(rng, 2.0 * r_mean).ravel()[near] for _ in range(3)], 1)
        pts = pts + amp * warp
        k = min(2, len(c))
        d, i = cKDTree(c).query(pts, k=k, workers=-1)
        if k == 1:
            d1, i1 = d, i
            bis = np.full(d1.shape, np.inf)
        else:
            d1, i1 = d[:, 0], i[:, 0]
            sep = np.linalg.norm(c[i[:, 1]] - c[i1], axis=1)
            bis = (d[:, 1] ** 2 - d1 ** 2) / (2.0 * np.maximum(sep, 1e-6))
        ri = r[i1] * fill
        soft = box.soft_mm
        # A cyst fills its Voronoi cell up to `fill` times its radius, short of the
        # half-wall on each shared face; its wall surrounds it.
        foot[near] = np.clip((ri + wall - d1) / soft + 0.5, 0.0, 1.0)
        air[near] = np.clip((np.minimum(ri - d1, bis - 0.5 * wall)) / soft + 0.5, 0.0, 1.0)
    foot = foot.reshape(f.shape) * lung_f * (free_f > 0)
    air = air.reshape(f.shape) * foot
    wall_hu = rng.uniform(*cfg.honeycomb_wall_hu)
    p = np.float32(cfg.air_hu) * air + np.float32(wall_hu) * (foot - air)
    params.update(wall_hu=round(wall_hu, 1))
    return foot, p, foot

"""Consolidation: lung replaced by near soft-tissue attenuation, with air bronchograms."""
from __future__ import annotations

import math

import numpy as np

from ..case import Case
from ..grids import FineBox, ramp, random_perpendicular, tube_coverage, unit


def draw(case: Case, box: FineBox, f, lung_f, centre, side, radius, params):
    """Consolidation: the lung is replaced by near soft-tissue attenuation
    (vessels hidden), with optional air bronchograms (a small tree of air tubes
    entering from the hilar side)."""
    cfg, rng = case.cfg, case.rng
    a = ramp(f, cfg.consolidation_edge_mm) * lung_f
    level = rng.uniform(*cfg.consolidation_hu)
    texture = rng.uniform(*cfg.consolidation_texture_hu)
    p = level + texture * box.smooth_noise(rng, 3.0)
    bronchogram = bool(rng.uniform() < cfg.air_bronchogram_probability)
    if bronchogram:
        # Air-filled bronchi run from the hilum outwards through the consolidated
        # lung: a small branching tree entering on the region's hilar side.
        hil = case.side_centroid.get(side, centre)
        u = unit(centre - hil) if np.linalg.norm(centre - hil) > 1 else unit(rng.standard_normal(3))
        r0 = rng.uniform(*cfg.air_bronchogram_radius_mm)
        segs = []
        stack = [(centre - radius * u, u, r0, rng.uniform(0.6, 0.8) * radius, 0)]
        while stack:
            s, d, r, length, gen = stack.pop()
            d = unit(d + rng.normal(0, 0.15, 3))
            e = s + d * length
            segs.append((s, e, r, r * 0.85))
            if gen < cfg.air_bronchogram_generations:
                perp = random_perpendicular(d, rng)
                for sign in (1.0, -1.0):
                    ang = math.radians(rng.uniform(20.0, 40.0))
                    nd = math.cos(ang) * d + sign * math.sin(ang) * perp
                    stack.append((e, nd, r * 0.8, length * rng.uniform(0.65, 0.85), gen + 1))
        tubes = tube_coverage(box, segs)
        p = p * (1.0 - tubes) + np.float32(cfg.air_hu) * tubes
        params.update(bronchogram_radius_mm=round(r0, 2))
    params.update(consolidation_hu=round(level, 1), texture_hu=round(texture, 1),
                  air_bronchograms=float(bronchogram))
    return a, a * p, a

"""Micronodules: many solid spheres of 1-3 mm, diffuse or in centrilobular clusters."""
from __future__ import annotations

import numpy as np

from ..case import Case
from ..grids import FineBox, ramp, sphere_coverage


def draw(case: Case, box: FineBox, f, lung_f, params):
    """Micronodules: many solid spheres of 1-3 mm, at random (diffuse) or in
    Gaussian clusters (centrilobular), anti-aliased on the fine grid."""
    cfg, rng = case.cfg, case.rng
    a = ramp(f, cfg.micronodule_edge_mm) * lung_f
    inside = np.flatnonzero(((f > 0) & lung_f).ravel())
    fine_ml = np.prod([s / n for s, n in zip(case.sp, case.n_fine)]) / 1000.0
    volume_ml = inside.size * fine_ml
    density = rng.uniform(*cfg.micronodule_density_per_ml)
    count = int(round(density * volume_ml))
    clustered = bool(rng.uniform() < cfg.micronodule_clustered_probability)
    coords = np.stack(np.unravel_index(inside, box.fine_shape), 1) if inside.size else np.zeros((0, 3), int)

    def pos(ix):
        return np.stack([box.coords[ax][coords[ix, ax]] for ax in range(3)], 1)

    if count == 0 or inside.size == 0:
        centres = np.zeros((0, 3))
    elif clustered:
        size = rng.integers(cfg.micronodule_cluster_size[0], cfg.micronodule_cluster_size[1] + 1)
        n_clusters = max(1, int(round(count / size)))
        spread = rng.uniform(*cfg.micronodule_cluster_sd_mm)
        heads = pos(rng.choice(inside.size, n_clusters))
        centres = heads[rng.integers(0, n_clusters, count)] + rng.normal(0, spread, (count, 3))
    else:
        centres = pos(rng.choice(inside.size, count))
        centres += rng.uniform(-0.5, 0.5, centres.shape) * (np.array(case.sp) / np.array(case.n_fine))
    radii = rng.uniform(*cfg.micronodule_diameter_mm, len(centres)) / 2.0
    cover = sphere_coverage(box, centres, radii)
    hu = rng.uniform(*cfg.micronodule_hu)
    w = a * cover
    params.update(nodules=int(len(centres)), density_per_ml=round(density, 2), clustered=float(clustered),
                  nodule_hu=round(hu, 1))
    return w, w * np.float32(hu), a

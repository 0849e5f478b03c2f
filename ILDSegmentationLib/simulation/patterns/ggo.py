"""Ground-glass opacity: a hazy rise of attenuation; vessels and bronchial walls stay visible."""
from __future__ import annotations

import numpy as np

from ..case import Case
from ..grids import FineBox, ramp


def draw(case: Case, box: FineBox, f, lung_f, params):
    """Ground glass: hazy increase of attenuation with vessels and bronchial walls
    preserved. A fraction of the remaining air is replaced by tissue/fluid, so
    air-filled parenchyma rises towards the target while a vessel (no air)
    keeps its value. All pattern methods take the region field f (mm), the fine
    lung mask, and return fine maps (w, w * p, membership) and fill params."""
    cfg, rng = case.cfg, case.rng
    a = ramp(f, cfg.ggo_edge_mm) * lung_f
    orig = case.ct[box.slices]
    inside = (box.to_native((f > 0) & lung_f) >= 0.5) & (orig < -600)
    base = float(np.median(orig[inside])) if inside.sum() > 20 else -850.0
    target = rng.uniform(*cfg.ggo_target_hu)
    # Fraction of the remaining air replaced by tissue/fluid so that parenchyma at
    # `base` HU reaches `target`; a vessel (no air) is left as it is.
    g0 = float(np.clip((target - base) / (cfg.tissue_hu - base), 0.0, 0.9))
    patchiness = rng.uniform(*cfg.ggo_patchiness)
    rough = rng.uniform(*cfg.ggo_roughness)
    g = np.clip(g0 * (1.0 + patchiness * box.smooth_noise(rng, cfg.ggo_patch_scale_mm)
                      + rough * box.smooth_noise(rng, 2.0)), 0.0, 0.95)
    w = a * g
    params.update(target_hu=round(target, 1), parenchyma_hu=round(base, 1), air_replaced=round(g0, 3),
                  patchiness=round(patchiness, 3), roughness=round(rough, 3))
    return w, w * np.float32(cfg.tissue_hu), a

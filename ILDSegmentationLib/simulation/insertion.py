"""Putting one region into the CT: the insertion core every pattern shares.

:func:`insert` draws a region's size and whether it is subpleural, finds it a place
(:meth:`.case.Case.choose_centre`), builds its outline, lets the pattern's module fill
it (:mod:`.patterns`), mixes it into the CT (:meth:`.case.Case.apply`), labels the truth
and, for some regions, the annotation. :func:`insert_healthy_patch` annotates a patch
of unchanged lung.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from .case import Case
from .config import CONSOLIDATION, GGO, HEALTHY, HONEYCOMBING, MICRONODULES, PATTERNS, RETICULATION
from .patterns import consolidation, ggo, honeycombing, micronodules, reticulation
from .results import SimulatedRegion


def insert(case: Case, label: int) -> Optional[SimulatedRegion]:
    """Try a few places for a region of this pattern; return its record or None."""
    cfg, rng = case.cfg, case.rng
    k = PATTERNS.index(label)
    for _attempt in range(6):
        radius = rng.uniform(*cfg.region_radius_mm[k])
        z_radius = radius * rng.uniform(*cfg.region_z_factor)
        subpleural = bool(rng.uniform() < cfg.subpleural_probability[k])
        params: Dict[str, float] = {"radius_mm": round(radius, 1)}
        band = None
        rows, r_mean, wall = 0, 0.0, 0.0
        if label == HONEYCOMBING:
            subpleural = True
            rows = int(rng.integers(cfg.honeycomb_rows[0], cfg.honeycomb_rows[1] + 1))
            r_mean = rng.uniform(*cfg.honeycomb_cyst_diameter_mm) / 2.0
            wall = rng.uniform(*cfg.honeycomb_wall_mm)
            band = rows * (2 * r_mean + wall) + wall
        elif subpleural:
            band = rng.uniform(*cfg.subpleural_depth_mm)
        found = case.choose_centre(radius, band, label in (RETICULATION, HONEYCOMBING), cfg.region_gap_mm)
        if found is None:
            continue
        centre, side = found
        shape = case.draw_shape(radius, z_radius)
        # Honeycomb cysts reach past the blob by up to a cyst and a wall.
        margin = 4.0 + (12.0 if label == HONEYCOMBING else 0.5 * cfg.ggo_edge_mm)
        box = case.shape_box(centre, shape, margin)
        # Honeycombing: the blob only says where cysts may be centred; the band
        # limit lies in the rows, so the blob is cut a little deeper.
        f, lung_f, pleura_f = case.region_field(box, centre, shape,
                                                None if band is None else band + (0 if label != HONEYCOMBING else 4),
                                                side, cfg.region_gap_mm)
        side_native = case.sides[box.slices] == side
        free_native = ~case.assigned[box.slices]
        if label == HONEYCOMBING:
            free_f = case.fine_distance(box, lambda s: ~case.assigned[s], cfg.region_gap_mm + 12.0)
            free_f -= cfg.region_gap_mm
            res = honeycombing.draw(case, box, f, lung_f, pleura_f, free_f, rows, r_mean, wall, params)
            if res is None:
                continue
            w, pw, member = res
        else:
            inside_ml = np.count_nonzero(box.to_native((f > 0) & lung_f) >= 0.5) * case.voxel_ml
            if inside_ml < cfg.min_region_ml:
                continue
            if label == GGO:
                w, pw, member = ggo.draw(case, box, f, lung_f, params)
            elif label == MICRONODULES:
                w, pw, member = micronodules.draw(case, box, f, lung_f, params)
            elif label == CONSOLIDATION:
                w, pw, member = consolidation.draw(case, box, f, lung_f, centre, side, radius, params)
            else:
                w, pw, member = reticulation.draw(case, box, f, lung_f, params)
        region = (box.to_native(member >= 0.5) >= 0.5) & side_native & free_native
        volume = np.count_nonzero(region) * case.voxel_ml
        if volume < cfg.min_region_ml:
            continue
        case.apply(box, w, pw)
        case.truth[box.slices][region] = label
        case.assigned[box.slices] |= region
        case.mark_placed(centre, radius)
        annotated = bool(rng.uniform() < cfg.annotate_probability)
        annotated_ml = 0.0
        if annotated:
            core = region & (case.inplane_depth(region) > cfg.annotation_margin_mm)
            case.annotation[box.slices][core] = label
            annotated_ml = np.count_nonzero(core) * case.voxel_ml
            annotated = annotated_ml > 0
        return case.record(label, box, region, subpleural, annotated, annotated_ml, params)
    return None


def insert_healthy_patch(case: Case, bias: str = "") -> Optional[SimulatedRegion]:
    """An annotated patch of unchanged lung, with its vessels, airways and
    fissures, away from every pattern region; ``bias`` "medial" or "basal"
    prefers the hila or the bases and dependent lung (see SimulationConfig).
    Masses and lung already dense on this CT are left out of it."""
    cfg, rng = case.cfg, case.rng
    if not hasattr(case, "_c_dense"):
        sl = tuple(slice(None, None, s) for s in case.cstep)
        csp = [s * f for s, f in zip(case.sp, case.cstep)]
        dense = case.dense_parenchyma(np.asarray(case.ct[sl], np.float32), csp)
        case._c_dense = dense[tuple(case.c_idx.T)]
    for _attempt in range(6):
        radius = rng.uniform(*cfg.healthy_patch_radius_mm)
        z_radius = radius * rng.uniform(*cfg.region_z_factor)
        found = case.choose_centre(radius, None, False, cfg.healthy_gap_mm, avoid=~case._c_dense, bias=bias)
        if found is None:
            return None
        centre, side = found
        shape = case.draw_shape(radius, z_radius)
        box = case.shape_box(centre, shape, 3.0)
        f, lung_f, _ = case.region_field(box, centre, shape, None, side, cfg.healthy_gap_mm)
        region = (box.to_native((f > 0) & lung_f) >= 0.5) & (case.sides[box.slices] == side)
        region &= ~case.assigned[box.slices]
        region &= ~case.dense_parenchyma(np.asarray(case.ct[box.slices], np.float32), case.sp)
        region &= ~case.mass(box)
        core = region & (case.inplane_depth(region) > cfg.annotation_margin_mm)
        if np.count_nonzero(core) * case.voxel_ml < 0.5 * cfg.min_region_ml:
            continue
        case.annotation[box.slices][core] = HEALTHY
        case.assigned[box.slices] |= region
        case.mark_placed(centre, radius)
        ml = np.count_nonzero(core) * case.voxel_ml
        return case.record(HEALTHY, box, core, False, True, ml,
                           {"radius_mm": round(radius, 1), "hard": {"": 0.0, "medial": 1.0, "basal": 2.0}[bias]})
    return None

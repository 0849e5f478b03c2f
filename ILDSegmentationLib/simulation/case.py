"""The working state of one simulation and where its regions go (all in the canonical view).

:class:`Case` holds the CT being modified, its lungs and labels, the coarse maps that
choose region centres (depth from the costal pleura, position in the lung, clearance
from the regions already placed), each region's irregular outline on a fine grid,
and how a drawn pattern is mixed into the CT (partial volume, scanner blur, noise).
The patterns themselves are :mod:`.patterns`; :mod:`.insertion` puts them together.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from ..analysis.regions import inplane_distance, inside_chest_wall, slice_hulls
from ..classes import by_label
from ..imaging.noise import estimate_noise
from .config import DISTANCE_STEP_MM, RHO_MAX, SimulationConfig
from .grids import FineBox, apply_separable, interp_weights
from .results import SimulatedRegion


class Case:
    """Working state of one simulation, all in the canonical view."""

    def __init__(self, ct: np.ndarray, sides: np.ndarray, spacing: Tuple[float, float, float],
                 config: SimulationConfig, rng: np.random.Generator,
                 to_lps: Callable[[np.ndarray], np.ndarray]) -> None:
        self.ct = ct
        self.to_lps = to_lps  # canonical (slice, row, column) index -> LPS point (mm)
        self.sides = sides
        self.sp = spacing
        self.cfg = config
        self.rng = rng
        if np.issubdtype(ct.dtype, np.integer):
            self.out = np.array(ct, dtype=np.int16, copy=True)
        else:  # a float CT (rescaled on reading): rounded, kept in the int16 range
            self.out = np.clip(np.rint(ct), -32768, 32767).astype(np.int16)
        self.lung = sides > 0
        self.truth = self.lung.astype(np.uint8)
        self.annotation = np.zeros(ct.shape, np.uint8)
        self.assigned = np.zeros(ct.shape, bool)
        self.placed: List[Tuple[np.ndarray, float]] = []  # (centre mm, radius mm)
        self.voxel_ml = float(np.prod(spacing)) / 1000.0
        self.lung_litres = np.count_nonzero(self.lung) * self.voxel_ml / 1000.0
        self.n_fine = (max(1, int(math.ceil(spacing[0] / config.fine_step_mm[0] - 1e-6))),
                       max(1, int(math.ceil(spacing[1] / config.fine_step_mm[1] - 1e-6))),
                       max(1, int(math.ceil(spacing[2] / config.fine_step_mm[1] - 1e-6))))
        self.noise = estimate_noise(ct, spacing)
        if config.noise_sd_hu is not None:
            self.noise = self.noise.scaled_to(float(config.noise_sd_hu))
        self._hulls = self._slice_hulls()
        self._coarse()

    # ---- the chest wall: where "subpleural" is measured from -------------------------------
    # One definition for the simulator and for the regional report (regions.py): depth
    # in the axial plane from the costal pleura, the mediastinal pleura not counting.
    def _slice_hulls(self) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
        """Per axial slice, the lungs' convex hull
        (see :func:`ILDSegmentationLib.analysis.regions.slice_hulls`)."""
        return slice_hulls(self.lung, self.sp)

    def _not_chest_wall(self, s: Tuple[slice, slice, slice], step: Tuple[int, int, int] = (1, 1, 1)) -> np.ndarray:
        """Lung or inside the lungs' hull for the box s, sampled every `step` voxels
        (see :func:`ILDSegmentationLib.analysis.regions.inside_chest_wall`)."""
        return inside_chest_wall(self.lung, self._hulls, self.sp, s, step)

    # ---- placement maps on a coarse grid (about 3 mm) ---------------------------------
    def _coarse(self) -> None:
        sz, sy, sx = self.sp
        self.cstep = (max(1, int(round(3.0 / sz))), max(1, int(round(3.0 / sy))), max(1, int(round(3.0 / sx))))
        sl = tuple(slice(None, None, s) for s in self.cstep)
        lung_c = self.sides[sl]
        csp = tuple(s * f for s, f in zip(self.sp, self.cstep))
        inner = self._not_chest_wall(tuple(slice(0, n) for n in self.ct.shape), self.cstep)
        self.c_dist = inplane_distance(inner, csp[1:])
        self.c_sides = lung_c
        idx = np.nonzero(lung_c)
        self.c_idx = np.stack(idx, 1)
        self.c_mm = self.c_idx * np.array(self.cstep) * np.array(self.sp)
        # Relative position within the lungs: 0 top .. 1 bottom, 0 front .. 1 back.
        lo = self.c_mm.min(axis=0)
        ext = np.maximum(self.c_mm.max(axis=0) - lo, 1e-6)
        self.c_rel = (self.c_mm - lo) / ext
        self.c_depth = self.c_dist[idx]
        # Per coarse point, min over placed regions of (distance to centre - 0.6 radius).
        self.c_clearance = np.full(len(self.c_idx), np.inf, np.float32)
        self.side_centroid = {}
        for side in (1, 2):
            sel = self.c_sides[idx] == side
            if sel.any():
                self.side_centroid[side] = self.c_mm[sel].mean(axis=0)

    def choose_centre(self, radius: float, subpleural_depth: Optional[float], fibrosis: bool,
                      gap: float, avoid: Optional[np.ndarray] = None,
                      bias: str = "") -> Optional[Tuple[np.ndarray, int]]:
        ok = self.c_depth >= (1.0 if subpleural_depth is not None else min(6.0, radius * 0.4))
        if subpleural_depth is not None:
            ok &= self.c_depth <= max(2.0, 0.5 * subpleural_depth)
        if avoid is not None:
            ok &= avoid
        cand = np.flatnonzero(ok)
        cand = cand[~self.assigned[tuple((self.c_idx[cand] * np.array(self.cstep)).T)]]
        # Centres stay clear of the regions already placed (the exact gap is kept
        # on the voxel grid later; this only avoids hopeless tries).
        cand = cand[self.c_clearance[cand] > 0.6 * radius + gap]
        if cand.size == 0:
            return None
        w = np.ones(cand.size)
        b = self.cfg.fibrosis_basal_posterior_bias
        if (fibrosis or bias == "basal") and b > 0:
            w = (1 + b * self.c_rel[cand, 0]) * (1 + b * self.c_rel[cand, 1])
        elif bias == "medial":
            # 1 at the midline between the lungs, 0 at the lateral chest wall.
            medial = 1.0 - np.abs(self.c_rel[cand, 2] - 0.5) * 2.0
            w = (1 + 4.0 * medial) ** 2
        pick = cand[self.rng.choice(cand.size, p=w / w.sum())]
        # Jitter inside the coarse cell so centres are not on a lattice.
        centre = self.c_mm[pick] + self.rng.uniform(0, 1, 3) * (np.array(self.cstep) - 1) * np.array(self.sp)
        side = int(self.c_sides[tuple(self.c_idx[pick])])
        return centre, side

    def mark_placed(self, centre: np.ndarray, radius: float) -> None:
        self.placed.append((centre, radius))
        d = np.sqrt(((self.c_mm - centre) ** 2).sum(axis=1)) - 0.6 * radius
        np.minimum(self.c_clearance, d.astype(np.float32), out=self.c_clearance)

    # ---- geometry of one region ---------------------------------------------------------
    def box(self, centre: np.ndarray, half_mm: np.ndarray) -> FineBox:
        sp = np.array(self.sp)
        lo = np.maximum(np.floor((centre - half_mm) / sp).astype(int), 0)
        hi = np.minimum(np.ceil((centre + half_mm) / sp).astype(int) + 1, np.array(self.ct.shape))
        return FineBox(lo, hi, self.n_fine, self.sp)

    def fine_distance(self, box: FineBox, mask_fn, margin_mm: float, in_plane: bool = False) -> np.ndarray:
        """Distance (mm), on the box's fine grid, to the nearest voxel where
        mask_fn(slices) is False. Computed in the box grown by margin_mm (distances up
        to the margin are exact; where the grown box meets the scan's edge the edge
        is replicated, since the scan's edge is no boundary), on pixels of about
        DISTANCE_STEP_MM (a distance map is smooth: interpolating it costs less than
        a millimetre's accuracy and saves most of the time). in_plane: within each
        axial slice only."""
        sp = np.array(self.sp)
        m = np.ceil(margin_mm / sp).astype(int)
        if in_plane:
            m[0] = 0
        lo = np.maximum(box.lo - m, 0)
        hi = np.minimum(box.hi + m, np.array(self.ct.shape))
        sub = mask_fn(tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)))
        pads = [(int(m[ax] - (box.lo[ax] - lo[ax])), int(m[ax] - (hi[ax] - box.hi[ax]))) for ax in range(3)]
        sub = np.pad(sub, pads, mode="edge")
        origin = box.lo - m
        step = [1] + [max(1, int(round(DISTANCE_STEP_MM / sp[ax]))) for ax in (1, 2)]
        nz, ny, nx = sub.shape[0], sub.shape[1] // step[1], sub.shape[2] // step[2]
        # A block is inside only when all its pixels are (the border moves less than
        # a block).
        sub = sub[:, :ny * step[1], :nx * step[2]].reshape(nz, ny, step[1], nx, step[2]).all(axis=(2, 4))
        sampling = (self.sp[0], self.sp[1] * step[1], self.sp[2] * step[2])
        if in_plane:
            d = inplane_distance(sub, sampling[1:])
        else:
            d = ndimage.distance_transform_edt(sub, sampling=sampling).astype(np.float32)
        weights = [interp_weights((box.units[ax] - origin[ax] - (step[ax] - 1) / 2.0) / step[ax], d.shape[ax])
                   for ax in range(3)]
        return apply_separable(d, weights)

    def draw_shape(self, radius: float, z_radius: float) -> Dict[str, float]:
        """Semi-axes (mm) and in-plane orientation of a region's ellipsoid."""
        aspect = self.rng.uniform(*self.cfg.region_aspect)
        return {"radius": radius, "ru": radius / math.sqrt(aspect), "rv": radius * math.sqrt(aspect),
                "rz": z_radius, "theta": self.rng.uniform(0, math.pi)}

    def shape_box(self, centre: np.ndarray, shape: Dict[str, float], margin_mm: float) -> FineBox:
        """A box that holds the whole region (the noise may push its border out to
        RHO_MAX times the ellipsoid) plus margin_mm."""
        half_xy = RHO_MAX * max(shape["ru"], shape["rv"]) + margin_mm
        return self.box(centre, np.array([RHO_MAX * shape["rz"] + margin_mm, half_xy, half_xy]))

    def region_field(self, box: FineBox, centre: np.ndarray, shape: Dict[str, float],
                     band_mm: Optional[float], side: int, gap: float):
        """Signed pseudo-distance f (mm, > 0 inside) of an irregular region on the
        fine grid, the fine lung of its side, and the fine pleural distance."""
        cfg, rng = self.cfg, self.rng
        radius, ru, rv, rz, theta = (shape[k] for k in ("radius", "ru", "rv", "rz", "theta"))
        dz, dy, dx = box.z - centre[0], box.y - centre[1], box.x - centre[2]
        u = dx * math.cos(theta) + dy * math.sin(theta)
        v = -dx * math.sin(theta) + dy * math.cos(theta)
        rho = np.sqrt((u / ru) ** 2 + (v / rv) ** 2 + (dz / rz) ** 2)
        f = radius * (1.0 - rho) + cfg.region_irregularity * radius * box.smooth_noise(rng, cfg.region_noise_scale_mm)
        # Never beyond RHO_MAX times the ellipsoid: the region stays inside its box.
        f = np.minimum(f, radius * (RHO_MAX - 0.05 - rho))
        lung_f = box.to_fine((self.sides[box.slices] == side).astype(np.float32)) >= 0.5
        pleura_f = self.fine_distance(box, self._not_chest_wall, 45.0, in_plane=True)
        if band_mm is not None:
            # The band's inner border is irregular too (a few mm).
            f = np.minimum(f, band_mm - pleura_f + 2.0 * box.smooth_noise(rng, 6.0))
        if self.assigned[box.slices].any() or self.assigned_near(box, gap):
            free = self.fine_distance(box, lambda s: ~self.assigned[s], gap + 10.0)
            f = np.minimum(f, free - gap)
        return f.astype(np.float32), lung_f, pleura_f

    def assigned_near(self, box: FineBox, gap: float) -> bool:
        m = np.ceil(gap / np.array(self.sp)).astype(int) + 1
        lo = np.maximum(box.lo - m, 0)
        hi = np.minimum(box.hi + m, np.array(self.ct.shape))
        return bool(self.assigned[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))].any())

    #: Parenchymal density is judged on the 20th percentile of the HU over a square
    #: of this side (mm) in the axial plane: a vessel or bronchial wall up to about a
    #: third of it wide does not move that percentile; ground glass of its own
    #: (the RICORD case's COVID-19) or atelectasis does.
    _PARENCHYMA_WINDOW_MM = 15.0

    def dense_parenchyma(self, hu: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """Lung whose parenchyma (not its vessels) is denser than ``healthy_max_hu``:
        disease the input CT already holds, never annotated healthy."""
        size = [1] + [max(1, int(round(self._PARENCHYMA_WINDOW_MM / s))) | 1 for s in spacing[1:]]
        return ndimage.percentile_filter(hu, 20, size=size, mode="nearest") > self.cfg.healthy_max_hu

    def mass(self, box: FineBox) -> np.ndarray:
        """Solid tissue in the box at least 2 x healthy_mass_radius_mm across in the
        axial plane (a tumour, not a vessel), grown by a millimetre for its border."""
        cfg = self.cfg
        dense = np.asarray(self.ct[box.slices]) > cfg.healthy_mass_hu
        r = [cfg.healthy_mass_radius_mm / s for s in self.sp[1:]]
        ry, rx = (int(math.ceil(v)) for v in r)
        yy, xx = np.mgrid[-ry:ry + 1, -rx:rx + 1]
        disc = ((yy / max(r[0], 1e-6)) ** 2 + (xx / max(r[1], 1e-6)) ** 2) <= 1.0
        out = np.zeros(dense.shape, bool)
        for z in range(dense.shape[0]):
            if dense[z].any():
                opened = ndimage.binary_opening(dense[z], structure=disc)
                if opened.any():
                    out[z] = ndimage.binary_dilation(opened, iterations=max(1, int(round(1.0 / self.sp[1]))))
        return out

    def inplane_depth(self, region: np.ndarray) -> np.ndarray:
        """Distance (mm) to the region's border within each axial slice."""
        out = np.zeros(region.shape, np.float32)
        for z in range(region.shape[0]):
            if region[z].any():
                out[z] = ndimage.distance_transform_edt(np.pad(region[z], 1), sampling=self.sp[1:])[1:-1, 1:-1]
        return out

    def apply(self, box: FineBox, w: np.ndarray, pw: np.ndarray) -> None:
        """Partial volume, scanner blur, mixing with the original and noise."""
        sig = [0.0] + [self.cfg.psf_fwhm_mm / 2.3548 / s for s in self.sp[1:]]
        wn = ndimage.gaussian_filter(box.to_native(w), sig, mode="nearest")
        pwn = ndimage.gaussian_filter(box.to_native(pw), sig, mode="nearest")
        wn = np.clip(wn, 0.0, 1.0)
        touched = wn > 1e-3
        orig = self.out[box.slices].astype(np.float32)
        noise = self.noise.sample(self.rng, box.shape, int(box.lo[0]))
        # The original's noise is scaled by (1 - W): add the missing variance.
        extra = np.sqrt(np.clip(1.0 - (1.0 - wn) ** 2, 0.0, 1.0))
        new = orig * (1.0 - wn) + pwn + noise * extra
        new = np.clip(np.rint(new), -1024, 3071).astype(np.int16)
        view = self.out[box.slices]
        view[touched] = new[touched]

    def record(self, label, box: FineBox, region, subpleural, annotated, annotated_ml, params) -> SimulatedRegion:
        idx = np.argwhere(region)
        lo, hi = idx.min(axis=0), idx.max(axis=0)
        centre_c = idx.mean(axis=0) + box.lo  # canonical index
        size = (hi - lo + 1) * np.array(self.sp)
        return SimulatedRegion(
            label=int(label), name=by_label(int(label)).name,
            centre_mm=tuple(float(v) for v in self.to_lps(centre_c)),  # type: ignore[arg-type]
            size_mm=(float(size[2]), float(size[1]), float(size[0])),
            volume_ml=round(float(np.count_nonzero(region) * self.voxel_ml), 3),
            subpleural=bool(subpleural), annotated=bool(annotated), annotated_ml=round(float(annotated_ml), 3),
            parameters=params)

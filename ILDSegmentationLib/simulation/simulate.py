"""Insert simulated interstitial lung disease (ILD) patterns into a real chest CT.

No public, redistributable chest CT carries the six ILD labels of Anthimopoulos et
al. 2018, so training and test cases are made here: irregular regions of real lung
parenchyma receive one of the five patterns, drawn from what radiology describes,
and the rest of the lung stays as it was (healthy). :func:`simulate_case` returns the
modified CT, the lung mask, a dense truth and a sparse annotation like the paper's.
``docs/simulator.md`` explains every parameter of :class:`SimulationConfig` with its
radiological reasoning and shows each pattern before and after insertion.

How a pattern is inserted (all sizes in millimetres, so the result looks the same at
0.6 or 1.4 mm pixels and 1 to 8 mm slices):

1. **Where.** A region is an ellipsoid a few cm across whose surface is deformed by
   smooth noise (lobulated, irregular), cut by the lung it lies in (it follows the
   pleura), kept a few mm away from the other regions, and for subpleural regions
   cut to a band within ~1-2 cm of the costal pleura. Fibrosis (reticulation, honeycombing)
   is placed preferentially in the lower and posterior lung, as in usual interstitial
   pneumonia.
2. **What.** Inside the region's bounding box, the pattern is drawn on a *fine grid*
   (sub-voxels of at most ``fine_step_mm``: about 0.7 mm in plane and 1 mm along z)
   as two maps: ``w``, the fraction of the tissue at that point that the pattern
   replaces (0..1), and ``p``, the attenuation (HU) of what replaces it. Averaging
   the sub-voxels of each CT voxel is the partial-volume effect of the voxel and of
   the slice thickness (a 2 mm nodule in an 8 mm slice is faint, as it is in a real
   thick-slice CT); a Gaussian blur of ``psf_fwhm_mm`` in plane is the scanner's
   point spread. The voxel's new value is ``hu * (1 - W) + mean(w * p)``: a mix of
   the original voxel (its vessels, airways, texture) and the pattern.
3. **Noise.** The original voxel's noise is scaled by ``(1 - W)``; fresh noise with
   the noise power spectrum and the per-slice level measured on this CT
   (:func:`estimate_noise`) is added with the missing variance,
   ``sd * sqrt(1 - (1 - W)^2)``, so the modified region has the same noise level
   and grain as its surroundings.
4. **Labels.** A voxel takes the pattern's label when at least half of its
   sub-voxels are in the region (truth, dense). The annotation (sparse, like the
   paper's) holds the core of some regions and some healthy patches.

Conventions: arrays are **K, J, I** in and out; all work is done in the canonical
view of :mod:`ILDSegmentationLib.imaging.geometry` (axial slice superior -> inferior, row
anterior -> posterior, column patient right -> left), so a volume stored with
permuted or flipped axes gives the same case. Region centres are reported in LPS mm.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from ..classes import by_label
from ..imaging.lungsides import split_left_right
from ..errors import InputError, LungMaskError
from ..imaging.geometry import CanonicalView, Geometry, as_volume, canonical_view
from ..imaging.noise import NoiseModel, estimate_noise
from ..analysis.regions import inplane_distance, inside_chest_wall, slice_hulls

log = logging.getLogger(__name__)

HEALTHY = 1
GGO = 2
MICRONODULES = 3
CONSOLIDATION = 4
RETICULATION = 5
HONEYCOMBING = 6
#: The five patterns, in the order of every per-pattern tuple of the config.
PATTERNS: Tuple[int, ...] = (GGO, MICRONODULES, CONSOLIDATION, RETICULATION, HONEYCOMBING)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SimulationConfig:
    """Every parameter of the simulator. Units in the names; ranges ``(lo, hi)`` are
    drawn uniformly per region. Per-pattern tuples are in the order of
    :data:`PATTERNS`: (GGO, micronodules, consolidation, reticulation, honeycombing).
    ``docs/simulator.md`` gives the radiological reasoning for each value.
    """

    # ---- how many regions, where, how large --------------------------------------
    #: Mean number of regions of each pattern per litre of lung. A typical adult
    #: lung at CT holds 3-6 L, so about 2-4 regions of each pattern per case.
    regions_per_litre: Tuple[float, float, float, float, float] = (0.8, 0.8, 1.0, 0.9, 0.8)
    #: Every pattern gets at least this many regions (if it fits) and at most this many.
    min_regions_per_pattern: int = 1
    max_regions_per_pattern: int = 6
    #: Mean in-plane radius (mm) of a region, per pattern.
    region_radius_mm: Tuple[Tuple[float, float], ...] = (
        (16.0, 30.0), (15.0, 28.0), (15.0, 28.0), (18.0, 32.0), (20.0, 36.0))
    #: Cranio-caudal radius as a multiple of the in-plane radius.
    region_z_factor: Tuple[float, float] = (0.7, 1.3)
    #: Ratio of the short to the long in-plane axis of the ellipsoid.
    region_aspect: Tuple[float, float] = (0.55, 1.0)
    #: Amplitude (fraction of the radius) and scale (mm) of the smooth noise that
    #: deforms the region's outline (lobulated, irregular borders).
    region_irregularity: float = 0.35
    region_noise_scale_mm: float = 9.0
    #: Regions stay at least this far (mm) from other regions and healthy patches.
    region_gap_mm: float = 5.0
    #: Smallest region kept (mL); smaller draws (region squeezed by the pleura or by
    #: other regions) are redrawn elsewhere.
    min_region_ml: float = 1.0
    #: Probability that a region of each pattern is subpleural.
    subpleural_probability: Tuple[float, float, float, float, float] = (0.35, 0.2, 0.5, 0.8, 1.0)
    #: Depth (mm) from the pleura of a subpleural band (not honeycombing, whose depth
    #: follows from its rows of cysts).
    subpleural_depth_mm: Tuple[float, float] = (10.0, 20.0)
    #: Preference of fibrosis (reticulation, honeycombing) for the lower and the
    #: posterior lung: a candidate centre's weight is (1 + b*inferior)*(1 + b*posterior)
    #: with both positions 0..1 across the lung. 0 = anywhere.
    fibrosis_basal_posterior_bias: float = 4.0

    # ---- attenuation of the materials ---------------------------------------------
    #: Attenuation (HU) of soft tissue/fluid: what fills alveoli in ground glass and
    #: what thickened interstitium, nodules and fibrotic walls are made of.
    tissue_hu: float = 40.0

    # ---- ground glass opacity --------------------------------------------------------
    #: Parenchymal attenuation reached inside the region (HU). Vessels and bronchial
    #: walls are not overwritten: the model replaces a fraction of the *air* only.
    ggo_target_hu: Tuple[float, float] = (-750.0, -450.0)
    #: Relative amplitude (drawn per region) and scale (mm) of the smooth variation
    #: of the density: from nearly uniform to patchy, mosaic-like.
    ggo_patchiness: Tuple[float, float] = (0.1, 0.5)
    ggo_patch_scale_mm: float = 6.0
    #: Fine-grained roughness of ground glass (relative amplitude drawn per region, on
    #: a 2 mm scale): real ground glass is uneven at the scale of acini and lobules,
    #: about 1.5 times as rough as the lung round it (docs/simulator.md, "Simulated
    #: against real"), not a smooth haze.
    ggo_roughness: Tuple[float, float] = (0.1, 0.6)
    #: Width (mm) of the soft border: ground glass fades into normal lung.
    ggo_edge_mm: float = 5.0

    # ---- micronodules ----------------------------------------------------------------
    #: Nodule diameter (mm) and attenuation (HU, solid soft tissue).
    micronodule_diameter_mm: Tuple[float, float] = (1.0, 3.0)
    micronodule_hu: Tuple[float, float] = (0.0, 60.0)
    #: Nodules per mL of region.
    micronodule_density_per_ml: Tuple[float, float] = (10.0, 25.0)
    #: Probability that a region's nodules are clustered (centrilobular clusters)
    #: rather than diffuse; cluster spread (mm, standard deviation).
    micronodule_clustered_probability: float = 0.4
    micronodule_cluster_sd_mm: Tuple[float, float] = (2.5, 5.0)
    micronodule_cluster_size: Tuple[int, int] = (6, 20)
    micronodule_edge_mm: float = 3.0

    # ---- consolidation ---------------------------------------------------------------
    #: Attenuation (HU) of the consolidated lung, and its smooth inhomogeneity (sd, HU).
    #: Real consolidation is often incomplete (some air left, partial volume with
    #: aerated lung): MedSeg's labelled consolidation has a median of about -200 HU
    #: and a local sd of about 90 HU (docs/simulator.md, "Simulated against real").
    consolidation_hu: Tuple[float, float] = (-350.0, 40.0)
    #: Smooth inhomogeneity (sd, HU), drawn per region, on a 3 mm scale.
    consolidation_texture_hu: Tuple[float, float] = (10.0, 70.0)
    consolidation_edge_mm: float = 2.5
    #: Probability of air bronchograms, their lumen radius at the proximal end (mm),
    #: number of branching generations, and their attenuation (HU).
    air_bronchogram_probability: float = 0.8
    air_bronchogram_radius_mm: Tuple[float, float] = (1.2, 2.2)
    air_bronchogram_generations: int = 3
    air_hu: float = -1000.0

    # ---- reticulation ----------------------------------------------------------------
    #: Width (mm) of the cells of the net (polygonal, irregular) and true thickness
    #: (mm) of its lines (thickened intralobular and interlobular septa).
    #: Fine (intralobular, a few mm) to coarse (interlobular and fibrotic bands,
    #: about a secondary lobule, 10-25 mm: Fleischner glossary, Hansell 2008).
    reticulation_cell_mm: Tuple[float, float] = (3.5, 12.0)
    reticulation_line_mm: Tuple[float, float] = (0.6, 1.8)
    #: Irregularity of the net, drawn per region: the cells are warped by this
    #: much (mm); fibrotic reticulation is coarse and distorted, not a regular net.
    reticulation_warp_mm: Tuple[float, float] = (1.0, 3.0)
    #: Fraction of the air replaced between the lines: from the mild ground-glass
    #: component of usual interstitial pneumonia to the ground glass with
    #: superimposed reticulation of fibrotic NSIP (ATS/ERS/JRS/ALAT 2018).
    reticulation_background_fill: Tuple[float, float] = (0.03, 0.30)
    #: Traction bronchiectasis (a hallmark of fibrosis, Fleischner glossary): the
    #: probability that a reticulation region holds dilated, irregular airways, their
    #: lumen radius (mm) and wall thickness (mm).
    traction_bronchiectasis_probability: float = 0.5
    traction_bronchiectasis_radius_mm: Tuple[float, float] = (1.0, 2.5)
    traction_bronchiectasis_wall_mm: Tuple[float, float] = (0.6, 1.2)
    reticulation_edge_mm: float = 3.0

    # ---- honeycombing ----------------------------------------------------------------
    #: Cyst diameter (mm), wall thickness (mm), wall attenuation (HU) and number of
    #: rows (layers) of cysts stacked along the pleura.
    honeycomb_cyst_diameter_mm: Tuple[float, float] = (3.0, 12.0)
    honeycomb_wall_mm: Tuple[float, float] = (1.0, 2.0)
    honeycomb_wall_hu: Tuple[float, float] = (0.0, 50.0)
    honeycomb_rows: Tuple[int, int] = (1, 3)
    #: How far a cyst may spread into the gaps between spheres (multiple of its
    #: radius): cysts share walls instead of floating in solid tissue.
    honeycomb_cyst_fill: float = 1.15
    #: Smallest distance between two cyst centres as a fraction of the sum of their
    #: radii (< 1: neighbours share a wall), and the irregularity of the walls
    #: (displacement as a fraction of the mean cyst radius).
    honeycomb_packing: float = 0.85
    honeycomb_wall_irregularity: float = 0.15

    # ---- scanner model -----------------------------------------------------------------
    #: Largest sub-voxel step (mm) of the fine grid along z and in plane.
    fine_step_mm: Tuple[float, float] = (1.0, 0.75)
    #: In-plane full width at half maximum (mm) of the scanner's point spread.
    psf_fwhm_mm: float = 1.0
    #: Median noise standard deviation (HU) of the noise added in modified regions;
    #: None = measured on the CT, slice by slice (see :func:`estimate_noise`).
    noise_sd_hu: Optional[float] = None

    # ---- annotation (sparse, like the paper's) -------------------------------------------
    #: Probability that a pattern region is annotated.
    annotate_probability: float = 0.7
    #: Only the core of an annotated region is annotated: voxels at least this far
    #: (mm, in the axial plane) inside its border.
    annotation_margin_mm: float = 2.0
    #: Healthy patches annotated per litre of lung, their radius (mm) and distance
    #: from any pattern region (mm). A patch is normal lung *with what lies in it*
    #: (vessels, bronchi and their walls, fissures, dependent density, partial volume
    #: at the diaphragm), as a radiologist outlines healthy lung: a network never
    #: shown a vessel labelled healthy is free to call it micronodules.
    healthy_patches_per_litre: float = 5.0
    healthy_patch_radius_mm: Tuple[float, float] = (15.0, 35.0)
    healthy_gap_mm: float = 6.0
    #: Share of the healthy patches placed where normal anatomy is most often taken
    #: for disease: half of them near the hila (medial lung), half at the bases and
    #: posterior (dependent) lung, the places fibrosis is looked for.
    healthy_hard_fraction: float = 0.5
    #: Lung whose parenchyma (the 20th percentile of a 15 mm square, so not its
    #: vessels) is denser than this is not annotated healthy: a real CT may hold
    #: ground glass of its own.
    healthy_max_hu: float = -650.0
    #: Only masses are left out of healthy patches (a real CT may hold a tumour or
    #: disease of its own): lung whose attenuation stays above ``healthy_mass_hu``
    #: over a disc of ``healthy_mass_radius_mm`` (a morphological opening of the
    #: dense lung, so vessels and bronchial walls thinner than twice the radius stay in).
    healthy_mass_hu: float = -300.0
    healthy_mass_radius_mm: float = 4.0

    def __post_init__(self) -> None:
        if len(self.regions_per_litre) != 5 or len(self.region_radius_mm) != 5 or len(self.subpleural_probability) != 5:
            raise ValueError("per-pattern tuples need five entries (GGO, MN, Cons, Ret, HC)")
        if self.region_gap_mm < max(self.ggo_edge_mm, self.consolidation_edge_mm, self.reticulation_edge_mm,
                                    self.micronodule_edge_mm) / 2:
            raise ValueError("region_gap_mm must be at least half the widest soft border, or regions would touch")


#: A region's outline never reaches beyond this multiple of its ellipsoid.
_RHO_MAX = 1.25
#: Pixel size (mm) on which distance maps are computed before interpolation.
DISTANCE_STEP_MM = 1.3

#: Fraction of the lung voxels that the default config annotates (measured 6-11 %
#: over 10 seeds on the two real CTs of the tests; the tests accept this range).
ANNOTATED_FRACTION_RANGE = (0.03, 0.30)


# --------------------------------------------------------------------------- results


@dataclass
class SimulatedRegion:
    """One inserted region (a pattern region or an annotated healthy patch).

    label: class value (1..6). centre_mm: LPS position (mm) of the region's centroid.
    size_mm: extent (mm) of its bounding box along x (right->left), y (anterior->
    posterior), z (cranio-caudal). volume_ml: lung volume labelled with it in truth.
    annotated_ml: part of it in the annotation.
    parameters: the values drawn for this region (HU, sizes, counts).
    """

    label: int
    name: str
    centre_mm: Tuple[float, float, float]
    size_mm: Tuple[float, float, float]
    volume_ml: float
    subpleural: bool
    annotated: bool
    annotated_ml: float = 0.0
    parameters: Dict[str, float] = field(default_factory=dict)


@dataclass
class SimulatedCase:
    """A CT with simulated patterns and its labels, all K, J, I like the input.

    hu: int16, the CT with patterns inserted (the input array is never modified).
    lung_mask: uint8, 1 right lung, 2 left lung (the given mask, split, or computed).
    truth: uint8 dense truth: 0 outside the lung, 1 healthy, 2..6 patterns.
    annotation: uint8 sparse annotation: 0 not annotated, 1..6 in annotated regions.
    regions: one :class:`SimulatedRegion` per pattern region.
    healthy_patches: the annotated healthy patches.
    noise: the noise model used (measured on the CT; sd possibly configured).
    """

    hu: np.ndarray
    lung_mask: np.ndarray
    truth: np.ndarray
    annotation: np.ndarray
    regions: List[SimulatedRegion]
    healthy_patches: List[SimulatedRegion] = field(default_factory=list)
    noise: Optional[NoiseModel] = None

    @property
    def noise_sd_hu(self) -> float:
        return self.noise.sd_hu if self.noise is not None else 0.0

    @property
    def annotated_fraction(self) -> float:
        """Annotated share of the lung voxels."""
        lung = np.count_nonzero(self.lung_mask)
        return float(np.count_nonzero(self.annotation)) / max(lung, 1)


# ------------------------------------------------------------------ fine grids


def _interp_weights(fine_u: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation from samples at 0..n-1 to positions fine_u (in sample
    units, clamped at the ends): lower index, upper index, weight of the upper."""
    u = np.clip(fine_u, 0.0, n - 1.0)
    i0 = np.floor(u).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    return i0, i1, (u - i0).astype(np.float32)


def _apply_separable(f: np.ndarray, weights: Sequence[Tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """Separable linear resampling of a 3D array, one axis after the other (z, y, x):
    two gathers and a blend per axis, O(voxels)."""
    a = f.astype(np.float32, copy=False)
    # Axes that grow least first: the intermediate arrays stay small.
    order = sorted(range(3), key=lambda ax: len(weights[ax][0]) / max(f.shape[ax], 1))
    for ax in order:
        i0, i1, t = weights[ax]
        shape = [1, 1, 1]
        shape[ax] = -1
        tt = t.reshape(shape)
        lo = np.take(a, i0, axis=ax)
        hi = np.take(a, i1, axis=ax)
        lo *= 1.0 - tt
        hi *= tt
        lo += hi
        a = lo
    return a


@dataclass
class _Box:
    """A box of the canonical grid and its fine sub-voxel grid.

    lo, hi: voxel index bounds (hi exclusive) per canonical axis. n: sub-voxels per
    voxel per axis. z, y, x: fine-grid coordinates (mm, canonical: index * spacing),
    shaped for broadcasting.
    """

    lo: np.ndarray
    hi: np.ndarray
    n: Tuple[int, int, int]
    spacing: Tuple[float, float, float]

    def __post_init__(self) -> None:
        self.coords = []
        self.units = []
        for ax in range(3):
            k = np.arange(self.lo[ax], self.hi[ax])
            sub = (np.arange(self.n[ax]) + 0.5) / self.n[ax] - 0.5
            u = (k[:, None] + sub[None, :]).ravel()  # in voxel index units
            self.units.append(u)
            self.coords.append(u * self.spacing[ax])
        self.z = self.coords[0][:, None, None].astype(np.float32)
        self.y = self.coords[1][None, :, None].astype(np.float32)
        self.x = self.coords[2][None, None, :].astype(np.float32)

    @property
    def slices(self) -> Tuple[slice, slice, slice]:
        return tuple(slice(int(a), int(b)) for a, b in zip(self.lo, self.hi))  # type: ignore[return-value]

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(int(b - a) for a, b in zip(self.lo, self.hi))  # type: ignore[return-value]

    @property
    def fine_shape(self) -> Tuple[int, int, int]:
        return tuple(s * n for s, n in zip(self.shape, self.n))  # type: ignore[return-value]

    @property
    def soft_mm(self) -> float:
        """Edge width (mm) for anti-aliased shapes: one fine in-plane step."""
        return float(min(self.spacing[1] / self.n[1], self.spacing[2] / self.n[2]))

    def to_fine(self, native: np.ndarray) -> np.ndarray:
        """Trilinear interpolation of a native box array onto the fine grid."""
        weights = [_interp_weights(self.units[ax] - self.lo[ax], self.shape[ax]) for ax in range(3)]
        return _apply_separable(native, weights)

    def to_native(self, fine: np.ndarray) -> np.ndarray:
        """Mean of each voxel's sub-voxels: the voxel's and the slice's partial volume."""
        (a, b, c), (p, q, r) = self.shape, self.n
        x = fine.astype(np.float32, copy=False).reshape(a, p, b, q, c, r)
        # A few strided adds beat numpy's reduction over short axes.
        out = np.zeros((a, b, c), np.float32)
        for i in range(p):
            for j in range(q):
                for k in range(r):
                    out += x[:, i, :, j, :, k]
        out *= np.float32(1.0 / (p * q * r))
        return out

    def smooth_noise(self, rng: np.random.Generator, scale_mm: float) -> np.ndarray:
        """Smooth Gaussian noise of unit sd on the fine grid, correlation length about
        scale_mm: white noise on a lattice of step scale_mm/2, filtered, then
        interpolated linearly (cheap: separable matrices)."""
        step = scale_mm / 2.0
        mats, lat_shape = [], []
        for ax in range(3):
            c = self.coords[ax]
            n = int(math.ceil((c[-1] - c[0]) / step)) + 5
            origin = c[0] - 2 * step
            lat_shape.append(n)
            mats.append(_interp_weights((c - origin) / step, n))
        lat = ndimage.gaussian_filter(rng.standard_normal(lat_shape), 1.0, mode="wrap")
        lat /= max(float(lat.std()), 1e-6)
        return _apply_separable(lat.astype(np.float32), mats)

    def index_range(self, ax: int, lo_mm: float, hi_mm: float) -> slice:
        c = self.coords[ax]
        return slice(int(np.searchsorted(c, lo_mm, "left")), int(np.searchsorted(c, hi_mm, "right")))


def _ramp(f: np.ndarray, width: float) -> np.ndarray:
    """Soft membership 0..1 from a signed distance f (mm, > 0 inside): 0.5 on the
    border, linear over ``width`` mm."""
    return np.clip(0.5 + f / max(width, 1e-3), 0.0, 1.0).astype(np.float32)


def _sphere_coverage(box: _Box, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Anti-aliased union of spheres on the fine grid (0..1)."""
    out = np.zeros(box.fine_shape, np.float32)
    soft = box.soft_mm
    for c, r in zip(centres, radii):
        reach = r + soft
        sl = tuple(box.index_range(ax, c[ax] - reach, c[ax] + reach) for ax in range(3))
        if any(s.stop <= s.start for s in sl):
            continue
        d = np.sqrt((box.z[sl[0]] - c[0]) ** 2 + (box.y[:, sl[1]] - c[1]) ** 2 + (box.x[:, :, sl[2]] - c[2]) ** 2)
        np.maximum(out[sl], np.clip((r - d) / soft + 0.5, 0.0, 1.0), out=out[sl])
    return out


def _tube_coverage(box: _Box, segments: Sequence[Tuple[np.ndarray, np.ndarray, float, float]]) -> np.ndarray:
    """Anti-aliased union of tapered tubes (p0, p1, r0, r1 in mm) on the fine grid."""
    out = np.zeros(box.fine_shape, np.float32)
    soft = box.soft_mm
    for p0, p1, r0, r1 in segments:
        reach = max(r0, r1) + soft
        lo = np.minimum(p0, p1) - reach
        hi = np.maximum(p0, p1) + reach
        sl = tuple(box.index_range(ax, lo[ax], hi[ax]) for ax in range(3))
        if any(s.stop <= s.start for s in sl):
            continue
        d = (p1 - p0).astype(np.float32)
        l2 = max(float(d @ d), 1e-6)
        rz = box.z[sl[0]] - p0[0]
        ry = box.y[:, sl[1]] - p0[1]
        rx = box.x[:, :, sl[2]] - p0[2]
        t = np.clip((rz * d[0] + ry * d[1] + rx * d[2]) / l2, 0.0, 1.0)
        dist = np.sqrt((rz - t * d[0]) ** 2 + (ry - t * d[1]) ** 2 + (rx - t * d[2]) ** 2)
        radius = r0 + t * (r1 - r0)
        np.maximum(out[sl], np.clip((radius - dist) / soft + 0.5, 0.0, 1.0), out=out[sl])
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-9 else v


def _random_perpendicular(u: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    v -= (v @ u) * u
    return _unit(v)


# ------------------------------------------------------------------ the simulator


class _Case:
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
        """Per axial slice, the lungs' convex hull (see :func:`.regions.slice_hulls`)."""
        return slice_hulls(self.lung, self.sp)

    def _not_chest_wall(self, s: Tuple[slice, slice, slice], step: Tuple[int, int, int] = (1, 1, 1)) -> np.ndarray:
        """Lung or inside the lungs' hull for the box s, sampled every `step` voxels
        (see :func:`.regions.inside_chest_wall`)."""
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

    def _choose_centre(self, radius: float, subpleural_depth: Optional[float], fibrosis: bool,
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

    def _mark_placed(self, centre: np.ndarray, radius: float) -> None:
        self.placed.append((centre, radius))
        d = np.sqrt(((self.c_mm - centre) ** 2).sum(axis=1)) - 0.6 * radius
        np.minimum(self.c_clearance, d.astype(np.float32), out=self.c_clearance)

    # ---- geometry of one region ---------------------------------------------------------
    def _box(self, centre: np.ndarray, half_mm: np.ndarray) -> _Box:
        sp = np.array(self.sp)
        lo = np.maximum(np.floor((centre - half_mm) / sp).astype(int), 0)
        hi = np.minimum(np.ceil((centre + half_mm) / sp).astype(int) + 1, np.array(self.ct.shape))
        return _Box(lo, hi, self.n_fine, self.sp)

    def _fine_distance(self, box: _Box, mask_fn, margin_mm: float, in_plane: bool = False) -> np.ndarray:
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
        weights = [_interp_weights((box.units[ax] - origin[ax] - (step[ax] - 1) / 2.0) / step[ax], d.shape[ax])
                   for ax in range(3)]
        return _apply_separable(d, weights)

    def _draw_shape(self, radius: float, z_radius: float) -> Dict[str, float]:
        """Semi-axes (mm) and in-plane orientation of a region's ellipsoid."""
        aspect = self.rng.uniform(*self.cfg.region_aspect)
        return {"radius": radius, "ru": radius / math.sqrt(aspect), "rv": radius * math.sqrt(aspect),
                "rz": z_radius, "theta": self.rng.uniform(0, math.pi)}

    def _shape_box(self, centre: np.ndarray, shape: Dict[str, float], margin_mm: float) -> _Box:
        """A box that holds the whole region (the noise may push its border out to
        _RHO_MAX times the ellipsoid) plus margin_mm."""
        half_xy = _RHO_MAX * max(shape["ru"], shape["rv"]) + margin_mm
        return self._box(centre, np.array([_RHO_MAX * shape["rz"] + margin_mm, half_xy, half_xy]))

    def _region_field(self, box: _Box, centre: np.ndarray, shape: Dict[str, float],
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
        # Never beyond _RHO_MAX times the ellipsoid: the region stays inside its box.
        f = np.minimum(f, radius * (_RHO_MAX - 0.05 - rho))
        lung_f = box.to_fine((self.sides[box.slices] == side).astype(np.float32)) >= 0.5
        pleura_f = self._fine_distance(box, self._not_chest_wall, 45.0, in_plane=True)
        if band_mm is not None:
            # The band's inner border is irregular too (a few mm).
            f = np.minimum(f, band_mm - pleura_f + 2.0 * box.smooth_noise(rng, 6.0))
        if self.assigned[box.slices].any() or self._assigned_near(box, gap):
            free = self._fine_distance(box, lambda s: ~self.assigned[s], gap + 10.0)
            f = np.minimum(f, free - gap)
        return f.astype(np.float32), lung_f, pleura_f

    def _assigned_near(self, box: _Box, gap: float) -> bool:
        m = np.ceil(gap / np.array(self.sp)).astype(int) + 1
        lo = np.maximum(box.lo - m, 0)
        hi = np.minimum(box.hi + m, np.array(self.ct.shape))
        return bool(self.assigned[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))].any())

    # ---- the patterns ---------------------------------------------------------------------
    def _ggo(self, box: _Box, f, lung_f, params):
        """Ground glass: hazy increase of attenuation with vessels and bronchial walls
        preserved. A fraction of the remaining air is replaced by tissue/fluid, so
        air-filled parenchyma rises towards the target while a vessel (no air)
        keeps its value. All pattern methods take the region field f (mm), the fine
        lung mask, and return fine maps (w, w * p, membership) and fill params."""
        cfg, rng = self.cfg, self.rng
        a = _ramp(f, cfg.ggo_edge_mm) * lung_f
        orig = self.ct[box.slices]
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

    def _micronodules(self, box: _Box, f, lung_f, params):
        """Micronodules: many solid spheres of 1-3 mm, at random (diffuse) or in
        Gaussian clusters (centrilobular), anti-aliased on the fine grid."""
        cfg, rng = self.cfg, self.rng
        a = _ramp(f, cfg.micronodule_edge_mm) * lung_f
        inside = np.flatnonzero(((f > 0) & lung_f).ravel())
        fine_ml = np.prod([s / n for s, n in zip(self.sp, self.n_fine)]) / 1000.0
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
            centres += rng.uniform(-0.5, 0.5, centres.shape) * (np.array(self.sp) / np.array(self.n_fine))
        radii = rng.uniform(*cfg.micronodule_diameter_mm, len(centres)) / 2.0
        cover = _sphere_coverage(box, centres, radii)
        hu = rng.uniform(*cfg.micronodule_hu)
        w = a * cover
        params.update(nodules=int(len(centres)), density_per_ml=round(density, 2), clustered=float(clustered),
                      nodule_hu=round(hu, 1))
        return w, w * np.float32(hu), a

    def _consolidation(self, box: _Box, f, lung_f, centre, side, radius, params):
        """Consolidation: the lung is replaced by near soft-tissue attenuation
        (vessels hidden), with optional air bronchograms (a small tree of air tubes
        entering from the hilar side)."""
        cfg, rng = self.cfg, self.rng
        a = _ramp(f, cfg.consolidation_edge_mm) * lung_f
        level = rng.uniform(*cfg.consolidation_hu)
        texture = rng.uniform(*cfg.consolidation_texture_hu)
        p = level + texture * box.smooth_noise(rng, 3.0)
        bronchogram = bool(rng.uniform() < cfg.air_bronchogram_probability)
        if bronchogram:
            # Air-filled bronchi run from the hilum outwards through the consolidated
            # lung: a small branching tree entering on the region's hilar side.
            hil = self.side_centroid.get(side, centre)
            u = _unit(centre - hil) if np.linalg.norm(centre - hil) > 1 else _unit(rng.standard_normal(3))
            r0 = rng.uniform(*cfg.air_bronchogram_radius_mm)
            segs = []
            stack = [(centre - radius * u, u, r0, rng.uniform(0.6, 0.8) * radius, 0)]
            while stack:
                s, d, r, length, gen = stack.pop()
                d = _unit(d + rng.normal(0, 0.15, 3))
                e = s + d * length
                segs.append((s, e, r, r * 0.85))
                if gen < cfg.air_bronchogram_generations:
                    perp = _random_perpendicular(d, rng)
                    for sign in (1.0, -1.0):
                        ang = math.radians(rng.uniform(20.0, 40.0))
                        nd = math.cos(ang) * d + sign * math.sin(ang) * perp
                        stack.append((e, nd, r * 0.8, length * rng.uniform(0.65, 0.85), gen + 1))
            tubes = _tube_coverage(box, segs)
            p = p * (1.0 - tubes) + np.float32(cfg.air_hu) * tubes
            params.update(bronchogram_radius_mm=round(r0, 2))
        params.update(consolidation_hu=round(level, 1), texture_hu=round(texture, 1),
                      air_bronchograms=float(bronchogram))
        return a, a * p, a

    def _reticulation(self, box: _Box, f, lung_f, params):
        """Reticulation: the walls of an irregular 3D Voronoi foam (thickened septa
        a millimetre thick, cells a few mm wide) plus a mild ground-glass fill."""
        cfg, rng = self.cfg, self.rng
        a = _ramp(f, cfg.reticulation_edge_mm) * lung_f
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
                u = _unit(rng.standard_normal(3) * np.array([0.5, 1.0, 1.0]))
                stack = [(start - 0.5 * rng.uniform(8.0, 20.0) * u, u, r0, rng.uniform(8.0, 20.0), 0)]
                while stack:
                    st, d, r, length, gen = stack.pop()
                    d = _unit(d + rng.normal(0, 0.3, 3))
                    e = st + d * length
                    r_end = r * rng.uniform(0.6, 1.2)
                    lumen_segs.append((st, e, r, r_end))
                    wall_segs.append((st, e, r + wall, r_end + wall))
                    if gen < 2:
                        perp = _random_perpendicular(d, rng)
                        ang = math.radians(rng.uniform(20.0, 45.0))
                        nd = math.cos(ang) * d + rng.choice([-1.0, 1.0]) * math.sin(ang) * perp
                        stack.append((e, nd, max(0.6, r_end * 0.85), length * rng.uniform(0.5, 0.8), gen + 1))
            outer = _tube_coverage(box, wall_segs) * lung_f
            lumen = _tube_coverage(box, lumen_segs) * lung_f
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

    def _honeycombing(self, box: _Box, f, lung_f, pleura_f, free_f, rows, r_mean, wall, params):
        """Honeycombing: air cysts of 3-10 mm packed in 1-3 rows parallel to the
        costal pleura (pleura_f: in-plane depth, mm), sharing walls of 1-2 mm.
        free_f: distance (mm) beyond the gap to other regions. Returns None when no
        cyst fits."""
        cfg, rng = self.cfg, self.rng
        dmin, dmax = (d / 2.0 for d in cfg.honeycomb_cyst_diameter_mm)
        centres: List[np.ndarray] = []
        radii: List[float] = []
        depth = wall
        tol = 0.6 * max(self.sp[1] / self.n_fine[1], 0.5)
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

    # ---- insert one region --------------------------------------------------------------------
    def insert(self, label: int) -> Optional[SimulatedRegion]:
        """Try a few places for a region of this pattern; return its record or None."""
        cfg, rng = self.cfg, self.rng
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
            found = self._choose_centre(radius, band, label in (RETICULATION, HONEYCOMBING), cfg.region_gap_mm)
            if found is None:
                continue
            centre, side = found
            shape = self._draw_shape(radius, z_radius)
            # Honeycomb cysts reach past the blob by up to a cyst and a wall.
            margin = 4.0 + (12.0 if label == HONEYCOMBING else 0.5 * cfg.ggo_edge_mm)
            box = self._shape_box(centre, shape, margin)
            # Honeycombing: the blob only says where cysts may be centred; the band
            # limit lies in the rows, so the blob is cut a little deeper.
            f, lung_f, pleura_f = self._region_field(box, centre, shape,
                                                     None if band is None else band + (0 if label != HONEYCOMBING else 4),
                                                     side, cfg.region_gap_mm)
            side_native = self.sides[box.slices] == side
            free_native = ~self.assigned[box.slices]
            if label == HONEYCOMBING:
                free_f = self._fine_distance(box, lambda s: ~self.assigned[s], cfg.region_gap_mm + 12.0)
                free_f -= cfg.region_gap_mm
                res = self._honeycombing(box, f, lung_f, pleura_f, free_f, rows, r_mean, wall, params)
                if res is None:
                    continue
                w, pw, member = res
            else:
                inside_ml = np.count_nonzero(box.to_native((f > 0) & lung_f) >= 0.5) * self.voxel_ml
                if inside_ml < cfg.min_region_ml:
                    continue
                if label == GGO:
                    w, pw, member = self._ggo(box, f, lung_f, params)
                elif label == MICRONODULES:
                    w, pw, member = self._micronodules(box, f, lung_f, params)
                elif label == CONSOLIDATION:
                    w, pw, member = self._consolidation(box, f, lung_f, centre, side, radius, params)
                else:
                    w, pw, member = self._reticulation(box, f, lung_f, params)
            region = (box.to_native(member >= 0.5) >= 0.5) & side_native & free_native
            volume = np.count_nonzero(region) * self.voxel_ml
            if volume < cfg.min_region_ml:
                continue
            self._apply(box, w, pw)
            self.truth[box.slices][region] = label
            self.assigned[box.slices] |= region
            self._mark_placed(centre, radius)
            annotated = bool(rng.uniform() < cfg.annotate_probability)
            annotated_ml = 0.0
            if annotated:
                core = region & (self._inplane_depth(region) > cfg.annotation_margin_mm)
                self.annotation[box.slices][core] = label
                annotated_ml = np.count_nonzero(core) * self.voxel_ml
                annotated = annotated_ml > 0
            return self._record(label, box, region, subpleural, annotated, annotated_ml, params)
        return None

    def insert_healthy_patch(self, bias: str = "") -> Optional[SimulatedRegion]:
        """An annotated patch of unchanged lung, with its vessels, airways and
        fissures, away from every pattern region; ``bias`` "medial" or "basal"
        prefers the hila or the bases and dependent lung (see SimulationConfig).
        Masses and lung already dense on this CT are left out of it."""
        cfg, rng = self.cfg, self.rng
        if not hasattr(self, "_c_dense"):
            sl = tuple(slice(None, None, s) for s in self.cstep)
            csp = [s * f for s, f in zip(self.sp, self.cstep)]
            dense = self._dense_parenchyma(np.asarray(self.ct[sl], np.float32), csp)
            self._c_dense = dense[tuple(self.c_idx.T)]
        for _attempt in range(6):
            radius = rng.uniform(*cfg.healthy_patch_radius_mm)
            z_radius = radius * rng.uniform(*cfg.region_z_factor)
            found = self._choose_centre(radius, None, False, cfg.healthy_gap_mm, avoid=~self._c_dense, bias=bias)
            if found is None:
                return None
            centre, side = found
            shape = self._draw_shape(radius, z_radius)
            box = self._shape_box(centre, shape, 3.0)
            f, lung_f, _ = self._region_field(box, centre, shape, None, side, cfg.healthy_gap_mm)
            region = (box.to_native((f > 0) & lung_f) >= 0.5) & (self.sides[box.slices] == side)
            region &= ~self.assigned[box.slices]
            region &= ~self._dense_parenchyma(np.asarray(self.ct[box.slices], np.float32), self.sp)
            region &= ~self._mass(box)
            core = region & (self._inplane_depth(region) > cfg.annotation_margin_mm)
            if np.count_nonzero(core) * self.voxel_ml < 0.5 * cfg.min_region_ml:
                continue
            self.annotation[box.slices][core] = HEALTHY
            self.assigned[box.slices] |= region
            self._mark_placed(centre, radius)
            ml = np.count_nonzero(core) * self.voxel_ml
            return self._record(HEALTHY, box, core, False, True, ml,
                                {"radius_mm": round(radius, 1), "hard": {"": 0.0, "medial": 1.0, "basal": 2.0}[bias]})
        return None

    #: Parenchymal density is judged on the 20th percentile of the HU over a square
    #: of this side (mm) in the axial plane: a vessel or bronchial wall up to about a
    #: third of it wide does not move that percentile; ground glass of its own
    #: (the RICORD case's COVID-19) or atelectasis does.
    _PARENCHYMA_WINDOW_MM = 15.0

    def _dense_parenchyma(self, hu: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """Lung whose parenchyma (not its vessels) is denser than ``healthy_max_hu``:
        disease the input CT already holds, never annotated healthy."""
        size = [1] + [max(1, int(round(self._PARENCHYMA_WINDOW_MM / s))) | 1 for s in spacing[1:]]
        return ndimage.percentile_filter(hu, 20, size=size, mode="nearest") > self.cfg.healthy_max_hu

    def _mass(self, box: _Box) -> np.ndarray:
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

    def _inplane_depth(self, region: np.ndarray) -> np.ndarray:
        """Distance (mm) to the region's border within each axial slice."""
        out = np.zeros(region.shape, np.float32)
        for z in range(region.shape[0]):
            if region[z].any():
                out[z] = ndimage.distance_transform_edt(np.pad(region[z], 1), sampling=self.sp[1:])[1:-1, 1:-1]
        return out

    def _apply(self, box: _Box, w: np.ndarray, pw: np.ndarray) -> None:
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

    def _record(self, label, box: _Box, region, subpleural, annotated, annotated_ml, params) -> SimulatedRegion:
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


def _stochastic_round(x: float, rng: np.random.Generator) -> int:
    """floor(x) or ceil(x), with the expectation x (keeps classes balanced on average)."""
    return int(math.floor(x + rng.uniform()))


def _canonical_to_lps(view: CanonicalView, geometry: Geometry, shape_kji: Tuple[int, int, int]):
    """Function mapping a canonical (slice, row, column) index to an LPS point (mm)."""
    def f(c: np.ndarray) -> np.ndarray:
        kji = np.zeros(3)
        for ax in range(3):
            a = view.axes[ax]
            v = c[ax]
            if view.flips[ax]:
                v = shape_kji[a] - 1 - v
            kji[a] = v
        ijk = kji[::-1] * np.asarray(geometry.spacing)
        return np.asarray(geometry.origin) + geometry.direction_matrix @ ijk
    return f


def simulate_case(hu: np.ndarray, geometry: Geometry, lung_mask: Optional[np.ndarray] = None, seed: int = 0,
                  config: SimulationConfig = SimulationConfig()) -> SimulatedCase:
    """Insert simulated ILD patterns into a CT.

    hu: CT in HU, K, J, I (a 2D J, I slice is one axial slice); not modified.
    geometry: its spacing (mm per I, J, K), origin and direction (LPS).
    lung_mask: optional K, J, I mask on the same grid (0 outside; 1 right and 2 left
    lung, or any non-zero value, then split into right and left); computed with
    :func:`~ILDSegmentationLib.imaging.lungmask.compute_lung_mask` when None.
    seed: the same seed (and inputs) always gives the same case.
    Returns a :class:`SimulatedCase`, every array K, J, I like hu.
    """
    rng = np.random.default_rng(seed)
    original_shape = np.shape(hu)
    volume = as_volume(np.asarray(hu))
    view = canonical_view(geometry)
    spacing = view.canonical_spacing(geometry)
    if lung_mask is None:
        from ..imaging.lungmask import compute_lung_mask
        mask = as_volume(compute_lung_mask(volume, geometry))
    else:
        mask = as_volume(np.asarray(lung_mask))
        if mask.shape != volume.shape:
            raise InputError(f"lung mask shape {mask.shape} differs from the CT's {volume.shape}")
    ct = view.to_canonical(volume)
    mask_c = view.to_canonical(mask)
    values = np.unique(mask_c)
    if values.size == 1 and values[0] == 0:
        raise LungMaskError("the lung mask is empty: no lung to insert patterns into")
    if set(values.tolist()) <= {0, 1, 2} and 2 in values:
        sides = np.ascontiguousarray(mask_c, dtype=np.uint8)
    else:
        sides = split_left_right(mask_c != 0)

    case = _Case(ct, sides, spacing, config, rng, _canonical_to_lps(view, geometry, volume.shape))

    counts = {}
    for k, label in enumerate(PATTERNS):
        n = _stochastic_round(config.regions_per_litre[k] * case.lung_litres, rng)
        counts[label] = int(np.clip(n, config.min_regions_per_pattern, config.max_regions_per_pattern))
    regions: List[SimulatedRegion] = []
    # Round robin, honeycombing and reticulation first (they need the subpleural
    # space): when the lung is small, every pattern still gets its first region.
    order = (HONEYCOMBING, RETICULATION, CONSOLIDATION, GGO, MICRONODULES)
    for round_ in range(max(counts.values())):
        for label in order:
            if round_ < counts[label]:
                r = case.insert(label)
                if r is not None:
                    regions.append(r)
    patches: List[SimulatedRegion] = []
    n_patches = max(1, _stochastic_round(config.healthy_patches_per_litre * case.lung_litres, rng))
    for i in range(n_patches):
        hard = rng.uniform() < config.healthy_hard_fraction
        r = case.insert_healthy_patch(("medial", "basal")[i % 2] if hard else "")
        if r is not None:
            patches.append(r)

    def back(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(view.from_canonical(a)).reshape(original_shape)

    return SimulatedCase(hu=back(case.out), lung_mask=back(sides), truth=back(case.truth),
                         annotation=back(case.annotation), regions=regions, healthy_patches=patches,
                         noise=case.noise)

"""What the simulator is told: the labels it writes and every parameter it draws from.

Units are in the names; ``docs/simulator.md`` gives the radiological reasoning for
each parameter. Per-pattern tuples are in the order of :data:`PATTERNS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

HEALTHY = 1
GGO = 2
MICRONODULES = 3
CONSOLIDATION = 4
RETICULATION = 5
HONEYCOMBING = 6
#: The five patterns, in the order of every per-pattern tuple of the config.
PATTERNS: Tuple[int, ...] = (GGO, MICRONODULES, CONSOLIDATION, RETICULATION, HONEYCOMBING)

#: What ``ildseg simulate --followup`` makes (:func:`~.followup.followup_pair`): the
#: same disease moved, or fibrosis added and then moved.
FOLLOWUP_KINDS = ("moved", "progressed")
#: The follow-up's motion by default (``ildseg simulate --followup``, and
#: :func:`~.followup.motion`'s): rotations about the LPS x, y, z axes (degrees) and a
#: shift along them (mm) of the size a repositioned patient shows; a slightly shallower
#: breath (the lung 3 % smaller along each axis, about 9 % in volume); the slices cut
#: half a slice apart.
DEFAULT_DEGREES: Tuple[float, float, float] = (2.0, 1.0, 3.0)
DEFAULT_SHIFT_MM: Tuple[float, float, float] = (3.0, -2.0, 4.0)
DEFAULT_INSPIRATION = 0.97
DEFAULT_SLICE_PHASE = 0.5


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
RHO_MAX = 1.25
#: Pixel size (mm) on which distance maps are computed before interpolation.
DISTANCE_STEP_MM = 1.3

#: Fraction of the lung voxels that the default config annotates (measured 6-11 %
#: over 10 seeds on the two real CTs of the tests; the tests accept this range).
ANNOTATED_FRACTION_RANGE = (0.03, 0.30)

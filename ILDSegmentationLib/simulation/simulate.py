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

import math
from typing import List, Optional, Tuple

import numpy as np

from ..errors import InputError, LungMaskError
from ..imaging.geometry import CanonicalView, Geometry, as_volume, canonical_view
from ..imaging.lungsides import split_left_right
from .case import Case
from .config import CONSOLIDATION, GGO, HONEYCOMBING, MICRONODULES, PATTERNS, RETICULATION, SimulationConfig
from .insertion import insert, insert_healthy_patch
from .results import SimulatedCase, SimulatedRegion


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

    case = Case(ct, sides, spacing, config, rng, _canonical_to_lps(view, geometry, volume.shape))

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
                r = insert(case, label)
                if r is not None:
                    regions.append(r)
    patches: List[SimulatedRegion] = []
    n_patches = max(1, _stochastic_round(config.healthy_patches_per_litre * case.lung_litres, rng))
    for i in range(n_patches):
        hard = rng.uniform() < config.healthy_hard_fraction
        r = insert_healthy_patch(case, ("medial", "basal")[i % 2] if hard else "")
        if r is not None:
            patches.append(r)

    def back(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(view.from_canonical(a)).reshape(original_shape)

    return SimulatedCase(hu=back(case.out), lung_mask=back(sides), truth=back(case.truth),
                         annotation=back(case.annotation), regions=regions, healthy_patches=patches,
                         noise=case.noise)

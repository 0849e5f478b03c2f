"""Follow-up scans with a known answer, made from one real CT, to check ``ildseg
compare`` against a truth.

* :func:`moved_scan`: the same patient scanned again: the CT (and its labels) moved by
  a rigid motion (degrees, mm), optionally breathed in or out (a scaling about the
  lung's centre, a stand-in for a different inspiration: lung attenuation is not
  changed), cut at another slice phase (the grid shifted by a fraction of a slice),
  and resampled. Nothing changed in the disease: a comparison should report no change
  beyond its minimum detectable change.
* :func:`progressed_followup`: a baseline with simulated ILD (:func:`~ILDSegmentationLib.simulate.simulate_case`)
  and a follow-up in which more fibrosis was added to the same CT
  (new reticulation and honeycombing regions inserted into the baseline's CT),
  then moved as above. The truth labels of both give the true change.

Images are SimpleITK images (HU, LPS geometry); label arrays K, J, I.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..imaging.geometry import Geometry
from .config import HONEYCOMBING, RETICULATION, SimulationConfig
from .simulate import simulate_case

FIBROTIC = (RETICULATION, HONEYCOMBING)

#: What the progression adds: fibrosis only (reticulation, honeycombing), about 3
#: regions of each per litre of lung, none of the other patterns.
PROGRESSION_CONFIG = SimulationConfig(regions_per_litre=(0.0, 0.0, 0.0, 3.0, 3.0), min_regions_per_pattern=0,
                                      healthy_patches_per_litre=0.0)


def motion(image: sitk.Image, degrees: Sequence[float] = (2.0, 1.0, 3.0), shift_mm: Sequence[float] = (3.0, -2.0, 4.0),
           scale: Sequence[float] = (1.0, 1.0, 1.0)) -> sitk.Transform:
    """A rigid motion (rotations about x, y, z in degrees, then a shift in mm) with an
    optional scaling (per LPS axis; below 1 = the lung smaller, as at a shallower
    breath), about the centre of ``image``. The transform maps points of the new scan
    to points of the old one (what :func:`moved_scan` resamples with)."""
    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in image.GetSize()])
    t = sitk.Euler3DTransform()
    t.SetCenter(centre)
    t.SetRotation(*[float(np.deg2rad(d)) for d in degrees])
    t.SetTranslation([float(s) for s in shift_mm])
    a = sitk.AffineTransform(3)
    a.SetCenter(centre)
    a.SetMatrix(list((np.asarray(t.GetMatrix()).reshape(3, 3) @ np.diag(1.0 / np.asarray(scale, float))).ravel()))
    a.SetTranslation(t.GetTranslation())
    return a


def shifted_grid(reference: sitk.Image, phase_slices: float = 0.0, first: int = 0, count: Optional[int] = None) -> sitk.Image:
    """An empty image on ``reference``'s grid, its slices ``first`` .. ``first + count``
    (K axis), moved by ``phase_slices`` of a slice along K: the grid of a scan of
    the same patient cut at another slice phase."""
    size = list(reference.GetSize())
    count = size[2] - first if count is None else count
    origin = reference.TransformContinuousIndexToPhysicalPoint([0.0, 0.0, first + float(phase_slices)])
    out = sitk.Image([size[0], size[1], count], sitk.sitkUInt8)
    out.SetSpacing(reference.GetSpacing())
    out.SetDirection(reference.GetDirection())
    out.SetOrigin(origin)
    return out


def moved_scan(ct: sitk.Image, grid: sitk.Image, transform: sitk.Transform,
               labels: Optional[np.ndarray] = None, fill_hu: float = -1000.0):
    """``ct`` (and its K, J, I ``labels``, on its grid) seen through ``transform`` on
    ``grid``: linear for the CT (int16 HU, as a scanner writes it), nearest neighbour
    for the labels. Returns (CT image, labels array or None)."""
    moved = sitk.Resample(sitk.Cast(ct, sitk.sitkFloat32), grid, transform, sitk.sitkLinear, fill_hu)
    moved = sitk.Cast(sitk.Round(moved), sitk.sitkInt16)
    moved_labels = None
    if labels is not None:
        lab = sitk.GetImageFromArray(np.asarray(labels, np.uint8))
        lab.CopyInformation(ct)
        moved_labels = sitk.GetArrayFromImage(sitk.Resample(lab, grid, transform, sitk.sitkNearestNeighbor, 0,
                                                            sitk.sitkUInt8))
    return moved, moved_labels


@dataclass
class ProgressedCase:
    """A baseline and a follow-up with known labels. ``baseline_ct``/``followup_ct``:
    SimpleITK images (HU); ``*_truth``: K, J, I label maps (0 outside the lung, 1..6)
    on each scan's grid; ``baseline_lung``: the baseline's lung mask (1 right, 2 left).
    ``true_fibrotic_change_pp``: the fibrotic extent (reticulation + honeycombing, percent
    of the lung) of the follow-up's truth minus the baseline's, both on the baseline grid
    before the motion: the answer a comparison should find."""

    baseline_ct: sitk.Image
    baseline_truth: np.ndarray
    baseline_lung: np.ndarray
    followup_ct: sitk.Image
    followup_truth: np.ndarray
    true_fibrotic_change_pp: float


def progressed_followup(ct: sitk.Image, lung_mask: Optional[np.ndarray] = None, *, seed: int = 0,
                        baseline_config: Optional[SimulationConfig] = None,
                        progression: SimulationConfig = PROGRESSION_CONFIG,
                        transform: Optional[sitk.Transform] = None, grid: Optional[sitk.Image] = None) -> ProgressedCase:
    """A baseline with simulated ILD made from ``ct`` (seed ``seed``), and a follow-up
    with more fibrosis added (seed ``seed + 1``; regions of ``progression`` inserted
    into the baseline's CT, kept apart from nothing: where a new region lies on an old
    one, the new label wins), seen through ``transform`` (default: none) on ``grid``
    (default: the CT's own). The baseline's lung mask is computed when not given."""
    hu = sitk.GetArrayFromImage(ct)
    geometry = Geometry.from_sitk(ct)
    base = simulate_case(hu, geometry, lung_mask=lung_mask, seed=seed,
                         config=baseline_config or SimulationConfig())
    more = simulate_case(base.hu, geometry, lung_mask=base.lung_mask, seed=seed + 1, config=progression)
    added = np.isin(more.truth, (RETICULATION, HONEYCOMBING))
    follow_truth = np.where(added, more.truth, base.truth).astype(np.uint8)
    base_img = sitk.GetImageFromArray(base.hu)
    base_img.CopyInformation(ct)
    follow_img = sitk.GetImageFromArray(more.hu)
    follow_img.CopyInformation(ct)
    moved, moved_truth = moved_scan(follow_img, grid if grid is not None else ct,
                                    transform if transform is not None else sitk.Transform(), follow_truth)
    lung = max(int(np.count_nonzero(base.truth)), 1)
    change = 100.0 * (np.count_nonzero(np.isin(follow_truth, FIBROTIC))
                      - np.count_nonzero(np.isin(base.truth, FIBROTIC))) / lung
    return ProgressedCase(base_img, base.truth, base.lung_mask, moved, moved_truth, float(change))



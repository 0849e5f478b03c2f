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
* :func:`followup_pair` and :func:`truth_record`: either kind with everything a user
  needs to check ``ildseg compare`` against the truth (``ildseg simulate --followup``).

Images are SimpleITK images (HU, LPS geometry); label arrays K, J, I.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..analysis.report import class_volumes
from ..classes import CLASSES
from ..imaging.geometry import Geometry
from .config import (DEFAULT_DEGREES, DEFAULT_INSPIRATION, DEFAULT_SHIFT_MM, DEFAULT_SLICE_PHASE,
                     FOLLOWUP_KINDS, HONEYCOMBING, RETICULATION, SimulationConfig)
from .simulate import simulate_case

FIBROTIC = (RETICULATION, HONEYCOMBING)

#: What the progression adds: fibrosis only (reticulation, honeycombing), about 3
#: regions of each per litre of lung, none of the other patterns.
PROGRESSION_CONFIG = SimulationConfig(regions_per_litre=(0.0, 0.0, 0.0, 3.0, 3.0), min_regions_per_pattern=0,
                                      healthy_patches_per_litre=0.0)


def motion(image: sitk.Image, degrees: Sequence[float] = DEFAULT_DEGREES, shift_mm: Sequence[float] = DEFAULT_SHIFT_MM,
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
    return moved, None if labels is None else moved_labels(labels, ct, grid, transform)


def moved_labels(labels: np.ndarray, reference: sitk.Image, grid: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """K, J, I ``labels`` on ``reference``'s grid seen through ``transform`` on ``grid``
    (nearest neighbour, 0 where the grid sees outside ``reference``)."""
    lab = sitk.GetImageFromArray(np.asarray(labels, np.uint8))
    lab.CopyInformation(reference)
    return sitk.GetArrayFromImage(sitk.Resample(lab, grid, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))


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
    geometry = Geometry.from_sitk(ct)
    base = simulate_case(sitk.GetArrayFromImage(ct), geometry, lung_mask=lung_mask, seed=seed,
                         config=baseline_config or SimulationConfig())
    follow_hu, follow_truth = _progress(base, geometry, seed + 1, progression)
    base_img = sitk.GetImageFromArray(base.hu)
    base_img.CopyInformation(ct)
    follow_img = sitk.GetImageFromArray(follow_hu)
    follow_img.CopyInformation(ct)
    moved, moved_truth = moved_scan(follow_img, grid if grid is not None else ct,
                                    transform if transform is not None else sitk.Transform(), follow_truth)
    lung = max(int(np.count_nonzero(base.truth)), 1)
    change = 100.0 * (np.count_nonzero(np.isin(follow_truth, FIBROTIC))
                      - np.count_nonzero(np.isin(base.truth, FIBROTIC))) / lung
    return ProgressedCase(base_img, base.truth, base.lung_mask, moved, moved_truth, float(change))




def _progress(base: Any, geometry: Geometry, seed: int, progression: SimulationConfig) -> Tuple[np.ndarray, np.ndarray]:
    """The baseline case ``base`` (a :class:`~.results.SimulatedCase`) with fibrosis
    added (regions of ``progression``, seed ``seed``): the follow-up's HU and truth,
    both on the baseline grid. A new fibrotic region wins over the label beneath it."""
    more = simulate_case(base.hu, geometry, lung_mask=base.lung_mask, seed=seed, config=progression)
    added = np.isin(more.truth, FIBROTIC)
    return more.hu, np.where(added, more.truth, base.truth).astype(np.uint8)


# ------------------------------------------------------------------ ildseg simulate --followup



@dataclass
class FollowupPair:
    """A baseline and a follow-up made from one CT, with their truth.

    ``baseline_ct``/``followup_ct``: SimpleITK images (int16 HU); every array is K, J, I:
    ``*_truth`` the label maps (0 outside the lung, 1..6) and ``*_lung`` the lung masks
    (1 right, 2 left) on each scan's own grid; ``followup_truth_on_baseline``: the
    follow-up's truth before the motion, on the baseline grid (equal to
    ``baseline_truth`` for ``moved``: the disease did not change). ``motion``: what was
    used (:func:`followup_pair`'s arguments)."""

    kind: str
    baseline_ct: sitk.Image
    baseline_truth: np.ndarray
    baseline_lung: np.ndarray
    followup_ct: sitk.Image
    followup_truth: np.ndarray
    followup_lung: np.ndarray
    followup_truth_on_baseline: np.ndarray
    motion: Dict[str, Any]


def followup_pair(ct: sitk.Image, kind: str, lung_mask: Optional[np.ndarray] = None, *, seed: int = 0,
                  degrees: Sequence[float] = DEFAULT_DEGREES, shift_mm: Sequence[float] = DEFAULT_SHIFT_MM,
                  inspiration: float = DEFAULT_INSPIRATION, slice_phase: float = DEFAULT_SLICE_PHASE,
                  baseline_config: Optional[SimulationConfig] = None,
                  progression: SimulationConfig = PROGRESSION_CONFIG) -> FollowupPair:
    """A baseline with simulated ILD made from ``ct`` (HU; seed ``seed``) and its
    follow-up: ``moved``, the same disease; ``progressed``, fibrosis added (seed
    ``seed + 1``, as :func:`progressed_followup`). The follow-up is then moved
    (:func:`motion` with ``degrees``, ``shift_mm`` and the scale ``inspiration`` on
    every axis, about the CT's centre) and cut ``slice_phase`` of a slice further along
    K (:func:`shifted_grid`, as many slices as the CT). ``lung_mask``: K, J, I, on
    ``ct``'s grid; computed when None."""
    if kind not in FOLLOWUP_KINDS:
        raise ValueError(f"kind must be one of {FOLLOWUP_KINDS}, not {kind!r}")
    geometry = Geometry.from_sitk(ct)
    base = simulate_case(sitk.GetArrayFromImage(ct), geometry, lung_mask=lung_mask, seed=seed,
                         config=baseline_config or SimulationConfig())
    if kind == "progressed":
        follow_hu, follow_truth = _progress(base, geometry, seed + 1, progression)
    else:
        follow_hu, follow_truth = base.hu, base.truth
    base_img = sitk.GetImageFromArray(base.hu)
    base_img.CopyInformation(ct)
    follow_img = sitk.GetImageFromArray(follow_hu)
    follow_img.CopyInformation(ct)
    transform = motion(ct, degrees, shift_mm, (inspiration,) * 3)
    grid = shifted_grid(ct, slice_phase)
    moved, truth = moved_scan(follow_img, grid, transform, follow_truth)
    lung = moved_labels(base.lung_mask, ct, grid, transform)
    used = {"degrees": [float(d) for d in degrees], "shift_mm": [float(s) for s in shift_mm],
            "inspiration_scale": float(inspiration), "slice_phase": float(slice_phase)}
    return FollowupPair(kind, base_img, np.asarray(base.truth, np.uint8), np.asarray(base.lung_mask, np.uint8),
                        moved, truth, lung, np.asarray(follow_truth, np.uint8), used)


def extent(labels: np.ndarray) -> Dict[str, Any]:
    """Percent of the lung (every non-zero voxel) per class, and the fibrotic extent
    (reticulation + honeycombing), of a K, J, I label map: what ``ildseg compare``
    reports of a scan (:func:`~ILDSegmentationLib.analysis.report.class_volumes`)."""
    volumes = class_volumes(np.asarray(labels), Geometry((1.0, 1.0, 1.0)))  # percentages: the voxel size cancels
    percent = {c["label"]: c["percent_of_lung"] for c in volumes["classes"]}
    return {"classes": percent, "fibrotic": sum(percent[label] for label in FIBROTIC)}


def change_figures(baseline: np.ndarray, followup: np.ndarray) -> Dict[str, Any]:
    """``fibrotic_extent`` (``baseline``, ``followup``, ``change``: percent of the lung
    and percentage points) and per class ``baseline_percent``, ``followup_percent`` and
    ``change_percent_points``, from two label maps (each measured on its own grid)."""
    b, f = extent(baseline), extent(followup)
    return {"fibrotic_extent": {"baseline": round(b["fibrotic"], 4), "followup": round(f["fibrotic"], 4),
                                "change": round(f["fibrotic"] - b["fibrotic"], 4),
                                "unit": "percent of lung; change in percentage points"},
            "classes": [{"label": c.label, "name": c.name, "baseline_percent": b["classes"][c.label],
                         "followup_percent": f["classes"][c.label],
                         "change_percent_points": round(f["classes"][c.label] - b["classes"][c.label], 4)}
                        for c in CLASSES]}


def truth_record(pair: FollowupPair) -> Dict[str, Any]:
    """What ``truth.json`` holds (without the file names): the kind, the motion, the
    true change (both truths on the baseline grid, before the motion: exactly 0 for
    ``moved``) and, under ``on_each_grid``, the same figures of the truth labels as
    written, each on its own scan's grid (what ``ildseg compare`` would report if it
    segmented both scans perfectly: resampling and the lung leaving or entering the
    field of view make it differ a little from the true change)."""
    return {"kind": pair.kind, "motion": {**pair.motion, "about": "the centre of the baseline CT's grid",
                                          "axes": "LPS x, y, z; the follow-up's voxel at p shows the baseline's "
                                                  "anatomy at R(p - c) / inspiration + c + shift"},
            **change_figures(pair.baseline_truth, pair.followup_truth_on_baseline),
            "on_each_grid": change_figures(pair.baseline_truth, pair.followup_truth)}

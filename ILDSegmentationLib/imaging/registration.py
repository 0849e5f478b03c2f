"""Register a follow-up chest CT's lung to the baseline's: affine, then deformable
within the lung, on downsampled images (SimpleITK).

The result maps *baseline* physical points (LPS mm) to *follow-up* points, the ITK
convention (fixed = baseline, moving = follow-up), so that follow-up labels are
brought onto the baseline grid by resampling with it (:func:`warp_labels`).

Stages, all on images binned to about ``grid_mm`` (default 4 mm) voxels, which keeps a
whole chest to about 100^3 voxels and the registration to seconds on one core:

1. **Initial**: the lungs' centres of mass (image moments of the lung masks).
2. **Rigid, then affine**, on the lung masks as soft fractions (the share of each
   binned voxel that is lung), mean squares. The masks, not the CT, drive it: their
   border is sharp, and lung attenuation changes with inspiration. The affine result
   is kept only when it overlaps the baseline lung at least as well as the rigid one.
3. **Deformable** (a B-spline of about ``bspline_mm`` control-point spacing), on the CT
   (HU clipped to [-1000, 0]) within the baseline lung grown by 10 mm, correlation
   metric (insensitive to the global density change of a different inspiration).
   New disease also changes the attenuation; the step is kept only when it does not
   lower the lungs' overlap (:data:`DEFORMABLE_DICE_SLACK`), else the affine result is used.

Quality (:class:`Registration`): the Dice overlap of the two lung masks after the
affine stage and after the deformable one, the ratio of the lung volumes, and the
correlation of the lung's attenuation after registration. Different patients are
told by the affine overlap and by the attenuation correlation (:func:`mismatch`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

#: Two scans are taken for different patients (or for anatomy that does not match: a
#: lung resected, a field of view missing half the lung) and compare refuses them when
#: the lung overlap (Dice) after the affine stage is below MIN_AFFINE_DICE, or the
#: correlation of the lung's attenuation after registration is below
#: MIN_LUNG_CORRELATION. A deformable step can make any two lung outlines overlap; the
#: vessels and fissures inside line up only in the same patient. Measured on 60 mm slabs
#: of three CC BY CTs by bench/compare_mdc.py (BENCHMARKS.md, "Comparing two scans"): the
#: same patient moved, resampled, cut half a slice apart or with another mask border gave
#: affine Dice 0.936-0.997 and correlation 0.880-0.9995 (15 follow-ups); the three
#: different-patient pairs 0.00-0.75 and 0.11-0.40.
MIN_AFFINE_DICE = 0.85
MIN_LUNG_CORRELATION = 0.70
#: Default voxel size (mm) the images are binned to before registering.
DEFAULT_GRID_MM = 4.0
#: Default B-spline control-point spacing (mm) of the deformable stage.
DEFAULT_BSPLINE_MM = 60.0
#: The deformable stage is dropped when it lowers the lung Dice by more than this.
DEFORMABLE_DICE_SLACK = 0.005
#: Share of the binned voxels the deformable stage's metric samples.
DEFORMABLE_SAMPLING = 0.1


@dataclass
class Registration:
    """A follow-up registered to a baseline.

    transform: baseline LPS point (mm) -> follow-up LPS point (mm).
    affine_dice / dice: overlap (0..1) of the baseline lung and the warped follow-up
    lung after the affine stage / after the deformable one (on the binned grid).
    volume_ratio: follow-up lung volume / baseline lung volume (native masks).
    lung_correlation: Pearson correlation of the CTs' HU within the baseline lung after
    registration (binned grid); None when not computed.
    affine_matrix / affine_translation_mm: the affine stage (3x3, LPS) and its shift.
    seconds: wall time of the registration.
    """

    transform: sitk.Transform
    affine_dice: float
    dice: float
    volume_ratio: float
    lung_correlation: Optional[float]
    affine_matrix: Tuple[float, ...]
    affine_translation_mm: Tuple[float, float, float]
    deformable: bool
    grid_mm: float
    seconds: float
    notes: Dict[str, Any] = field(default_factory=dict)

    def summary(self) -> Dict[str, Any]:
        """The JSON-able description that ``change.json`` holds."""
        m = np.asarray(self.affine_matrix).reshape(3, 3)
        return {"lung_dice_affine": round(self.affine_dice, 4), "lung_dice": round(self.dice, 4),
                "lung_volume_ratio": round(self.volume_ratio, 4),
                "lung_correlation": None if self.lung_correlation is None else round(self.lung_correlation, 4),
                "affine_scale": round(float(abs(np.linalg.det(m))), 4),
                "affine_translation_mm": [round(v, 2) for v in self.affine_translation_mm],
                "deformable": self.deformable, "grid_mm": self.grid_mm, "seconds": round(self.seconds, 2),
                "min_affine_dice": MIN_AFFINE_DICE, "min_lung_correlation": MIN_LUNG_CORRELATION, **self.notes}


def mismatch(reg: Registration) -> Optional[str]:
    """Why the two scans look like different patients (one line), or None."""
    reasons = []
    if reg.affine_dice < MIN_AFFINE_DICE:
        reasons.append(f"lung overlap (Dice) {reg.affine_dice:.2f} after affine registration, below {MIN_AFFINE_DICE:.2f}")
    if reg.lung_correlation is None or reg.lung_correlation < MIN_LUNG_CORRELATION:
        value = "undefined" if reg.lung_correlation is None else f"{reg.lung_correlation:.2f}"
        reasons.append(f"lung attenuation correlation {value} after registration, below {MIN_LUNG_CORRELATION:.2f}")
    if not reasons:
        return None
    return "the lungs do not match (" + "; ".join(reasons) + "): different patients, or a scan missing part of the lung?"


def _bin(image: sitk.Image, grid_mm: float) -> sitk.Image:
    """Average ``image`` over blocks of about ``grid_mm`` (never below one voxel)."""
    factors = [max(1, int(round(grid_mm / s))) for s in image.GetSpacing()]
    return sitk.BinShrink(image, factors)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    n = int(a.sum()) + int(b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / n if n else 0.0


def _method(metric: str, fixed_mask: Optional[sitk.Image] = None) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    if metric == "meansquares":
        reg.SetMetricAsMeanSquares()
    else:
        reg.SetMetricAsCorrelation()
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetMetricSamplingStrategy(reg.NONE)
    return reg


def register_lungs(baseline_ct: sitk.Image, baseline_lung: sitk.Image, followup_ct: sitk.Image,
                   followup_lung: sitk.Image, *, grid_mm: float = DEFAULT_GRID_MM, deformable: bool = True,
                   bspline_mm: float = DEFAULT_BSPLINE_MM) -> Registration:
    """Register the follow-up to the baseline (see the module docstring).

    ``*_ct``: CT images (HU); ``*_lung``: lung masks on the same grids (non-zero =
    lung). 3D images. The inputs are not modified."""
    t0 = time.perf_counter()
    f_mask = _bin(sitk.Cast(baseline_lung != 0, sitk.sitkFloat32), grid_mm)
    m_mask = _bin(sitk.Cast(followup_lung != 0, sitk.sitkFloat32), grid_mm)

    init = sitk.CenteredTransformInitializer(f_mask, m_mask, sitk.Euler3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    rigid = sitk.Euler3DTransform(init)
    reg = _method("meansquares")
    # Mean squares of mask fractions has small gradients: only the step size stops it.
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=150,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-12)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
    reg.SetInitialTransform(rigid, inPlace=True)
    reg.Execute(f_mask, m_mask)

    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    reg = _method("meansquares")
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=150,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-12)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(affine, inPlace=True)
    reg.Execute(f_mask, m_mask)

    fixed_np = sitk.GetArrayFromImage(f_mask)
    warped = sitk.GetArrayFromImage(sitk.Resample(m_mask, f_mask, affine, sitk.sitkLinear, 0.0))
    affine_dice = _dice(fixed_np, warped)
    # A lung cut by the field of view (a slab, a scan stopping above the base) leaves the
    # scale along the cut axis unconstrained: the affine stage can then squeeze it (seen:
    # a 60 mm slab of the same CT, cranio-caudal scale 0.37, Dice 0.92). The affine result
    # is kept only when it overlaps at least as well as the rigid one.
    rigid_warped = sitk.GetArrayFromImage(sitk.Resample(m_mask, f_mask, rigid, sitk.sitkLinear, 0.0))
    rigid_dice = _dice(fixed_np, rigid_warped)
    notes: Dict[str, Any] = {"lung_dice_rigid": round(rigid_dice, 4)}
    if affine_dice < rigid_dice:
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetTranslation(rigid.GetTranslation())
        warped, affine_dice = rigid_warped, rigid_dice
        notes["affine_rejected"] = "it lowered the lung overlap; the rigid registration is used"

    transform: sitk.Transform = affine
    f_ct = _bin(sitk.Clamp(sitk.Cast(baseline_ct, sitk.sitkFloat32), sitk.sitkFloat32, -1000.0, 0.0), grid_mm)
    m_ct = _bin(sitk.Clamp(sitk.Cast(followup_ct, sitk.sitkFloat32), sitk.sitkFloat32, -1000.0, 0.0), grid_mm)
    region = sitk.BinaryDilate(sitk.Cast(f_mask > 0.5, sitk.sitkUInt8),
                               [max(1, int(round(10.0 / s))) for s in f_mask.GetSpacing()])
    if deformable:
        size_mm = [sz * sp for sz, sp in zip(f_ct.GetSize(), f_ct.GetSpacing())]
        mesh = [max(1, int(round(s / bspline_mm))) for s in size_mm]
        bspline = sitk.BSplineTransformInitializer(f_ct, mesh)
        reg = _method("correlation", region)
        # A B-spline metric evaluation costs ~64 x 3 weights per sample: a fixed random
        # tenth of the lung's binned voxels keeps it to seconds (seeded: reproducible).
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(DEFORMABLE_SAMPLING, 1)
        reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=25,
                                 maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=50)
        reg.SetMovingInitialTransform(affine)
        reg.SetInitialTransform(bspline, inPlace=True)
        reg.Execute(f_ct, m_ct)
        # A point of the baseline goes through the B-spline, then the affine.
        composite = sitk.CompositeTransform([affine, bspline])
        warped_d = sitk.GetArrayFromImage(sitk.Resample(m_mask, f_mask, composite, sitk.sitkLinear, 0.0))
        deformable_dice = _dice(fixed_np, warped_d)
        notes["deformable_dice"] = round(deformable_dice, 4)
        # New disease changes the attenuation the correlation metric follows and can pull
        # the B-spline off the anatomy; it is kept only when the lungs overlap at least
        # as well as after the affine stage.
        if deformable_dice >= affine_dice - DEFORMABLE_DICE_SLACK:
            transform, warped = composite, warped_d
        else:
            notes["deformable_rejected"] = "it lowered the lung overlap; the affine registration is used"
            deformable = False
    dice = _dice(fixed_np, warped)

    # Attenuation agreement inside the lung: vessels and fissures line up in the same
    # patient; a coarse check, reported, not used to refuse.
    a = sitk.GetArrayFromImage(f_ct)
    b = sitk.GetArrayFromImage(sitk.Resample(m_ct, f_ct, transform, sitk.sitkLinear, 0.0))
    inside = (fixed_np > 0.5) & (warped > 0.5)
    corr = float(np.corrcoef(a[inside], b[inside])[0, 1]) if inside.sum() > 10 else None

    b_ml = float(np.count_nonzero(sitk.GetArrayViewFromImage(baseline_lung))) * float(np.prod(baseline_lung.GetSpacing()))
    f_ml = float(np.count_nonzero(sitk.GetArrayViewFromImage(followup_lung))) * float(np.prod(followup_lung.GetSpacing()))
    return Registration(transform=transform, affine_dice=affine_dice, dice=dice,
                        volume_ratio=f_ml / b_ml if b_ml else float("nan"),
                        lung_correlation=None if corr is None or not np.isfinite(corr) else corr,
                        affine_matrix=tuple(affine.GetMatrix()),
                        affine_translation_mm=tuple(affine.GetTranslation()), deformable=deformable,
                        grid_mm=grid_mm, seconds=time.perf_counter() - t0, notes=notes)


def warp_labels(labels: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """Follow-up labels resampled onto the baseline grid (``reference``) by
    ``transform`` (baseline point -> follow-up point), nearest neighbour, 0 outside."""
    return sitk.Resample(labels, reference, transform, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())


def warp_ct(ct: sitk.Image, reference: sitk.Image, transform: sitk.Transform, fill_hu: float = -1000.0) -> sitk.Image:
    """A follow-up CT resampled onto the baseline grid (linear), for side-by-side views."""
    return sitk.Resample(sitk.Cast(ct, sitk.sitkFloat32), reference, transform, sitk.sitkLinear, fill_hu)


def rigid_motion(center_mm: Sequence[float], degrees: Sequence[float], shift_mm: Sequence[float]) -> sitk.Euler3DTransform:
    """A rigid motion about ``center_mm`` (LPS): rotations (degrees) about x, y, z and a
    shift (mm), as a transform usable with :func:`warp_ct` to make a moved scan
    (resampling the CT through it moves the patient by its inverse)."""
    t = sitk.Euler3DTransform()
    t.SetCenter([float(c) for c in center_mm])
    t.SetRotation(*[float(np.deg2rad(d)) for d in degrees])
    t.SetTranslation([float(s) for s in shift_mm])
    return t

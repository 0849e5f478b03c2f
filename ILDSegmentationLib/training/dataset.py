"""Training samples: per-lung crops of annotated axial slices.

The crops come from :func:`ILDSegmentationLib.engine.cropping.crop_boxes` on the output of
:func:`~ILDSegmentationLib.engine.cropping.split_left_right`, the very functions the
inference engine uses, so the network is trained on the crops it will see. Only
slices with annotations are used (paper, IV-A). Each crop carries:

- ``image``: float32 (h, w), the model's intensity handling applied;
- ``target``: int64 (h, w), class index 0..5 where annotated, -1 where not;
- ``lung``: bool (h, w), inside the lung (unannotated lung pixels feed the
  entropy term; pixels outside the lung feed nothing).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..classes import NUM_CLASSES
from ..engine.cropping import crop_boxes
from ..imaging.lungsides import split_left_right
from ..errors import ILDSegError, InputError
from ..imaging.geometry import as_volume, canonical_view
from ..engine.preprocessing import Intensity
from .manifest import Case

log = logging.getLogger(__name__)


@dataclass
class Crop:
    case_id: str
    slice_index: int
    side: int
    image: np.ndarray
    target: np.ndarray
    lung: np.ndarray
    pixel_spacing_mm: Optional[Tuple[float, float]] = None  # (row, column) of the slice
    #: Distance (mm) between neighbouring slices of the scan (canonical z): with
    #: ``slice_index`` it places the slice along the body axis (finetune's slab hold-out).
    slice_spacing_mm: Optional[float] = None


def crops_from_arrays(case_id: str, hu: np.ndarray, lung_mask: np.ndarray, annotation: np.ndarray, geometry,
                      intensity: Intensity) -> List[Crop]:
    """All per-lung crops of the annotated slices of one case (arrays K,J,I)."""
    view = canonical_view(geometry)
    hu_c = view.to_canonical(hu)
    ann_c = view.to_canonical(annotation)
    sides = split_left_right(view.to_canonical(lung_mask))
    spacing = tuple(view.canonical_spacing(geometry)[1:])
    slice_spacing = float(view.canonical_spacing(geometry)[0])
    crops: List[Crop] = []
    annotated = np.flatnonzero(ann_c.reshape(ann_c.shape[0], -1).any(axis=1))
    for z in annotated:
        for b in crop_boxes(sides[z], int(z)):
            window = (z, slice(b.r0, b.r1), slice(b.c0, b.c1))
            lung = sides[window] > 0
            ann = ann_c[window]
            if not (ann[lung] > 0).any():
                continue  # this lung has no annotation on this slice
            target = np.where(lung & (ann > 0), ann.astype(np.int64) - 1, -1)
            crops.append(Crop(case_id, int(z), b.side, intensity.apply(hu_c[window]), target, lung, spacing,
                              slice_spacing))
    return crops


def read_case(case: Case):
    """(CT Volume, lung mask, annotation) of a manifest case, all on the CT's grid
    (K, J, I); every error names the case and its manifest line."""
    # File reading (SimpleITK) is imported here: training on crops already in memory
    # (a GPU machine fed prepared crops) needs none of it.
    from ..imaging.io import check_ct_plausible, read_ct, read_lung_mask
    from .annotations import read_annotation
    where = case.where()
    try:
        ct = read_ct(case.ct)
        # A label map or raw values given as the CT would train (or score) on nonsense.
        check_ct_plausible(ct, case.ct)
        if case.lung_mask is None:
            from ..imaging.lungmask import compute_lung_mask
            mask = compute_lung_mask(ct.array, ct.geometry)
        else:
            mask = read_lung_mask(case.lung_mask, ct)
        annotation = read_annotation(case.annotation, ct.geometry, as_volume(ct.array).shape, where)
    except InputError as e:
        msg = str(e)
        raise type(e)(msg if msg.startswith("case '") else f"{where}: {msg}") from None
    except ILDSegError as e:  # LungMaskError and friends: still name the case
        raise InputError(f"{where}: {e}") from None
    return ct, mask, annotation


def load_case_crops(case: Case, intensity: Intensity) -> List[Crop]:
    """Read one manifest case and cut its crops; errors name the case and line."""
    ct, mask, annotation = read_case(case)
    hu = as_volume(np.asarray(ct.array))
    crops = crops_from_arrays(case.case_id, hu, as_volume(mask), annotation, ct.geometry, intensity)
    if not crops:
        raise InputError(f"{case.where()}: no annotated voxel lies inside the lung mask (no annotated slice to train on)")
    return crops


def class_pixel_counts(crops: Sequence[Crop]) -> np.ndarray:
    counts = np.zeros(NUM_CLASSES, np.int64)
    for c in crops:
        t = c.target[c.target >= 0]
        counts += np.bincount(t, minlength=NUM_CLASSES)
    return counts


# The eight flips/rotations of the square (dihedral group D4): k quarter turns,
# optionally after a transpose. Applied identically to image, target and lung.
def dihedral(array: np.ndarray, k: int) -> np.ndarray:
    """k in 0..7: rotate by (k % 4) quarter turns, transposed first when k >= 4."""
    if not 0 <= k < 8:
        raise ValueError("augmentation index must be in 0..7")
    a = array.T if k >= 4 else array
    return np.ascontiguousarray(np.rot90(a, k % 4))

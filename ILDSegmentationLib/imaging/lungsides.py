"""The two lungs of a lung mask: which voxels are the right lung, which the left.

:func:`split_left_right` labels a mask 1 (patient's right lung) and 2 (left). The
engine crops each lung on its own (:mod:`..engine.cropping`), the regions are counted
per lung (:mod:`..analysis.regions`), and the automatic lung mask
(:mod:`.lungmask`) separates the lungs with it.

All arrays here are in the canonical view of :mod:`.geometry`: (axial slice, row
anterior->posterior, column patient right->left).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
from scipy import ndimage

RIGHT_LUNG = 1
LEFT_LUNG = 2

# A component that has at least this share of its voxels on one side of the midline
# belongs to that side whole (a lung may bulge a little across the midline).
_WHOLE_COMPONENT_SHARE = 0.9
# The mask holds two lungs when its midline column is at most this share as full as
# the fullest column on its emptier side (see _midline_column). Between two lungs
# the share is 0, or a few percent where they touch at the anterior junction; across
# a single lung (after a pneumonectomy, or a user's mask of one lung) it is near 1.
_VALLEY_SHARE = 0.5


def _midline_column(lung: np.ndarray) -> Tuple[int, float]:
    """The column that separates the lungs and how clearly it does.

    Works on the mask's column occupancy (voxels per column, over slices and rows).
    Each column is scored by its occupancy over the lesser of the fullest column on
    its left and on its right: near 0 in the mediastinum between two lungs (0 where
    they do not touch), however small one of them is; near 1 or above on the flank of
    a single lung, whose occupancy rises towards its middle. Returns the
    lowest-scoring column and its score; of tied columns (all of a gap between lungs
    scores 0, and so does a gap beside a small separate piece of lung), the one
    nearest the occupancy's median, which splits the mask most evenly."""
    occupancy = lung.sum(axis=(0, 1)).astype(np.float64)
    cumulative = np.cumsum(occupancy)
    fullest_left = np.concatenate([[0.0], np.maximum.accumulate(occupancy)[:-1]])
    fullest_right = np.concatenate([np.maximum.accumulate(occupancy[::-1])[::-1][1:], [0.0]])
    lesser = np.minimum(fullest_left, fullest_right)
    score = np.divide(occupancy, lesser, out=np.full(lesser.shape, np.inf), where=lesser > 0)
    if not np.isfinite(score).any():  # a mask one or two columns wide
        return 1, float("inf")
    tied = np.flatnonzero(score == score.min())
    runs = np.split(tied, np.flatnonzero(np.diff(tied) > 1) + 1)
    median = int(np.searchsorted(cumulative, 0.5 * cumulative[-1]))
    run = min(runs, key=lambda r: max(r[0] - median, median - r[-1], 0))
    return int(run[len(run) // 2]), float(score.min())


def _bounding_box(lung: np.ndarray) -> Tuple[slice, ...]:
    box = []
    for axis in range(lung.ndim):
        other = tuple(a for a in range(lung.ndim) if a != axis)
        idx = np.flatnonzero(lung.any(axis=other))
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def split_left_right(mask: np.ndarray) -> np.ndarray:
    """Label a lung mask (canonical view, any non-zero = lung) into right and left lung.

    Returns uint8: 0 outside, 1 = patient's right lung (smaller columns), 2 = left.
    Connected components go to one side whole when they lie (almost) on one side of
    the mediastinal midline; components that straddle it (lungs touching at the
    anterior junction) are cut at the midline. A mask with no midline, because it
    holds one lung only, is never cut: all of it gets one label, right when its
    centre of mass lies in the array's right half (the array's middle stands in for
    the patient's midline), so that the lung is cropped whole, as in training. Work
    happens inside the lungs' bounding box, which keeps the label array small.
    """
    lung_full = np.asarray(mask) != 0
    out = np.zeros(lung_full.shape, np.uint8)
    if not lung_full.any():
        return out
    box = _bounding_box(lung_full)
    lung = lung_full[box]
    mid, valley = _midline_column(lung)
    if valley > _VALLEY_SHARE:
        weights = lung.sum(axis=tuple(range(lung.ndim - 1)))
        centre = float(np.average(np.arange(box[-1].start, box[-1].stop), weights=weights))
        out[box] = lung * np.uint8(RIGHT_LUNG if centre < lung_full.shape[-1] / 2 else LEFT_LUNG)
        return out
    components, n = ndimage.label(lung)
    right_half = np.zeros(lung.shape, bool)
    right_half[..., :mid] = True
    index = np.arange(1, n + 1)
    share_right = ndimage.sum_labels(right_half, components, index) / ndimage.sum_labels(lung, components, index)
    side_of_component = np.zeros(n + 1, np.uint8)  # 0 = cut at the midline
    side_of_component[1:][share_right >= _WHOLE_COMPONENT_SHARE] = RIGHT_LUNG
    side_of_component[1:][share_right <= 1 - _WHOLE_COMPONENT_SHARE] = LEFT_LUNG
    sides = side_of_component[components]
    undecided = lung & (sides == 0)
    sides[undecided & right_half] = RIGHT_LUNG
    sides[undecided & ~right_half] = LEFT_LUNG
    out[box] = sides
    return out

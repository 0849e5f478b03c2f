"""Per-lung crops of axial slices, as in the paper (Section III-A).

Each slice is cropped to the bounding box of one lung plus a 32-pixel margin on
each side (clipped to the image). The network's instance normalization takes its
statistics from the crop, so inference and training must crop identically: both
call :func:`crop_boxes` on the output of
:func:`~ILDSegmentationLib.imaging.lungsides.split_left_right`.

All arrays here are in the canonical view of :mod:`ILDSegmentationLib.imaging.geometry`:
(axial slice, row anterior->posterior, column patient right->left).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
from scipy import ndimage

from ..imaging.lungsides import LEFT_LUNG, RIGHT_LUNG

#: Margin of context around each lung's bounding box, in pixels (paper: 32).
CROP_MARGIN = 32


@dataclass(frozen=True)
class CropBox:
    """One lung's crop of one axial slice: rows [r0, r1), columns [c0, c1)."""

    slice_index: int
    side: int
    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def shape(self):
        return (self.r1 - self.r0, self.c1 - self.c0)

    @property
    def pixels(self) -> int:
        return (self.r1 - self.r0) * (self.c1 - self.c0)


def crop_boxes(sides: np.ndarray, slice_index: int, margin: int = CROP_MARGIN) -> List[CropBox]:
    """Crop boxes of one slice (2D array of 0/1/2 from
    :func:`~ILDSegmentationLib.imaging.lungsides.split_left_right`)."""
    boxes = []
    h, w = sides.shape
    for side in (RIGHT_LUNG, LEFT_LUNG):
        rows = np.flatnonzero((sides == side).any(axis=1))
        if rows.size == 0:
            continue
        cols = np.flatnonzero((sides == side).any(axis=0))
        boxes.append(CropBox(
            slice_index, side,
            max(int(rows[0]) - margin, 0), min(int(rows[-1]) + 1 + margin, h),
            max(int(cols[0]) - margin, 0), min(int(cols[-1]) + 1 + margin, w),
        ))
    return boxes


#: How each lung's crop box is placed (``Inferer(crop_box=...)``, ``ildseg segment
#: --crop-box``). ``mask``: the paper's, the bounding box of the lung's mask on the
#: slice plus :data:`CROP_MARGIN`. ``aerated``: the bounding box of the aerated lung
#: the mask outlines, found in the CT (:func:`aerated_sides`), plus the same margin,
#: so that a border drawn a few pixels wider or narrower by another tool does not
#: move the box (BENCHMARKS.md, "Labels under a changed lung mask").
CROP_BOX_CHOICES: Tuple[str, ...] = ("mask", "aerated")
#: Below this (HU) a pixel is aerated lung, for the ``aerated`` box: the automatic
#: lung mask's air threshold (lungmask.AIR_HU), halfway between aerated lung (-850)
#: and soft tissue (+40), so the pleura, not the mask's drawn border, is the edge.
AERATED_HU = -400.0
#: How far (pixels, in-plane) beyond a lung's mask the aerated lung is followed, and
#: how deep inside it the growth starts: a mask up to this much wider or narrower than
#: the lung finds the same lung; air further away is never reached.
AERATED_REACH_PX = 12
#: Where a lung's mask reaches beyond its aerated box (dense disease more than
#: CROP_MARGIN - this beyond the aerated lung), the box edge is put this far
#: (pixels) beyond the mask, so the mask's outermost pixels keep some context.
MASK_CONTEXT_PX = 8


def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius


def aerated_sides(sides: np.ndarray, hu: np.ndarray, reach: int = AERATED_REACH_PX,
                  threshold_hu: float = AERATED_HU) -> np.ndarray:
    """The aerated lung each lung's mask outlines on one slice, found in the CT.

    sides: 2D 0/1/2 from :func:`~ILDSegmentationLib.imaging.lungsides.split_left_right` (row anterior->posterior, column
    right->left); hu: the slice in HU, same shape. Aerated pixels are those below
    ``threshold_hu``, opened by a 1-pixel disk so that a gap of a pixel or two in an
    airway's wall or a junction line does not join the airway to the lung. For each
    lung, the connected pieces of aerated pixels within ``reach`` pixels of its mask
    (and outside the other lung's mask) that lie at least half inside its mask are its
    aerated lung: lung parenchyma lies (almost) all inside any mask of it, while an
    airway, the oesophagus or stomach gas that a mask drawn a few pixels too wide
    touches lies mostly outside it. The result (0/1/2) follows the CT's pleura, not
    the mask's drawn border: a mask dilated into the chest wall adds no aerated
    pixel, and one eroded by up to ``reach`` pixels still finds the whole lung. Dense
    lung (consolidation) is not aerated and not in it: :func:`crop_boxes_aerated`
    makes sure the box still holds the mask.
    """
    sides = np.asarray(sides)
    out = np.zeros(sides.shape, np.uint8)
    for side, other in ((RIGHT_LUNG, LEFT_LUNG), (LEFT_LUNG, RIGHT_LUNG)):
        lung = sides == side
        if not lung.any():
            continue
        # Work inside the lung's box grown by the reach: a slice is ~512 x 512, a
        # lung's neighbourhood a fraction of it.
        rows = np.flatnonzero(lung.any(axis=1))
        cols = np.flatnonzero(lung.any(axis=0))
        box = (slice(max(int(rows[0]) - reach - 1, 0), int(rows[-1]) + 2 + reach),
               slice(max(int(cols[0]) - reach - 1, 0), int(cols[-1]) + 2 + reach))
        here = lung[box]
        air = ndimage.binary_opening(np.asarray(hu)[box] < threshold_hu, _disk(1))
        allowed = air & (sides[box] != other)
        if reach > 0:
            # Within `reach` of the mask: the disk dilation, by a distance transform
            # (5-10x faster than dilating with a 25-pixel disk).
            allowed &= ndimage.distance_transform_edt(~here) <= reach
        pieces, n = ndimage.label(allowed)
        if n == 0:
            continue
        index = np.arange(1, n + 1)
        inside = ndimage.sum_labels(here, pieces, index) / ndimage.sum_labels(allowed, pieces, index)
        keep = np.zeros(n + 1, bool)
        keep[1:] = inside >= 0.5
        out[box][keep[pieces]] = side
    return out


def crop_boxes_aerated(sides: np.ndarray, hu: np.ndarray, slice_index: int, margin: int = CROP_MARGIN,
                       reach: int = AERATED_REACH_PX) -> List[CropBox]:
    """Crop boxes placed on the aerated lung (:func:`aerated_sides`) rather than on
    the mask's border: the paper's box (:func:`crop_boxes`) of the aerated lung, each
    edge moved out only where the mask reaches beyond ``margin - MASK_CONTEXT_PX``
    pixels of the aerated lung (dense disease), to :data:`MASK_CONTEXT_PX` beyond the
    mask, so the box always holds the whole mask and moves with it only by what the
    mask adds beyond that (no jump). A lung without aerated pixels on the slice gets
    the paper's box. Boxes are in the same order as :func:`crop_boxes`."""
    sides = np.asarray(sides)
    anchored = {b.side: b for b in crop_boxes(aerated_sides(sides, hu, reach), slice_index, margin)}
    around = {b.side: b for b in crop_boxes(sides, slice_index, min(MASK_CONTEXT_PX, margin))}
    boxes = []
    for b in crop_boxes(sides, slice_index, margin):
        a = anchored.get(b.side)
        if a is None:
            boxes.append(b)
            continue
        m = around[b.side]
        boxes.append(CropBox(slice_index, b.side, min(a.r0, m.r0), max(a.r1, m.r1),
                             min(a.c0, m.c0), max(a.c1, m.c1)))
    return boxes

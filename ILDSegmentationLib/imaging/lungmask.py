"""Classical lung mask from a chest CT: right and left lung, no trachea.

The engine needs a lung mask to crop each slice per lung (the paper's Section III-A)
and to know which pixels to classify. When the user gives none, this module makes one
with thresholds and morphology only (scipy.ndimage), so it needs no model weights and
runs in seconds on a CPU. The steps, in the canonical view of
:mod:`ILDSegmentationLib.imaging.geometry` (axial slice superior->inferior, row
anterior->posterior, column patient right->left), with every size in millimetres or
millilitres so that any spacing (0.5-1.5 mm pixels, 1-10 mm slices) gives the same
anatomy:

1. **Body.** Voxels above ``BODY_HU`` (-500 HU) are tissue: fat (about -100 HU) and
   everything denser, but neither air (-1000) nor aerated lung (about -850). They
   are eroded per axial slice by a square of half-width ``BODY_EROSION_MM``
   (2.5 mm): sheets, mattress edges and the table touch the patient through contacts
   a few mm wide, and without this cut the air between patient and table (or inside
   the table) would be enclosed like a lung; the chest wall (over 10 mm) stays
   closed. The largest 3D component of that, then per slice its largest 2D
   component, is the patient (the 3D step keeps a wide table from winning over a
   narrow neck slice). Its holes are filled per axial slice, so the "body" is the
   patient's cross-section with the lungs in it. Filling per slice, not in 3D, is
   what makes the lungs holes: in 3D they open to the outside through the airways
   whenever the scan reaches the mouth or nose.
2. **Air inside the body.** Voxels below ``AIR_HU`` (-400 HU) inside the filled body.
   -400 HU is halfway between aerated lung (-850) and soft tissue (+40), so the
   boundary falls on the pleura, and ground-glass opacity (-750 to -300 HU), which is
   exactly what the engine must see, stays in. Consolidation and fibrosis denser than
   that are recovered by steps 6-7 when the lung surrounds them, and by step 8 when
   they dent it at the chest wall. Air outside the
   patient, and the padding values (-3024, -2048) outside the scanner's field of view,
   are not inside the body, so they never count.
3. **Trachea and main bronchi.** In the top-most slices that hold air inside the body
   (within ``TRACHEA_SEARCH_MM``, 60 mm, of the first one: the trachea is there from
   the neck or the lung apex on, while a small central air pocket lower down is more
   likely gas in the oesophagus or bowel) the trachea is a small
   (``TRACHEA_SEED_AREA_MM2``, 30-600 mm^2; an adult trachea is 13-25 mm wide),
   compact 2D air component near the body's centre column (within
   ``TRACHEA_CENTRE_MM``, 20 mm, or 15 % of the body width; the most central one
   if there are several, since a lung apex can show up as a small round pocket in
   the same slice, further out). From there it is
   followed down slice by slice: a 2D air component that overlaps the airway of the
   slice above (grown by ``TRACHEA_FOLLOW_GROW_MM``, for bronchi that run obliquely
   through thick slices) and stays below ``TRACHEA_FOLLOW_MAX_AREA_MM2`` is airway,
   through the carina into both main bronchi (800 mm^2 is above any airway's
   section, thick slices included). Where the airway's 2D component has merged
   with a lung (the trachea or a main bronchus lying against the lung, its wall
   thinner than a pixel or two, or blurred below -400 HU by a sharp kernel or thick
   slices), it is split off: the component is opened with disks of
   ``TRACHEA_SPLIT_RADII_MM`` (1, 2, 3 mm), then the same for its voxels below
   ``TRACHEA_SPLIT_HU`` (-700 HU: lumen and aerated lung are below, a blurred wall
   above); the first opening that leaves a piece of at most 800 mm^2 overlapping
   the airway of the slice above (and not running on out of a box around it) gives
   the airway, that piece grown back by the same disk inside the component. When
   none does, the bronchus has entered the lung and that branch stops. The airway
   is followed at most ``MAIN_BRONCHI_MM`` (35 mm) below the carina (the first
   slice with two lumina of at least 30 mm^2): the main bronchi descend 20-35 mm
   before they enter the lungs, and beyond that the tree is inside them, so the
   intrapulmonary airways stay in the mask as part of the lung (as in usual lung
   masks; steps 6-7 take back those enclosed by lung). The whole airway found is
   removed.

   Before the split (2026-12), following stopped at the first slice where the
   trachea touched a lung, and the rest of the trachea and the main bronchi were
   lung. Measured on the CC BY CTs of ``../shared/data`` (canonical slices counted
   from the top, 1-based; voxels of the old mask not in the new one; "far air":
   of those, voxels below -400 HU more than 3 mm from the airway found, i.e.
   aerated lung removed):

   ==========================  ===========  =======================  ===========  ========
   CT                          old mask     removed                  slices       far air
   ==========================  ===========  =======================  ===========  ========
   lung-pet-ct-dx-A0002        2,703 mL     2,440 vox, 8.2 mL        14-15 / 30   0
   lidc-idri-0001              3,783 mL     17,325 vox, 21.4 mL      26-55 / 133  0
   lidc-idri-0002              5,323 mL     26,340 vox, 15.3 mL      98-128 / 261 1
   cptac-lscc-c3n-00247        4,611 mL     39,865 vox, 38.1 mL      21-48 / 99   8
   tcga-luad-tcga-17-z013      2,881 mL     5,799 vox, 9.4 mL        25-33 / 48   33
   tcga-luad-tcga-17-z015      3,973 mL     7,781 vox, 15.3 mL       22-29 / 61   0
   ==========================  ===========  =======================  ===========  ========

   That is 0.3-0.8 % of the lung: the lower trachea (lidc-idri-0001 from 60 mm
   above the carina down, cptac-lscc-c3n-00247 from 36 mm), the main bronchi, and
   with them soft tissue of the hila that closing, hole filling or step 8 had
   attached to the lung around them; the new mask adds no voxel. What stays of the
   airway in the mask is intrapulmonary bronchi enclosed by lung (at most 1 mL).
4. **Lung components.** 3D components of what is left. Components smaller than
   ``MIN_COMPONENT_ML`` (30 mL; a lung is 1-4 L) are noise, skin folds, air in the
   oesophagus or bowel. A large gas bubble in the stomach or colon sits under the
   diaphragm, so a component is kept only when it begins in the upper half of the
   largest component's height (a lung's apex does; gas under the diaphragm does not).

   **4b. Lung behind a thin chest wall.** Where the chest wall is thinner than step
   1's erosion (5 mm across: a thin patient's lateral wall at the base, the
   costophrenic recess), the eroded body's ring opens and the lung on that slice is
   no longer one of its holes: before this step (2026-12) the whole lung of that side
   was left out on those slices (issue 24: 104 mL, 5.3 % of the lower half of a
   low-dose PET/CT). So the holes of the *un-eroded* tissue are taken as well, per
   slice, where they lie inside the convex hull of the body's slice, are not airway,
   and join in 3D a lung already kept (the same lung on the slices above, where the
   wall was thick enough). Air under a blanket or sheet, or between the patient and
   the table, is a hole of the un-eroded tissue too, but outside the patient's convex
   outline or never joined to a lung: the chest wall lies between. Built from a real
   CT (its lateral right wall thinned to 3 mm on the lower half of the lung's slices,
   a blanket round it), the lower-half completeness measured by the team's tool went
   from 40.4 % left out (473 mL) to 0.0 %; on the seven real CTs of
   ``../shared/data`` the mask is unchanged to the voxel
   (``Testing/Python/test_lungmask.py::test_lung_behind_a_thin_chest_wall_under_a_blanket_stays_in``).
5. **Right and left.** :func:`ILDSegmentationLib.imaging.lungsides.split_left_right` labels
   the kept components, cutting lungs that touch at the anterior junction at the
   mediastinal midline (a single lung is labelled whole).
6. **Smoothing.** Per axial slice and per lung, a closing with a disk of
   ``CLOSING_RADIUS_MM`` (3 mm) takes in vessels and small nodules at the lung's
   border and bridges partial-volume gaps; it is done per lung so the two lungs are
   never bridged across the mediastinum, and stays inside the body.
7. **Holes.** Holes of each lung are filled per axial slice: vessels, bronchi walls,
   nodules and dense disease enclosed by aerated lung are lung for the engine. Per
   lung again, because the mediastinum is a hole of the union of both lungs.
8. **Dense disease at the pleura.** Consolidation or fibrosis that touches the chest
   wall is not enclosed by aerated lung, so steps 6-7 cannot take it in: it dents
   the aerated lung's outline instead. Per axial slice with both lungs, each lung's
   convex hull bridges such dents. A connected piece of hull outside the lungs is
   taken in, less its bone (above ``DENSE_MAX_HU``, 150 HU), when it lies no deeper
   than ``DENSE_MAX_DEPTH_MM`` (15 mm) from the aerated lung and does not touch
   the mediastinum (the part of both lungs' joint hull outside either lung's own
   hull): the heart's impression on the left lung and the hilum reach the
   mediastinum, a subpleural dent does not. Slices with one lung only (apex,
   bases) are left as they are: without the mediastinum for reference, the liver
   or spleen dome inside a basal crescent of lung would look like a dent.
9. **Check.** A total below ``MIN_LUNG_ML`` (200 mL; adult lungs hold 2-8 L at CT)
   means no lung was found: :class:`~ILDSegmentationLib.errors.LungMaskError` asks
   for a lung mask instead of returning a wrong one.

Scans that do not cover the whole lung height (a few slices, a single 2D slice)
scale the volume thresholds (``MIN_COMPONENT_ML``, ``MIN_LUNG_ML``) by the covered
height over ``FULL_COVERAGE_MM`` (150 mm), so they act as area thresholds per slice
instead of rejecting every partial scan.

Known limits: dense disease at the chest wall deeper than 15 mm, on slices with one
lung, or next to the mediastinum (paravertebral, at the heart) is left out, and so is
a dense tumour at the hilum; where the lung's base curves around the diaphragm, a
thin sliver of diaphragm or liver can be taken in by step 8; a lung cut by the field
of view is not enclosed by the body in those slices and is lost there; padding stored
as tissue values (0 HU instead of -3024) would enclose the outside air; a patient with one
lung keeps it whole (:func:`split_left_right` finds no mediastinum to cut at) but gets
no step 8, which needs both lungs on a slice; a single abdominal slice may report
bowel gas as lung (no 3D context). A user's own lung mask avoids all of these.

Cost, measured for a 512 x 512 x 300 CT on 2 cores: 5-8 s (step 8 about 0.7 s of it,
step 3's split and carina limit 0.2-0.6 s, see BENCHMARKS.md; step 4b added 7-20 % on
LIDC-IDRI-0002, 512 x 512 x 261, measured before/after twice in one run on a shared
2-core machine: 36.1 / 38.6 s and 32.7 / 39.4 s), and at the peak
about 6 bytes a voxel besides the input (a few bool volumes, one label volume of
uint16 when there are fewer than 65,535 components, and the int32 labels inside
:func:`split_left_right`); the right/left split and the per-lung steps work inside
the lungs' bounding box.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import numpy as np
from scipy import ndimage

from .lungsides import LEFT_LUNG, RIGHT_LUNG, split_left_right
from ..errors import LungMaskError
from .geometry import Geometry, as_volume, canonical_view

#: Tissue (fat and denser) is above this; air and aerated lung are below.
BODY_HU = -500.0
#: Half-width (mm) of the per-slice erosion that separates the patient from the table.
BODY_EROSION_MM = 2.5
#: Air and aerated lung (with ground glass) are below this.
AIR_HU = -400.0
#: Area range of the trachea's 2D component where it is first found, mm^2.
TRACHEA_SEED_AREA_MM2 = (30.0, 600.0)
#: The trachea's centre is at most this far (mm) from the body's centre column, or
#: 15 % of the body width if that is larger.
TRACHEA_CENTRE_MM = 20.0
#: Airway of the slice above is grown by this much (mm) to find its continuation.
TRACHEA_FOLLOW_GROW_MM = 2.0
#: The trachea is looked for only this far (mm) below the first slice with air in
#: the body: it is there from the neck or the lung apex on; further down, a small
#: central air pocket is more likely gas in the oesophagus or bowel.
TRACHEA_SEARCH_MM = 60.0
#: A 2D air component larger than this (mm^2) is lung, not airway.
TRACHEA_FOLLOW_MAX_AREA_MM2 = 800.0
#: Where the airway's 2D air component has merged with a lung through a thin wall,
#: openings with disks of these radii (mm), in turn, try to split it off.
TRACHEA_SPLIT_RADII_MM = (1.0, 2.0, 3.0)
#: ... and if they fail, the same openings of its voxels below this (HU): a wall
#: blurred by a sharp kernel or thick slices is darker than -400 but brighter than this.
TRACHEA_SPLIT_HU = -700.0
#: The airway is followed this far (mm) below the carina: the main bronchi descend
#: 20-35 mm before they enter the lungs (the right one is 1-2.5 cm long and steep,
#: the left 4-5 cm at about 45 degrees).
MAIN_BRONCHI_MM = 35.0
#: Smallest 3D component that can be (part of) a lung, mL.
MIN_COMPONENT_ML = 30.0
#: Radius of the per-slice closing of each lung, mm.
CLOSING_RADIUS_MM = 3.0
#: Dense disease is taken in up to this depth (mm) from the aerated lung (step 8);
#: deeper hull regions are more often diaphragm domes than subpleural disease.
DENSE_MAX_DEPTH_MM = 15.0
#: Denser than this (HU) is bone, never lung disease (step 8).
DENSE_MAX_HU = 150.0
#: Less lung than this (mL) means none was found.
MIN_LUNG_ML = 200.0
#: Height (mm) from which a scan counts as covering the lungs for the mL thresholds.
FULL_COVERAGE_MM = 150.0

ProgressCallback = Callable[[float, str], None]

# 4-connectivity within an axial slice, none across slices: per-slice operations on
# the whole volume in one scipy call.
_IN_SLICE = np.zeros((3, 3, 3), bool)
_IN_SLICE[1] = ndimage.generate_binary_structure(2, 1)


def _no_lung(detail: str) -> LungMaskError:
    return LungMaskError(
        f"no lung was found in the CT ({detail}); give a lung mask to segment this scan"
    )


def _label(mask: np.ndarray, structure: Optional[np.ndarray] = None) -> Tuple[np.ndarray, int]:
    """ndimage.label into uint16 when the count allows it (half the memory of int32)."""
    try:
        return ndimage.label(mask, structure, output=np.uint16)
    except RuntimeError:  # more than 65,535 components
        return ndimage.label(mask, structure)


def _component_sizes(labels: np.ndarray, n: int) -> np.ndarray:
    """Voxel count per label, slice by slice: np.bincount on the whole volume would
    first copy the labels to int64 (8 bytes a voxel)."""
    sizes = np.zeros(n + 1, np.int64)
    for z in range(labels.shape[0]):
        sizes += np.bincount(labels[z].ravel(), minlength=n + 1)
    sizes[0] = 0
    return sizes


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = _label(mask)
    if n <= 1:
        return labels > 0
    return labels == np.argmax(_component_sizes(labels, n))


def _erode_square_per_slice(
    mask: np.ndarray, half_width_mm: float, spacing: Tuple[float, float, float]
) -> np.ndarray:
    """Erosion by a square of the given half-width per axial slice: two separable
    1D minimum filters, a cost independent of the size."""
    out = mask
    for axis in (1, 2):
        half = int(round(half_width_mm / spacing[axis]))
        if half > 0:
            out = ndimage.minimum_filter1d(out, 2 * half + 1, axis=axis, mode="nearest")
    return out if out is not mask else mask.copy()


def _filled_largest_component_per_slice(mask: np.ndarray) -> np.ndarray:
    """Per axial slice: the largest 2D component, its holes filled."""
    out = np.zeros(mask.shape, bool)
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        labels, n = ndimage.label(mask[z])
        objects = ndimage.find_objects(labels)
        if n == 1:
            best = 1
        else:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            best = int(np.argmax(sizes))
        box = objects[best - 1]
        out[z][box] = ndimage.binary_fill_holes(labels[box] == best)
    return out


def _body(ct: np.ndarray, spacing: Tuple[float, float, float]) -> np.ndarray:
    """The patient's cross-section per axial slice, lungs included (step 1)."""
    tissue = ct > BODY_HU
    # Sheets, mattress edges and the table touch the patient through contacts a few
    # mm wide; eroding cuts them, so the cavities of the table and the air under the
    # patient are not holes of the body. The chest wall stays closed around the lungs.
    core = _erode_square_per_slice(tissue, BODY_EROSION_MM, spacing)
    del tissue
    # 3D first: a slice where the table outsizes the patient (the neck) still loses it.
    return _filled_largest_component_per_slice(_largest_component(core))


def _lung_behind_thin_wall(
    ct: np.ndarray, lungs: np.ndarray, airway: np.ndarray, body: np.ndarray, spacing: Tuple[float, float, float]
) -> np.ndarray:
    """Step 4b: aerated lung that step 1's erosion left outside the body (canonical view).

    Where the chest wall is thinner than the erosion (``2 x BODY_EROSION_MM``), the
    eroded body's ring opens and the lung on that slice is no longer one of its holes.
    Here the holes of the *un-eroded* tissue, per axial slice, are taken instead,
    where they are air (below ``BODY_HU``, so below ``AIR_HU``), not airway, inside the
    convex hull of the body's slice (an opened ring still spans the lung), and joined
    in 3D to the lungs already found: the same lung a few slices higher, where the
    wall was thick enough. Air between the patient and a sheet, blanket or the table
    is also a hole of the un-eroded tissue, but it lies outside the patient's convex
    outline and is never joined to a lung: the chest wall is between them.
    Returns the voxels to add (not already in ``lungs``)."""
    zs = np.flatnonzero(body.any(axis=(1, 2)))
    out = np.zeros(lungs.shape, bool)
    if zs.size == 0:
        return out
    margin = tuple(int(np.ceil(20.0 / mm)) + 1 for mm in spacing[1:])
    # Slice by slice: a few 2D arrays at a time.
    candidates = np.zeros(lungs.shape, bool)
    for z in zs:
        # Within the body's box, grown so that a lung reaching beyond it behind a thin
        # wall stays a hole there (only its part inside the body's hull is taken).
        box = _bounding_box(body[z], margin)
        tissue = ct[z][box] > BODY_HU
        holes = ndimage.binary_fill_holes(tissue) & ~tissue & ~airway[z][box] & ~lungs[z][box]
        if not holes.any():
            continue
        candidates[z][box] = holes & _convex_hull_2d(body[z][box])
    if not candidates.any():
        return out
    labels, n = _label(candidates | lungs)
    joined = np.unique(labels[lungs])
    joined = joined[joined > 0]
    keep = np.zeros(n + 1, bool)
    keep[joined] = True
    return keep[labels] & candidates


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    return ndimage.binary_fill_holes(mask, _IN_SLICE)


def _disk(radius_mm: float, row_mm: float, col_mm: float) -> np.ndarray:
    """Disk structuring element of one axial slice, shape (1, rows, cols)."""
    rr = max(int(radius_mm / row_mm), 0)
    rc = max(int(radius_mm / col_mm), 0)
    y, x = np.mgrid[-rr:rr + 1, -rc:rc + 1]
    disk = (y * row_mm) ** 2 + (x * col_mm) ** 2 <= radius_mm ** 2 + 1e-9
    return disk[np.newaxis]


def _bounding_box(mask: np.ndarray, margin: Tuple[int, int, int]) -> Tuple[slice, ...]:
    """Bounding box of a non-empty mask, grown by margin voxels per axis (clipped)."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        lo = max(int(idx[0]) - margin[axis], 0)
        box.append(slice(lo, min(int(idx[-1]) + 1 + margin[axis], mask.shape[axis])))
    return tuple(box)


def _find_airway(
    air: np.ndarray, body: np.ndarray, ct: np.ndarray, spacing: Tuple[float, float, float]
) -> np.ndarray:
    """Trachea and main bronchi (see step 3 of the module docstring), canonical view."""
    slice_mm, row_mm, col_mm = spacing
    pixel_mm2 = row_mm * col_mm
    seed_lo, seed_hi = (a / pixel_mm2 for a in TRACHEA_SEED_AREA_MM2)
    follow_max = TRACHEA_FOLLOW_MAX_AREA_MM2 / pixel_mm2
    grow = _disk(TRACHEA_FOLLOW_GROW_MM, row_mm, col_mm)[0]
    airway = np.zeros(air.shape, bool)
    slices_with_air = np.flatnonzero(air.any(axis=(1, 2)))

    if slices_with_air.size == 0:
        return airway
    start = None
    last_search = slices_with_air[0] + TRACHEA_SEARCH_MM / slice_mm
    for z in slices_with_air[slices_with_air <= last_search]:
        labels, n = ndimage.label(air[z])
        cols = np.flatnonzero(body[z].any(axis=0))
        centre = 0.5 * (cols[0] + cols[-1])
        max_off = max(TRACHEA_CENTRE_MM, 0.15 * (cols[-1] - cols[0] + 1) * col_mm) / col_mm
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        candidates = []
        for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None or not seed_lo <= areas[lab] <= seed_hi:
                continue
            rows_px, cols_px = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
            # A round lumen, not a sliver of air along the pleura or in a skin fold.
            h_mm, w_mm = rows_px * row_mm, cols_px * col_mm
            if areas[lab] < 0.4 * rows_px * cols_px or max(h_mm, w_mm) > 3.0 * min(h_mm, w_mm):
                continue
            offset = abs(0.5 * (sl[1].start + sl[1].stop - 1) - centre)
            if offset <= max_off:
                candidates.append((offset, lab))
        if candidates:
            # The most central one: a lung apex that first shows as a small round
            # pocket in the same slice lies further out.
            airway[z] = labels == min(candidates)[1]
            start = int(z)
            break
    if start is None:
        return airway

    carina = None
    for z in range(start + 1, air.shape[0]):
        if carina is not None and (z - carina) * slice_mm > MAIN_BRONCHI_MM:
            break  # beyond the main bronchi: the rest of the tree is inside the lungs
        previous = ndimage.binary_dilation(airway[z - 1], grow)
        labels, n = ndimage.label(air[z])
        if n == 0:
            break
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        touching = np.unique(labels[previous & (labels > 0)])
        touching = touching[touching > 0]
        found = np.isin(labels, touching[areas[touching] <= follow_max])
        for lab in touching[areas[touching] > follow_max]:
            # The airway leaks into a lung through a wall thinner than a pixel or two.
            found |= _split_airway_off(labels == lab, ct[z], airway[z - 1], follow_max, row_mm, col_mm)
        if not found.any():
            break
        airway[z] = found
        if carina is None:
            pieces, n = ndimage.label(found)
            if n >= 2 and np.count_nonzero(np.bincount(pieces.ravel())[1:] >= seed_lo) >= 2:
                carina = z  # two lumina of a main bronchus' size: the trachea has divided
    return airway


def _split_airway_off(
    component: np.ndarray, ct: np.ndarray, previous: np.ndarray, max_area: float, row_mm: float, col_mm: float
) -> np.ndarray:
    """The airway's part of a 2D air component in which it merges with a lung.

    component: the merged component (one axial slice); previous: the airway of the
    slice above. The component is opened with disks of ``TRACHEA_SPLIT_RADII_MM``
    in turn: the airway is the opened piece(s) that overlap ``previous`` and are at
    most ``max_area`` pixels, grown back by the same radius inside the component. An
    empty mask when no radius separates them (the bronchus has entered the lung).
    """
    box = _bounding_box(previous, (0, 0))
    # Work near the airway: it moves a few mm per slice, the lung may be 30 cm wide.
    reach = max(TRACHEA_SPLIT_RADII_MM) + TRACHEA_FOLLOW_GROW_MM + np.sqrt(max_area * row_mm * col_mm)
    box = tuple(
        slice(max(sl.start - int(reach / mm) - 1, 0), min(sl.stop + int(reach / mm) + 1, n))
        for sl, mm, n in zip(box, (row_mm, col_mm), component.shape)
    )
    part, prev = component[box], previous[box]
    out = np.zeros(component.shape, bool)
    for threshold, radius in ((t, r) for t in (AIR_HU, TRACHEA_SPLIT_HU) for r in TRACHEA_SPLIT_RADII_MM):
        disk = _disk(radius, row_mm, col_mm)[0]
        # The box edge does not erode (border_value=1): pieces cut by it are seen below.
        core = ndimage.binary_erosion(part & (ct[box] < threshold), disk, border_value=1)
        labels, n = ndimage.label(core)
        if n == 0:
            continue
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        hit = np.unique(labels[prev & core])
        hit = hit[hit > 0]
        if hit.size == 0:
            continue
        # A piece touching the box edge runs on into the lung: not an airway.
        edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        pieces = hit[(areas[hit] <= max_area) & ~np.isin(hit, edge)]
        if pieces.size:
            out[box] = ndimage.binary_dilation(np.isin(labels, pieces), disk) & part
            return out
    return out


def _close_and_fill(
    side_mask: np.ndarray, body: np.ndarray, spacing: Tuple[float, float, float]
) -> Tuple[Tuple[slice, ...], np.ndarray]:
    """Per-slice closing and hole filling of one lung (steps 6-7), computed in its
    bounding box: returns the box and the filled lung inside it."""
    _, row_mm, col_mm = spacing
    disk = _disk(CLOSING_RADIUS_MM, row_mm, col_mm)
    margin = (0, disk.shape[1] // 2 + 1, disk.shape[2] // 2 + 1)
    box = _bounding_box(side_mask, margin)
    part = side_mask[box]
    # Pad so the closing's erosion does not eat pixels at the box edge.
    pad = ((0, 0), (margin[1], margin[1]), (margin[2], margin[2]))
    closed = ndimage.binary_closing(np.pad(part, pad), disk)
    closed = closed[:, margin[1]:closed.shape[1] - margin[1], margin[2]:closed.shape[2] - margin[2]]
    closed &= body[box]
    closed |= part
    return box, _fill_holes_per_slice(closed)


def _convex_hull_2d(mask: np.ndarray) -> np.ndarray:
    """Convex hull of a 2D mask, as a mask (the mask itself when it is degenerate)."""
    from PIL import Image, ImageDraw
    from scipy.spatial import ConvexHull, QhullError
    points = np.argwhere(mask & ~ndimage.binary_erosion(mask))  # the edge is enough
    if len(points) < 3:
        return mask.copy()
    try:
        hull = ConvexHull(points)
    except QhullError:  # all points on a line
        return mask.copy()
    # Rasterizing the polygon (fast, in C) also takes pixels its edges only touch.
    # Pixels of its one-pixel rim are kept only when their centre is inside every
    # facet; the pixels within the rim are inside.
    canvas = Image.new("1", (mask.shape[1], mask.shape[0]), 0)
    ImageDraw.Draw(canvas).polygon([(float(c), float(r)) for r, c in points[hull.vertices]], fill=1)
    filled = np.asarray(canvas, dtype=bool)
    interior = ndimage.binary_erosion(filled, np.ones((3, 3), bool))
    rim = np.argwhere(filled & ~interior & ~mask)
    inside = np.all(rim @ hull.equations[:, :2].T + hull.equations[:, 2] <= 1e-6, axis=1)
    out = interior | mask
    out[tuple(rim[inside].T)] = True
    return out


def _add_dense_pleural_disease(sides: np.ndarray, ct: np.ndarray, spacing: Tuple[float, float, float]) -> None:
    """Step 8 of the module docstring, in place on ``sides`` (canonical view)."""
    _, row_mm, col_mm = spacing
    for z in np.flatnonzero(sides.any(axis=(1, 2))):
        right, left = sides[z] == RIGHT_LUNG, sides[z] == LEFT_LUNG
        if not (right.any() and left.any()):
            continue
        box = _bounding_box(sides[z] > 0, (1, 1))
        right, left = right[box], left[box]
        hulls = {RIGHT_LUNG: _convex_hull_2d(right), LEFT_LUNG: _convex_hull_2d(left)}
        mediastinum = _convex_hull_2d(right | left) & ~hulls[RIGHT_LUNG] & ~hulls[LEFT_LUNG]
        near_mediastinum = ndimage.binary_dilation(mediastinum, iterations=2)
        not_bone = ct[z][box] < DENSE_MAX_HU
        target = sides[z][box]  # a view: writes go into sides
        for side, own in ((RIGHT_LUNG, right), (LEFT_LUNG, left)):
            # Pieces are judged whole, bone and contrast-filled vessels included: cut
            # out first, an enhanced vessel would split a deep region (liver dome,
            # heart) into pieces that each pass the depth test.
            labels, n = ndimage.label(hulls[side] & ~(right | left))
            if n == 0:
                continue
            depth = ndimage.distance_transform_edt(~own, sampling=(row_mm, col_mm))
            ok = np.zeros(n + 1, bool)
            ok[1:] = np.asarray(ndimage.maximum(depth, labels, np.arange(1, n + 1))) <= DENSE_MAX_DEPTH_MM
            ok[np.unique(labels[near_mediastinum])] = False
            ok[0] = False
            target[ok[labels] & not_bone] = side


def compute_lung_mask(
    hu: np.ndarray,
    geometry: Geometry,
    progress: Optional[ProgressCallback] = None,
) -> np.ndarray:
    """Lung mask of a CT: 0 outside, 1 patient's right lung, 2 patient's left lung.

    hu: CT in Hounsfield units, K, J, I order (a 2D J, I array is one axial slice);
    not modified. geometry: where it lies. Returns uint8 of hu's shape and order.
    Raises LungMaskError when no lung is found. The method is described in the
    module docstring.
    """
    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(fraction, message)

    original_shape = np.shape(hu)
    volume = as_volume(np.asarray(hu))
    if volume.size == 0:
        raise _no_lung("the image is empty")
    view = canonical_view(geometry)
    spacing = view.canonical_spacing(geometry)
    ct = view.to_canonical(volume)  # a view: nothing is copied or changed
    slice_mm = spacing[0]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    coverage = min(1.0, ct.shape[0] * slice_mm / FULL_COVERAGE_MM)

    report(0.0, "Lung mask: finding the body")
    body = _body(ct, spacing)
    if not body.any():
        raise _no_lung("the image holds no body (tissue above -500 HU)")

    report(0.2, "Lung mask: finding air inside the body")
    air = ct < AIR_HU
    air &= body
    if not air.any():
        raise _no_lung("there is no air inside the body")

    report(0.35, "Lung mask: removing the trachea and main bronchi")
    airway = _find_airway(air, body, ct, spacing)
    air &= ~airway

    report(0.5, "Lung mask: keeping the lungs")
    labels, n = _label(air)
    del air
    if n == 0:
        raise _no_lung("there is no air inside the body besides the airways")
    sizes = _component_sizes(labels, n)
    objects = ndimage.find_objects(labels)
    # First slice of each component (labels without voxels never pass the size test).
    first_slice = np.array([ct.shape[0]] + [ct.shape[0] if sl is None else sl[0].start for sl in objects])
    largest = objects[int(np.argmax(sizes)) - 1][0]
    middle_of_largest = 0.5 * (largest.start + largest.stop)
    keep = (sizes >= MIN_COMPONENT_ML * coverage / voxel_ml) & (first_slice <= middle_of_largest)
    keep[0] = False
    lungs = keep[labels]
    del labels
    if lungs.sum() * voxel_ml < MIN_LUNG_ML * coverage:
        raise _no_lung(f"only {lungs.sum() * voxel_ml:.0f} mL of air inside the body")

    report(0.6, "Lung mask: recovering lung behind a thin chest wall")
    recovered = _lung_behind_thin_wall(ct, lungs, airway, body, spacing)
    del airway
    if recovered.any():
        lungs |= recovered
        # The body holds the recovered lung, so that steps 6-7 may close and fill it.
        body |= _fill_holes_per_slice(body | recovered)
    del recovered

    report(0.65, "Lung mask: separating the right and left lung")
    # Within the lungs' bounding box: the same labels, less time and memory.
    box = _bounding_box(lungs, (0, 0, 0))
    sides_in_box = split_left_right(lungs[box])
    del lungs
    sides = np.zeros(ct.shape, np.uint8)
    sides[box] = sides_in_box
    del sides_in_box

    report(0.75, "Lung mask: closing and filling each lung")
    added: Dict[int, Tuple[Tuple[slice, ...], np.ndarray]] = {}
    for side in (RIGHT_LUNG, LEFT_LUNG):
        side_mask = sides == side
        if side_mask.any():
            box, filled = _close_and_fill(side_mask, body, spacing)
            added[side] = (box, filled & (sides[box] == 0))
        del side_mask
    del body
    out = sides  # the split lungs, grown in place by what closing and filling add
    for side, (box, new) in added.items():
        part = out[box]  # a view: assignments below write into out
        # A voxel that both lungs' closings claim stays out: the gap between lungs
        # that touch stays visible. The right lung was written first.
        claimed_by_right = new & (part == RIGHT_LUNG) if side == LEFT_LUNG else None
        part[new] = side
        if claimed_by_right is not None:
            part[claimed_by_right] = 0
    del added

    report(0.9, "Lung mask: taking in dense disease at the pleura")
    _add_dense_pleural_disease(out, ct, spacing)

    total_ml = np.count_nonzero(out) * voxel_ml
    if total_ml < MIN_LUNG_ML * coverage:
        raise _no_lung(f"only {total_ml:.0f} mL of lung")
    report(1.0, "Lung mask: done")
    return np.ascontiguousarray(view.from_canonical(out)).reshape(original_shape)

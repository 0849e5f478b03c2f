"""Where in the lung each pattern lies: volumes per lung, zone and depth, and the
distribution descriptors a radiologist reads a CT by.

ILD is diagnosed by its distribution as much as by its patterns: the ATS/ERS/JRS/ALAT
2018 guideline describes usual interstitial pneumonia as basal and subpleural
predominant, NSIP is often lower-zone with subpleural sparing, hypersensitivity
pneumonitis upper and mid-zone. This module splits the lung into regions and counts
each class in each of them.

Regions (all from the geometry's direction, never from array index order):

* **Side**: the patient's right and left lung, as :func:`~ILDSegmentationLib.imaging.lungsides.split_left_right`
  splits the mask in the canonical view (columns run patient right -> left).
* **Zone**: upper, middle and lower third of *each lung's own* cranio-caudal extent,
  from the centre of its most superior slice with lung to that of its most inferior
  one, along the axial axis (the index axis closest to superior-inferior). Each axial
  slice lies wholly in one zone: the zone of its centre, at (k - first + 0.5) /
  (slices of that lung) of the extent. Thirds by height, not by volume: the lower
  zone holds more lung than the upper one, so zone comparisons use the share of each
  zone's own lung (see the descriptors).
* **Depth**: the subpleural band, lung within ``band_mm`` (default 10 mm) of the
  costal pleura, and the core, the rest. Depth is measured in the axial plane, as a
  radiologist reads it, from the chest wall: per slice, the convex hull of both
  lungs is what lies inside the chest wall (lung, mediastinum, heart, hila), so the
  depth is the distance to the nearest point outside that hull and outside the lung
  (:func:`costal_pleura_depth`). The mediastinal pleura does not count, as
  subpleural ILD lies along the ribs, not the heart. The ILD simulator places its
  subpleural patterns with the same function.

Every voxel of the lung lies in exactly one side x zone region and in exactly one
depth region, and counts are integers, so the regions add up to the totals exactly.

Distribution descriptors, per pattern:

* ``lower_upper_ratio``: percent of the lower zones' lung (both sides) that holds the
  pattern over the same percent of the upper zones: above 1 means lower-zone
  predominance. Null when the upper zones hold none of it.
* ``subpleural_fraction``: share (0..1) of the pattern's volume in the subpleural band;
  compare it with ``lung_subpleural_fraction``, the band's share of the whole lung
  (the value for a pattern spread evenly).
* ``left_right_ratio``: percent of the left lung holding the pattern over the percent
  of the right lung. Null when the right lung holds none.
* ``fibrotic_percent_of_lung``: reticulation + honeycombing as percent of the lung, the
  extent of fibrosis that clinical studies follow over time.

Arrays are K, J, I unless named canonical (axial slice superior -> inferior, row
anterior -> posterior, column patient right -> left; see :mod:`ILDSegmentationLib.imaging.geometry`).
Distances and band widths are millimetres, volumes millilitres.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from ..classes import CLASSES
from ..imaging.lungsides import LEFT_LUNG, RIGHT_LUNG, split_left_right
from ..imaging.geometry import Geometry, as_volume, canonical_view

#: Default width (mm) of the subpleural band, measured in the axial plane from the
#: costal pleura. 1 cm is the band that visual ILD scoring and quantitative tools
#: commonly call subpleural (honeycombing and UIP reticulation lie within it).
DEFAULT_BAND_MM = 10.0
SIDES: Tuple[Tuple[int, str], ...] = ((RIGHT_LUNG, "right"), (LEFT_LUNG, "left"))
ZONES: Tuple[str, ...] = ("upper", "middle", "lower")
DEPTHS: Tuple[str, ...] = ("subpleural", "core")
#: Labels of the fibrotic patterns (reticulation, honeycombing).
FIBROTIC_LABELS: Tuple[int, ...] = (5, 6)
ZONE_RULE = ("thirds of each lung's cranio-caudal extent (its first to last axial slice with lung), "
             "each slice in the zone of its centre")
DEPTH_RULE = ("in-plane distance from the costal pleura (the chest wall outside the convex hull of both "
              "lungs in each axial slice); the mediastinal pleura does not count")
_NCLS = len(CLASSES) + 1  # label values 0..6


# ------------------------------------------------------------ depth from the costal pleura
# Shared with the ILD simulator (simulate.py), which places subpleural patterns by it.

def inplane_distance(mask: np.ndarray, spacing: Sequence[float], far: float = 1000.0) -> np.ndarray:
    """Per axial slice of a canonical ``mask`` (slice, row, column), the distance (mm)
    from each True pixel to the nearest False one; ``far`` in slices without any False
    pixel. ``spacing``: (row, column) mm. Subpleural is judged in the axial image, as a
    radiologist reads it, so the distance is in plane: an apex or a base cut obliquely
    by the slice is not all "subpleural"."""
    out = np.zeros(mask.shape, np.float32)
    for z in range(mask.shape[0]):
        if mask[z].all():
            out[z] = far
        elif mask[z].any():
            out[z] = ndimage.distance_transform_edt(mask[z], sampling=spacing)
    return out


def slice_hulls(lung: np.ndarray, spacing: Sequence[float]) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
    """Per axial slice of a canonical ``lung`` mask (bool, both lungs), the convex hull
    of the lungs as an interval of columns [lo, hi] (mm from column 0) per row.
    ``spacing``: (slice, row, column) mm. Non-lung inside the hull is the mediastinum,
    heart and hila; outside it, the chest wall. Subpleural patterns of ILD
    (reticulation, honeycombing) lie along the costal pleura, not along the heart, so
    depth is measured from the chest wall."""
    from scipy.spatial import ConvexHull
    hulls: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
    _, sy, sx = spacing
    rows = np.arange(lung.shape[1]) * sy
    for z in np.flatnonzero(lung.any(axis=(1, 2))):
        m = lung[z]
        edge = m & ~ndimage.binary_erosion(m)
        pts = np.argwhere(edge).astype(float) * (sy, sx)
        if len(pts) < 4:
            continue
        try:
            hull = ConvexHull(pts)
        except Exception:  # degenerate (collinear) lung outline: no mediastinum here
            continue
        lo = np.full(rows.shape, -np.inf)
        hi = np.full(rows.shape, np.inf)
        # Half-planes a*row + b*col + c <= 0, grown half a pixel.
        for a, b, c in hull.equations:
            c = c - 0.5 * max(sy, sx)
            if abs(b) < 1e-9:
                outside = a * rows + c > 0
                lo[outside], hi[outside] = np.inf, -np.inf
            elif b > 0:
                hi = np.minimum(hi, (-c - a * rows) / b)
            else:
                lo = np.maximum(lo, (-c - a * rows) / b)
        hulls[int(z)] = (lo, hi)
    return hulls


def inside_chest_wall(lung: np.ndarray, hulls: Dict[int, Tuple[np.ndarray, np.ndarray]], spacing: Sequence[float],
                      box: Tuple[slice, slice, slice], step: Tuple[int, int, int] = (1, 1, 1)) -> np.ndarray:
    """Lung, or inside the lungs' hull (:func:`slice_hulls`), over the canonical ``box``
    sampled every ``step`` voxels: the distance to its complement is the depth under
    the costal or diaphragmatic pleura. ``spacing``: (slice, row, column) mm."""
    ks = np.arange(box[0].start, box[0].stop, step[0])
    js = np.arange(box[1].start, box[1].stop, step[1])
    is_ = np.arange(box[2].start, box[2].stop, step[2])
    out = lung[np.ix_(ks, js, is_)]
    cols = (is_ * spacing[2])[None, :]
    for n, k in enumerate(ks):
        hull = hulls.get(int(k))
        if hull is not None:
            out[n] |= (cols >= hull[0][js, None]) & (cols <= hull[1][js, None])
    return out


def costal_pleura_depth(lung: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Depth (mm) of every voxel of a canonical ``lung`` mask under the costal pleura,
    in the axial plane; 0 outside the lung. ``spacing``: (slice, row, column) mm.

    Works inside the lungs' bounding box grown by two pixels, whose border lies outside
    the hulls (they reach at most half a pixel beyond the lung), so distances are those
    of the whole slice. float32, the same shape as ``lung``."""
    lung = np.asarray(lung, bool)
    out = np.zeros(lung.shape, np.float32)
    if not lung.any():
        return out
    hulls = slice_hulls(lung, spacing)
    rows_cols = []
    for axis in (1, 2):
        idx = np.flatnonzero(lung.any(axis=tuple(a for a in range(3) if a != axis)))
        rows_cols.append(slice(max(int(idx[0]) - 2, 0), min(int(idx[-1]) + 3, lung.shape[axis])))
    # Slice by slice: no volume-sized temporaries (a 512 x 512 x 500 CT is 130 M voxels).
    for z in np.flatnonzero(lung.any(axis=(1, 2))):
        box = (slice(int(z), int(z) + 1), rows_cols[0], rows_cols[1])
        inner = inside_chest_wall(lung, hulls, spacing, box)
        depth = inplane_distance(inner, spacing[1:])[0]
        here = lung[box][0]
        out[box][0][here] = depth[here]
    return out


# ------------------------------------------------------------ region maps


@dataclass
class RegionMaps:
    """Per voxel (canonical view): side (0 outside, 1 right, 2 left), zone (0 outside,
    1 upper, 2 middle, 3 lower), depth under the costal pleura (mm) and whether the
    voxel is in the subpleural band. ``view`` turns them back to K, J, I."""

    side: np.ndarray
    zone: np.ndarray
    depth_mm: np.ndarray
    subpleural: np.ndarray
    band_mm: float
    spacing: Tuple[float, float, float]  # canonical (slice, row, column) mm


def zone_of_slices(present: np.ndarray) -> np.ndarray:
    """Zone (1 upper, 2 middle, 3 lower; 0 where absent) of each canonical axial slice,
    given which slices hold the lung (``present``, bool per slice, superior first):
    thirds of the extent from the first to the last such slice, by slice centre."""
    zones = np.zeros(present.shape, np.uint8)
    idx = np.flatnonzero(present)
    if idx.size == 0:
        return zones
    first, n = int(idx[0]), int(idx[-1]) - int(idx[0]) + 1
    k = np.arange(first, first + n)
    t = (k - first + 0.5) / n
    zones[k] = (np.minimum((3 * t).astype(int), 2) + 1).astype(np.uint8)
    zones[~present] = 0  # a gap of slices without this lung belongs to no zone
    return zones


def region_maps(lung_c: np.ndarray, spacing: Sequence[float], band_mm: float = DEFAULT_BAND_MM) -> RegionMaps:
    """Side, zone and depth of every voxel of a canonical lung mask (any non-zero is
    lung); ``spacing``: canonical (slice, row, column) mm."""
    if not band_mm > 0:
        raise ValueError(f"the subpleural band must be wider than 0 mm, not {band_mm}")
    lung = np.asarray(lung_c) != 0
    side = split_left_right(lung)
    zone = np.zeros(lung.shape, np.uint8)
    for s, _ in SIDES:
        per_slice = zone_of_slices((side == s).any(axis=(1, 2)))
        for z in np.flatnonzero(per_slice):
            zone[z][side[z] == s] = per_slice[z]
    depth = costal_pleura_depth(lung, spacing)
    sp = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    return RegionMaps(side, zone, depth, lung & (depth <= band_mm), float(band_mm), sp)


# ------------------------------------------------------------ volumes per region


def _class_rows(counts: np.ndarray, ml: float) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    lung = int(counts[1:].sum())
    rows = []
    for c in CLASSES:
        n = int(counts[c.label])
        rows.append({"label": c.label, "name": c.name, "voxels": n, "volume_ml": round(n * ml, 6),
                     "percent_of_region": round(100.0 * n / lung, 4) if lung else 0.0})
    return {"lung_voxels": lung, "lung_volume_ml": round(lung * ml, 6)}, rows


def _ratio(a: float, b: float) -> Optional[float]:
    return round(a / b, 4) if b > 0 else None


def regional_volumes(labels: np.ndarray, geometry: Geometry, band_mm: float = DEFAULT_BAND_MM,
                     maps: Optional[RegionMaps] = None) -> Dict[str, Any]:
    """Per class volumes per region and the distribution descriptors (see the module
    docstring). ``labels``: K, J, I (or J, I) label map, 0 outside the lung, 1..6 the
    classes. Returns the report keys ``regions`` (one object per side x zone),
    ``sides``, ``depth``, ``distribution`` and ``region_rules``; each region has
    ``lung_voxels``, ``lung_volume_ml`` and per class ``voxels``, ``volume_ml`` and
    ``percent_of_region``. ``distribution`` holds ``band_mm``,
    ``lung_subpleural_fraction``, ``fibrotic_percent_of_lung``, ``fibrotic_volume_ml``
    and ``patterns``: per class segment id (``ground_glass_opacity``...) its
    ``lower_upper_ratio``, ``subpleural_fraction`` and ``left_right_ratio`` (null where
    the denominator is 0)."""
    view = canonical_view(geometry)
    lab_c = view.to_canonical(as_volume(np.asarray(labels)))
    if lab_c.size and (lab_c.max() >= _NCLS):
        raise ValueError(f"label map holds values above {_NCLS - 1}")
    if maps is None:
        maps = region_maps(lab_c, view.canonical_spacing(geometry), band_mm)
    ml = geometry.voxel_volume_ml
    # Counts per side (1..2) x zone (1..3) x label (0..6) and per depth x label, slice by
    # slice so that no array of all the lung's voxels is made.
    sz_counts = np.zeros(6 * _NCLS, np.int64)
    depth_counts = np.zeros((2, _NCLS), np.int64)
    for z in range(lab_c.shape[0]):
        in_lung = lab_c[z] != 0
        if not in_lung.any():
            continue
        lab = lab_c[z][in_lung].astype(np.intp)
        side = maps.side[z][in_lung].astype(np.intp)
        zone = maps.zone[z][in_lung].astype(np.intp)
        sub = maps.subpleural[z][in_lung]
        sz_counts += np.bincount(((side - 1) * 3 + (zone - 1)) * _NCLS + lab, minlength=6 * _NCLS)
        depth_counts[0] += np.bincount(lab[sub], minlength=_NCLS)
        depth_counts[1] += np.bincount(lab[~sub], minlength=_NCLS)
    sz_counts = sz_counts.reshape(2, 3, _NCLS)
    total = sz_counts.sum(axis=(0, 1))

    regions, sides = [], []
    for si, (_, side_name) in enumerate(SIDES):
        for zi, zone_name in enumerate(ZONES):
            head, rows = _class_rows(sz_counts[si, zi], ml)
            regions.append({"side": side_name, "zone": zone_name, **head, "classes": rows})
        head, rows = _class_rows(sz_counts[si].sum(axis=0), ml)
        sides.append({"side": side_name, **head, "classes": rows})
    depth = []
    for di, depth_name in enumerate(DEPTHS):
        head, rows = _class_rows(depth_counts[di], ml)
        depth.append({"depth": depth_name, "band_mm": maps.band_mm, **head, "classes": rows})

    def pct(counts: np.ndarray, label: int) -> float:
        n = counts[1:].sum()
        return 100.0 * counts[label] / n if n else 0.0

    lower, upper = sz_counts[:, 2].sum(axis=0), sz_counts[:, 0].sum(axis=0)
    right, left = sz_counts[0].sum(axis=0), sz_counts[1].sum(axis=0)
    lung_n = int(total[1:].sum())
    patterns: Dict[str, Dict[str, Optional[float]]] = {}
    for c in CLASSES:
        n = int(total[c.label])
        patterns[c.segment_id] = {
            "lower_upper_ratio": _ratio(pct(lower, c.label), pct(upper, c.label)),
            "subpleural_fraction": round(int(depth_counts[0, c.label]) / n, 4) if n else None,
            "left_right_ratio": _ratio(pct(left, c.label), pct(right, c.label)),
        }
    fibrotic = int(sum(total[k] for k in FIBROTIC_LABELS))
    distribution = {
        "band_mm": maps.band_mm,
        "lung_subpleural_fraction": round(int(depth_counts[0, 1:].sum()) / lung_n, 4) if lung_n else None,
        "fibrotic_percent_of_lung": round(100.0 * fibrotic / lung_n, 4) if lung_n else 0.0,
        "fibrotic_volume_ml": round(fibrotic * ml, 6),
        "patterns": patterns,
    }
    return {"regions": regions, "sides": sides, "depth": depth, "distribution": distribution,
            "region_rules": {"zone": ZONE_RULE, "depth": DEPTH_RULE, "band_mm": maps.band_mm}}


# ------------------------------------------------------------ tables for people and programs

TABLE_COLUMNS = ("region", "side", "zone", "depth", "region_volume_ml", "label", "class", "voxels", "volume_ml",
                 "percent_of_region")


def table_rows(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per region x class (the whole lung, each side, each side x zone, each
    depth), with the columns of :data:`TABLE_COLUMNS`: what ``--table`` writes as CSV
    and what the Slicer panel's results table shows. ``report``: the report dict of
    :func:`~ILDSegmentationLib.analysis.pipeline.segment_file` (or of :func:`regional_volumes`
    merged with :func:`~ILDSegmentationLib.analysis.report.class_volumes`)."""
    out: List[Dict[str, Any]] = []

    def add(region: str, side: str, zone: str, depth: str, lung_ml: float, classes: List[Dict[str, Any]],
            percent_key: str = "percent_of_region") -> None:
        for c in classes:
            out.append({"region": region, "side": side, "zone": zone, "depth": depth, "region_volume_ml": lung_ml,
                        "label": c["label"], "class": c["name"], "voxels": c["voxels"], "volume_ml": c["volume_ml"],
                        "percent_of_region": c[percent_key]})

    if "classes" in report and "lung_volume_ml" in report:
        add("lung", "both", "all", "all", report["lung_volume_ml"], report["classes"], "percent_of_lung")
    for s in report.get("sides", []):
        add(f"{s['side']} lung", s["side"], "all", "all", s["lung_volume_ml"], s["classes"])
    for r in report.get("regions", []):
        add(f"{r['side']} {r['zone']}", r["side"], r["zone"], "all", r["lung_volume_ml"], r["classes"])
    for d in report.get("depth", []):
        add(d["depth"], "both", "all", d["depth"], d["lung_volume_ml"], d["classes"])
    return out


def table_csv(report: Dict[str, Any]) -> str:
    """:func:`table_rows` as CSV text (a header line, then one line per row)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table_rows(report))
    return buf.getvalue()


def _fmt_ratio(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_regions(report: Dict[str, Any]) -> str:
    """The printed summary of the regions: percent of each region's lung per class,
    then the distribution descriptors per pattern."""
    if not report.get("regions"):
        return ""
    head = f"{'region':<19}{'lung (mL)':>10}" + "".join(f"{c.abbreviation:>7}" for c in CLASSES)
    lines = ["percent of each region's lung per class:", head]
    items = [(f"{r['side']} {r['zone']}", r) for r in report["regions"]]
    items += [(f"{s['side']} lung", s) for s in report.get("sides", [])]
    items += [(f"{d['depth']} ({d['band_mm']:g} mm)" if d["depth"] == "subpleural" else d["depth"], d)
              for d in report.get("depth", [])]
    for name, r in items:
        lines.append(f"{name:<19}{r['lung_volume_ml']:>10.1f}"
                     + "".join(f"{c['percent_of_region']:>7.1f}" for c in r["classes"]))
    dist = report.get("distribution")
    if dist:
        lines.append(f"distribution (lower/upper and left/right: ratios of percent of zone or lung; subpleural: "
                     f"share of the pattern within {dist['band_mm']:g} mm of the costal pleura, lung "
                     f"{_fmt_ratio(dist['lung_subpleural_fraction'])}):")
        lines.append(f"{'pattern':<24}{'% lung':>8}{'lower/upper':>13}{'subpleural':>12}{'left/right':>12}")
        percent = {c["label"]: c["percent_of_lung"] for c in report.get("classes", [])}
        for c in CLASSES:
            p = dist["patterns"][c.segment_id]
            share = percent.get(c.label)
            lines.append(f"{c.name:<24}{'-' if share is None else f'{share:.1f}':>8}"
                         f"{_fmt_ratio(p['lower_upper_ratio']):>13}"
                         f"{_fmt_ratio(p['subpleural_fraction']):>12}{_fmt_ratio(p['left_right_ratio']):>12}")
        lines.append(f"fibrotic extent (reticulation + honeycombing): {dist['fibrotic_percent_of_lung']:.1f} % of "
                     f"the lung ({dist['fibrotic_volume_ml']:.1f} mL)")
    return "\n".join(lines)

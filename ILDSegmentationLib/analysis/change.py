"""Disease change between a baseline and a follow-up scan of one patient: the numbers
and the change map of ``ildseg compare``.

Each scan is measured **on its own grid** (:func:`scan_measures`: the class volumes
and regions of ``ildseg segment``), so the percentages of lung never pass through an
interpolation; the registration (:mod:`ILDSegmentationLib.imaging.registration`)
serves the change map and the matched pictures only. Percent of lung (not mL) is
what is compared first: the lung's volume changes with inspiration, the share of it
that a pattern occupies much less.

Per class and per region (whole lung, each lung, side x zone, subpleural band and
core, see :mod:`ILDSegmentationLib.regions`): ``baseline_percent``,
``followup_percent`` (percent of that region's lung), ``change_percent_points``
(follow-up minus baseline), ``baseline_ml``, ``followup_ml``, ``change_ml``.
The fibrotic extent is reticulation + honeycombing, percent of the lung.

**Significance**: a whole-lung change is ``significant`` when its magnitude exceeds
the minimum detectable change (:data:`MDC_PERCENT_POINTS`): the largest change the
tool itself reported when nothing had changed (the same CT moved a few degrees and
millimetres and resampled, cut at another slice phase, or given a lung mask one voxel
wider or narrower), measured by ``bench/compare_mdc.py`` on real CC BY CTs
(BENCHMARKS.md). Regional rows carry ``significant: null``: their spread was not
measured (regions are smaller, so it is larger).

**Change map** (:func:`change_map`), on the baseline grid, one label per voxel of the
baseline lung (``f`` the registered follow-up class, ``b`` the baseline class):

=========  ==================================================================
value      meaning
=========  ==================================================================
0          outside the baseline lung
1          healthy at both scans
2..6       the same pattern at both scans (value = class: 2 GGO ... 6 HC)
7          baseline lung that the registered follow-up lung does not cover
12..16     new pattern ``f`` (value 10 + f): ``f`` at follow-up, another class at
           baseline (a pattern turning into another counts as new ``f`` here)
22..26     resolved pattern ``b`` (value 20 + b): ``b`` at baseline, healthy at
           follow-up
=========  ==================================================================

The per-class voxel counts of the map's summary (:func:`voxel_changes`) count a
pattern turning into another as resolved for the one and new for the other.
Arrays are K, J, I; volumes mL; percentages of the region's lung.
"""
from __future__ import annotations

import csv
import io
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..classes import ANATOMIC_REGION, CLASSES, Code, by_label
from ..imaging.dicomseg import SegmentSpec
from ..imaging.geometry import Geometry
from .regions import DEFAULT_BAND_MM, FIBROTIC_LABELS, regional_volumes
from .report import class_volumes

#: Minimum detectable change per class (percentage points of the lung): the largest
#: |change| ``ildseg compare`` reported between a scan and itself moved (1-3 degrees
#: about each axis, 2-4 mm, resampled), cut half a slice apart, or with a lung mask one
#: voxel wider or narrower in plane, over 60 mm slabs of three CC BY CTs
#: (lidc-idri-0002, tcga-luad-tcga-17-z013 and -z015; 15 follow-ups) with the bundled
#: model, rounded up to 0.1 (``bench/compare_mdc.py``, BENCHMARKS.md). A change must
#: exceed it to be called significant. Ground glass is the least stable class (4.6 pp
#: from half a 5 mm slice of phase): thick slices blur its faint attenuation. These
#: depend on the model: with another model, measure them again with the same script.
MDC_PERCENT_POINTS: Dict[int, float] = {1: 3.1, 2: 4.7, 3: 1.8, 4: 0.6, 5: 0.3, 6: 0.7}
#: The same for the fibrotic extent (reticulation + honeycombing).
MDC_FIBROTIC_PERCENT_POINTS: float = 0.6

UNCOVERED = 7
NEW_OFFSET = 10
RESOLVED_OFFSET = 20
#: Names of the change map's label values (see the module docstring).
CHANGE_LABELS: Dict[int, str] = {
    1: "healthy, unchanged", UNCOVERED: "not covered by the follow-up",
    **{c.label: f"{c.name}, unchanged" for c in CLASSES if c.label != 1},
    **{NEW_OFFSET + c.label: f"{c.name}, new" for c in CLASSES if c.label != 1},
    **{RESOLVED_OFFSET + c.label: f"{c.name}, resolved" for c in CLASSES if c.label != 1},
}


def scan_measures(labels: np.ndarray, geometry: Geometry, band_mm: float = DEFAULT_BAND_MM) -> Dict[str, Any]:
    """What ``ildseg segment`` reports of one label map: class volumes (whole lung)
    and the regions (:func:`~ILDSegmentationLib.regions.regional_volumes`)."""
    return {**class_volumes(np.asarray(labels), geometry), **regional_volumes(labels, geometry, band_mm)}


def _region_items(measures: Dict[str, Any]) -> List[Dict[str, Any]]:
    """(name, lung mL, classes) of the whole lung and every region, in table order."""
    items = [{"region": "lung", "side": "both", "zone": "all", "depth": "all",
              "lung_ml": measures["lung_volume_ml"],
              "classes": [{**c, "percent_of_region": c["percent_of_lung"]} for c in measures["classes"]]}]
    for s in measures.get("sides", []):
        items.append({"region": f"{s['side']} lung", "side": s["side"], "zone": "all", "depth": "all",
                      "lung_ml": s["lung_volume_ml"], "classes": s["classes"]})
    for r in measures.get("regions", []):
        items.append({"region": f"{r['side']} {r['zone']}", "side": r["side"], "zone": r["zone"], "depth": "all",
                      "lung_ml": r["lung_volume_ml"], "classes": r["classes"]})
    for d in measures.get("depth", []):
        items.append({"region": d["depth"], "side": "both", "zone": "all", "depth": d["depth"],
                      "lung_ml": d["lung_volume_ml"], "classes": d["classes"]})
    return items


def _fibrotic(classes: Sequence[Dict[str, Any]]) -> float:
    return float(sum(c["percent_of_region"] for c in classes if c["label"] in FIBROTIC_LABELS))


def _class_change(b: Dict[str, Any], f: Dict[str, Any], mdc: Optional[float]) -> Dict[str, Any]:
    change = f["percent_of_region"] - b["percent_of_region"]
    return {"label": b["label"], "name": b["name"], "segment_id": by_label(b["label"]).segment_id,
            "baseline_percent": round(b["percent_of_region"], 4), "followup_percent": round(f["percent_of_region"], 4),
            "change_percent_points": round(change, 4),
            "baseline_ml": round(b["volume_ml"], 3), "followup_ml": round(f["volume_ml"], 3),
            "change_ml": round(f["volume_ml"] - b["volume_ml"], 3),
            "mdc_percent_points": mdc, "significant": None if mdc is None else bool(abs(change) > mdc)}


def change_summary(baseline: Dict[str, Any], followup: Dict[str, Any],
                   mdc: Optional[Dict[int, float]] = None,
                   mdc_fibrotic: float = MDC_FIBROTIC_PERCENT_POINTS) -> Dict[str, Any]:
    """Change between two :func:`scan_measures` results: ``lung`` (volumes), ``classes``
    (whole lung, per class, with ``significant``), ``fibrotic_extent`` (``baseline``,
    ``followup``, ``change`` in percent of lung / percentage points, mL, ``significant``)
    and ``regions`` (per region: lung mL at both, per class changes, fibrotic extent)."""
    mdc = MDC_PERCENT_POINTS if mdc is None else mdc
    b_items, f_items = _region_items(baseline), _region_items(followup)
    regions = []
    for n, (b, f) in enumerate(zip(b_items, f_items)):
        whole = n == 0
        classes = [_class_change(bc, fc, mdc.get(bc["label"]) if whole else None)
                   for bc, fc in zip(b["classes"], f["classes"])]
        fb, ff = _fibrotic(b["classes"]), _fibrotic(f["classes"])
        regions.append({"region": b["region"], "side": b["side"], "zone": b["zone"], "depth": b["depth"],
                        "baseline_lung_ml": b["lung_ml"], "followup_lung_ml": f["lung_ml"],
                        "fibrotic_extent": {"baseline": round(fb, 4), "followup": round(ff, 4),
                                            "change": round(ff - fb, 4)},
                        "classes": classes})
    whole = regions[0]
    fib_ml = [sum(c[k] for c in whole["classes"] if c["label"] in FIBROTIC_LABELS)
              for k in ("baseline_ml", "followup_ml")]
    fibrotic = {**whole["fibrotic_extent"], "unit": "percent of lung; change in percentage points",
                "baseline_ml": round(fib_ml[0], 3), "followup_ml": round(fib_ml[1], 3),
                "change_ml": round(fib_ml[1] - fib_ml[0], 3), "mdc_percent_points": mdc_fibrotic,
                "significant": bool(abs(whole["fibrotic_extent"]["change"]) > mdc_fibrotic)}
    return {"lung": {"baseline_ml": baseline["lung_volume_ml"], "followup_ml": followup["lung_volume_ml"],
                     "change_ml": round(followup["lung_volume_ml"] - baseline["lung_volume_ml"], 3)},
            "fibrotic_extent": fibrotic, "classes": whole["classes"], "regions": regions[1:]}


def change_map(baseline: np.ndarray, followup_on_baseline: np.ndarray) -> np.ndarray:
    """The change map (module docstring) from the baseline labels and the follow-up
    labels registered onto the baseline grid (both K, J, I, 0 outside the lung)."""
    b = np.asarray(baseline).astype(np.uint8)
    f = np.asarray(followup_on_baseline).astype(np.uint8)
    out = np.where(b == f, b, 0).astype(np.uint8)
    lung = b != 0
    out[lung & (f == 0)] = UNCOVERED
    differ = lung & (f != 0) & (b != f)
    new = differ & (f >= 2)
    out[new] = NEW_OFFSET + f[new]
    resolved = differ & (f == 1)
    out[resolved] = RESOLVED_OFFSET + b[resolved]
    return out


def voxel_changes(baseline: np.ndarray, followup_on_baseline: np.ndarray, geometry: Geometry) -> Dict[str, Any]:
    """Per pattern, mL of the baseline grid that is new, resolved or unchanged, and the
    baseline lung mL the registered follow-up lung does not cover."""
    b = np.asarray(baseline)
    f = np.asarray(followup_on_baseline)
    ml = geometry.voxel_volume_ml
    both = (b != 0) & (f != 0)
    out = {}
    for c in CLASSES:
        if c.label == 1:
            continue
        out[c.segment_id] = {"new_ml": round(float(np.count_nonzero(both & (f == c.label) & (b != c.label))) * ml, 3),
                             "resolved_ml": round(float(np.count_nonzero(both & (b == c.label) & (f != c.label))) * ml, 3),
                             "unchanged_ml": round(float(np.count_nonzero(both & (b == c.label) & (f == c.label))) * ml, 3)}
    return {"patterns": out, "not_covered_ml": round(float(np.count_nonzero((b != 0) & (f == 0))) * ml, 3)}


def _segment_color(value: int) -> Sequence[float]:
    if value == UNCOVERED:
        return (0.5, 0.5, 0.5)
    c = by_label(value % 10)
    if value < NEW_OFFSET:
        return tuple(0.55 * v for v in c.color)  # unchanged: the class colour, darker
    if value < RESOLVED_OFFSET:
        return c.color
    return tuple(0.5 + 0.5 * v for v in c.color)  # resolved: paler


def change_map_image(change: np.ndarray, reference: Any) -> Any:
    """The change map as a SimpleITK image on ``reference``'s grid, with Slicer's
    segmentation header (one named segment per label value of :data:`CHANGE_LABELS`),
    for writing as ``.seg.nrrd``."""
    from ..imaging.images import image_like
    from ..imaging.segfile import _extent
    image = image_like(np.asarray(change, np.uint8), reference)
    for key, value in (("MasterRepresentation", "Binary labelmap"), ("SourceRepresentation", "Binary labelmap"),
                       ("ContainedRepresentationNames", "Binary labelmap|"),
                       ("ReferenceImageExtentOffset", "0 0 0")):
        image.SetMetaData(f"Segmentation_{key}", value)
    for i, (value, name) in enumerate(sorted(CHANGE_LABELS.items())):
        key = f"Segment{i}_"
        image.SetMetaData(key + "ID", f"change_{value}")
        image.SetMetaData(key + "Name", name)
        image.SetMetaData(key + "NameAutoGenerated", "0")
        image.SetMetaData(key + "Color", " ".join(f"{v:g}" for v in _segment_color(value)))
        image.SetMetaData(key + "ColorAutoGenerated", "0")
        image.SetMetaData(key + "LabelValue", str(value))
        image.SetMetaData(key + "Layer", "0")
        image.SetMetaData(key + "Extent", _extent(np.asarray(change) == value))
    return image


#: Category of the segment "not covered by the follow-up" (baseline lung, no finding):
#: DICOM CID 7150 Segmentation Property Category; its type is the lung itself.
ANATOMICAL_STRUCTURE: Code = ("SCT", "91723000", "Anatomical Structure")
#: The change map's values in the order of their DICOM SEG segments: segment number n
#: (1..17; DICOM numbers segments from 1 without gaps) holds change map value
#: ``CHANGE_SEGMENT_VALUES[n - 1]``.
CHANGE_SEGMENT_VALUES: Tuple[int, ...] = tuple(sorted(CHANGE_LABELS))


def _change_description(value: int) -> str:
    """The segment's free text (at most 64 characters): its change map value and meaning."""
    if value == UNCOVERED:
        return f"value {value}: baseline lung the registered follow-up does not cover"
    name = by_label(value % 10).name.lower()
    if value < NEW_OFFSET:
        return f"value {value}: {name} at both scans"
    if value < RESOLVED_OFFSET:
        return f"value {value}: new {name} (other class at baseline)"
    return f"value {value}: resolved {name} (healthy at follow-up)"


def change_segments() -> List[SegmentSpec]:
    """The change map's values as DICOM SEG segments (numbered as
    :data:`CHANGE_SEGMENT_VALUES`): each labelled as in :data:`CHANGE_LABELS` (the class,
    then unchanged, new or resolved) and described by its class's DICOM codes (the
    property type of the pattern that is new, resolved or unchanged; "Normal" for healthy
    lung) with its change map color; baseline lung not covered by the follow-up is the
    lung as an anatomical structure."""
    out = []
    for number, value in enumerate(CHANGE_SEGMENT_VALUES, start=1):
        if value == UNCOVERED:
            out.append(SegmentSpec(number, CHANGE_LABELS[value], ANATOMIC_REGION, _segment_color(value),
                                   category=ANATOMICAL_STRUCTURE, description=_change_description(value)))
        else:
            out.append(SegmentSpec.of_class(by_label(value % 10), number, CHANGE_LABELS[value],
                                            tuple(_segment_color(value)), _change_description(value)))
    return out


def write_change_dicom_seg(change: np.ndarray, ct: Any, path: Any, parameters: Dict[str, str],
                           model_name: str = "", model_sha256: str = "") -> Any:
    """The change map (K, J, I on the baseline grid, values as in the module docstring)
    as a DICOM Segmentation over the baseline's DICOM series (``ct``: its
    :class:`~ILDSegmentationLib.imaging.io.Volume`), written to ``path`` through a
    temporary name. ``parameters``: the algorithm parameters it records."""
    from .. import __version__
    from ..imaging.dicomseg import ALGORITHM_NAME, SegmentationContent, write_segmentation_file
    lookup = np.zeros(256, np.uint8)
    lookup[list(CHANGE_SEGMENT_VALUES)] = np.arange(1, len(CHANGE_SEGMENT_VALUES) + 1)
    values = np.asarray(change, np.uint8)
    unknown = np.setdiff1d(np.unique(values), (0,) + CHANGE_SEGMENT_VALUES)
    if unknown.size:
        raise ValueError(f"values {unknown.tolist()} are not change map values")
    content = SegmentationContent("ILD_CHANGE", "ILD change since the baseline (research use, not clinical)",
                                  f"ILD change ({ALGORITHM_NAME} {__version__})", parameters, model_name,
                                  model_sha256)
    return write_segmentation_file(lookup[values], ct, path, change_segments(), content)


TABLE_COLUMNS = ("region", "side", "zone", "depth", "label", "class", "baseline_ml", "followup_ml", "change_ml",
                 "baseline_percent", "followup_percent", "change_percent_points", "mdc_percent_points",
                 "significant")


def change_table_csv(summary: Dict[str, Any]) -> str:
    """One CSV row per region x class (whole lung first), plus a fibrotic-extent row
    (label ``5+6``) per region; columns :data:`TABLE_COLUMNS`."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=TABLE_COLUMNS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    whole = {"region": "lung", "side": "both", "zone": "all", "depth": "all",
             "fibrotic_extent": summary["fibrotic_extent"], "classes": summary["classes"]}
    for r in [whole] + summary["regions"]:
        head = {k: r[k] for k in ("region", "side", "zone", "depth")}
        for c in r["classes"]:
            w.writerow({**head, **c, "class": c["name"], "mdc_percent_points": c["mdc_percent_points"] or "",
                        "significant": "" if c["significant"] is None else c["significant"]})
        fe = r["fibrotic_extent"]
        w.writerow({**head, "label": "5+6", "class": "Fibrotic (Ret + HC)",
                    "baseline_ml": fe.get("baseline_ml", ""), "followup_ml": fe.get("followup_ml", ""),
                    "change_ml": fe.get("change_ml", ""), "baseline_percent": fe["baseline"],
                    "followup_percent": fe["followup"], "change_percent_points": fe["change"],
                    "mdc_percent_points": fe.get("mdc_percent_points", ""), "significant": fe.get("significant", "")})
    return buf.getvalue()


def format_change(summary: Dict[str, Any]) -> str:
    """The printed summary: whole-lung change per class and the fibrotic extent."""
    lines = [f"{'class':<24}{'baseline %':>11}{'follow-up %':>12}{'change pp':>10}{'change mL':>11}  significant"]
    for c in summary["classes"]:
        lines.append(f"{c['name']:<24}{c['baseline_percent']:>11.2f}{c['followup_percent']:>12.2f}"
                     f"{c['change_percent_points']:>+10.2f}{c['change_ml']:>+11.1f}  "
                     f"{'yes' if c['significant'] else 'no'} (MDC {c['mdc_percent_points']:g} pp)")
    fe = summary["fibrotic_extent"]
    lines.append(f"fibrotic extent (reticulation + honeycombing): {fe['baseline']:.2f} % -> {fe['followup']:.2f} % "
                 f"of the lung, {fe['change']:+.2f} percentage points "
                 f"({'significant' if fe['significant'] else 'not significant'}: MDC {fe['mdc_percent_points']:g} pp)")
    return "\n".join(lines)

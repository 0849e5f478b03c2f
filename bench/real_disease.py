"""The bundled (or any) model on real COVID-19 disease: MedSeg slices with a
radiologist's ground glass / consolidation labels, and the RICORD 000082 CT.

    python bench/real_disease.py --model ILDSegmentationLib/models/default.safetensors \\
        --medseg ../shared/data/medseg-covid-slices \\
        --ricord ../shared/data/ricord-000082/ricord-000082-5mm.nii.gz \\
        --json real_disease.json --overlay-dir real_disease_overlays

Both data sets are non-commercial: they are used here to evaluate, never to train,
and nothing derived from their pixels belongs in the repository (the JSON holds only
numbers; the overlays go to ``--overlay-dir``, outside the checkout).

**MedSeg slices** (98 axial slices from SIRM cases, 8-bit JPEG in a display window,
no HU, no pixel spacing; label PNG 0 background, 1 GGO, 2 consolidation):

1. *Orientation.* The JPEGs are stored transposed: anterior on the image's left,
   the patient's left at the bottom. A transpose (a 90 degree rotation plus a
   mirror; a rotation alone would leave right and left swapped) gives the
   radiological view (anterior up, patient's right on the image's left): the heart,
   the descending aorta and the stomach then lie on the image's right and the liver
   on its left.
2. *Grey to HU.* The display is linear in HU between the window's ends, so
   ``HU = slope * grey + intercept`` is estimated per slice from three reference
   tissues (:func:`estimate_hu_mapping`): air in the airways or outside the body
   (-1000 HU), fat (-100 HU) and the soft-tissue peak (muscle and unenhanced blood,
   +40 HU). Air and soft tissue fix the line; fat, when the histogram shows its peak
   where the line puts -100 HU, is a third point and the residual of the three-point
   fit is reported. A slice whose air or soft tissue cannot be found (soft tissue
   saturated at 255, air clipped at 0, no airway in the slice) takes the set's
   median slope through the point it has, or the set's median line. The JSON lists
   every slice's points, line, implied window, residual and a propagated
   uncertainty (reference tissue values +-20 HU, peak positions +-1.5 grey levels).
3. *Pixel spacing.* Unknown; assumed 0.7 mm (a 512-pixel field of view of 360 mm,
   typical for an adult chest; the crops' lungs span 250-330 mm at 0.7 mm). The run
   is repeated at 0.6 and 0.8 mm (``--alt-spacings``) to show how the figures move.
4. *Lung mask.* The crops cut through the chest wall, so each slice is framed by a
   ring of +40 HU tissue (``PAD`` pixels) to close the body, then the automatic lung
   mask (:func:`ILDSegmentationLib.imaging.lungmask.compute_lung_mask`) runs on it as a
   one-slice volume. The automatic mask misses much dense disease, so the lung the
   model segments is the union of that mask and the radiologist's labels; the share
   of labelled pixels inside the automatic mask alone is reported too.
5. *Model.* ``Inferer(model, device).segment(hu, lung, geometry)`` at the model's
   pixel-size policy (the bundled model resamples to its 1.0-1.4 mm range).
6. *Figures.* For each truth class (GGO, consolidation), the share of its pixels
   given each of the six labels; the headline is GGO->GGO and Cons->Cons on the
   TestingSet (the TrainingSet is reported separately; neither was used to train).
   Also the labels given to the unlabelled rest of the lung.

**RICORD 000082** (HU, 1.41 x 1.41 x 5 mm): the automatic lung mask, the model, the
share of the lung given each label, and an overlay montage (``--overlay-dir``).

``--hu-shifts -30,30`` reruns the TestingSet with every slice's HU shifted by those
amounts, to show how much the mapping's uncertainty matters.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

import benchmain  # noqa: E402  (bench/benchmain.py: the checkout on the path, main()'s wrapper)

from ILDSegmentationLib.classes import CLASSES  # noqa: E402
from ILDSegmentationLib.errors import LungMaskError  # noqa: E402
from ILDSegmentationLib.imaging.geometry import Geometry  # noqa: E402

AIR_HU = -1000.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0  # muscle, unenhanced blood and heart: the soft-tissue peak
REFERENCE_SD_HU = 20.0  # how far a reference tissue may sit from its nominal value
PEAK_SD_GREY = 1.5  # how precisely a peak is located in a JPEG's histogram
PAD = 24  # pixels of soft tissue framing each MedSeg slice (the crops cut the chest wall)
PAD_HU = SOFT_TISSUE_HU
DEFAULT_SPACING_MM = 0.7
SLICE_MM = 1.0  # a nominal thickness for the one-slice volume; nothing depends on it
TRUTH = {1: "GGO", 2: "Consolidation"}
TRUTH_TARGET = {1: 2, 2: 4}  # MedSeg truth value -> the model's label for it
LABEL_NAMES = ["outside"] + [c.name for c in CLASSES]
SETS = {"TestingSet": "TestingSet/MultiClassInfection-Test", "TrainingSet": "TrainingSet/MultiClassInfection-Train"}


# --------------------------------------------------------------------------- HU mapping
@dataclass
class HUMapping:
    """``HU = slope * grey + intercept`` for one 8-bit display image."""

    slope: float
    intercept: float
    points: Dict[str, float] = field(default_factory=dict)  # reference tissue -> grey level used
    method: str = ""  # which points fixed the line
    residual_hu: Optional[float] = None  # RMS residual of the three-point fit
    uncertainty_hu: Optional[Dict[str, float]] = None  # propagated, at a few HU values
    notes: List[str] = field(default_factory=list)

    def to_hu(self, grey: np.ndarray) -> np.ndarray:
        return (self.slope * np.asarray(grey, dtype=np.float32) + self.intercept).astype(np.float32)

    @property
    def window(self) -> Tuple[float, float]:
        """Implied display window (level, width) in HU: grey 0..255 spans it."""
        lo, hi = self.intercept, self.slope * 255 + self.intercept
        return (0.5 * (lo + hi), hi - lo)

    def as_dict(self) -> Dict:
        d = asdict(self)
        d["window_level_width_hu"] = [round(v, 1) for v in self.window]
        return d


def otsu_threshold(hist: np.ndarray) -> int:
    p = hist / max(hist.sum(), 1)
    w = np.cumsum(p)
    m = np.cumsum(p * np.arange(p.size))
    between = (m[-1] * w - m) ** 2 / (w * (1 - w) + 1e-12)
    return int(np.argmax(between))


def _smoothed(hist: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    return ndimage.gaussian_filter1d(hist.astype(float), sigma)


def find_soft_tissue_peak(grey: np.ndarray, threshold: int) -> Tuple[Optional[float], str]:
    """Grey level of the highest peak above the lung/air threshold (below 255)."""
    hist = np.bincount(grey.ravel(), minlength=256)
    hs = _smoothed(hist)
    lo = threshold + 1
    if lo >= 250:
        return None, "no soft tissue above the threshold"
    g = lo + int(np.argmax(hs[lo:255]))
    if g >= 250:
        return None, f"soft tissue saturated (peak at grey {g})"
    # Refine to sub-grey precision with a parabola through the peak.
    if 0 < g < 255:
        a, b, c = hs[g - 1], hs[g], hs[g + 1]
        den = a - 2 * b + c
        if den < 0:
            return g + 0.5 * (a - c) / den, ""
    return float(g), ""


def find_air(grey: np.ndarray, threshold: int) -> Tuple[Optional[float], str]:
    """Grey level of air: the darkest uniform dark region other than the lungs
    (trachea, main bronchi, oesophagus, air outside the body)."""
    dark = grey < threshold
    labels, n = ndimage.label(dark)
    if n == 0:
        return None, "no dark region"
    sizes = np.bincount(labels.ravel())[1:]
    # Air is darker than aerated lung: a region above the darkest quarter of the
    # dark pixels (plus 2 sd of noise, 5 grey levels) is lung, fat or a
    # partial-volume airway, not air.
    ceiling = float(np.percentile(grey[dark], 25)) + 5
    big = 0.03 * grey.size  # lungs (and lung pieces) are larger than this
    best: Optional[Tuple[float, int]] = None
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or sizes[i - 1] < 20 or sizes[i - 1] > big:
            continue
        comp = labels[sl] == i
        core = ndimage.binary_erosion(comp, iterations=1)
        if core.sum() < 8:
            continue
        values = grey[sl][core]
        if values.std() > 15:
            continue
        med = float(np.median(values))
        if med > ceiling:
            continue
        if best is None or med < best[0]:
            best = (med, int(core.sum()))
    if best is None:
        return None, "no airway or outside air found"
    return best[0], ""


def find_fat_peak(grey: np.ndarray, threshold: int, predicted: float, soft: float) -> Optional[float]:
    """A local maximum of the histogram within 10 grey levels of where the line
    puts -100 HU, and at least 4 below the soft-tissue peak."""
    hist = np.bincount(grey.ravel(), minlength=256)
    hs = _smoothed(hist)
    lo = max(threshold + 1, int(math.floor(predicted - 10)))
    hi = min(int(math.ceil(predicted + 10)), int(soft - 4), 254)
    candidates = [g for g in range(max(lo, 1), hi + 1) if hs[g] > hs[g - 1] and hs[g] >= hs[g + 1]]
    if not candidates:
        return None
    return float(min(candidates, key=lambda g: abs(g - predicted)))


def _line_through(points: Sequence[Tuple[float, float]]) -> Tuple[float, float, Optional[float]]:
    g = np.array([p[0] for p in points], float)
    h = np.array([p[1] for p in points], float)
    slope, intercept = np.polyfit(g, h, 1)
    res = h - (slope * g + intercept)
    rms = float(np.sqrt(np.mean(res ** 2))) if len(points) > 2 else None
    return float(slope), float(intercept), rms


def _propagated_uncertainty(g_air: float, g_soft: float, at_hu: Sequence[float] = (-800, -600, -300, 0)) -> Dict[str, float]:
    """1-sigma error of HU(grey) for a two-point line through air and soft tissue,
    from the reference values' spread and the peaks' location error."""
    def hu_of(g, ga, gs, ha, hs):  # HU of grey g on the line through (ga, ha), (gs, hs)
        return ha + (hs - ha) * (g - ga) / (gs - ga)
    out = {}
    for h in at_hu:
        g = g_air + (h - AIR_HU) * (g_soft - g_air) / (SOFT_TISSUE_HU - AIR_HU)  # grey of h, nominal line
        terms = []
        for dga, dgs, dha, dhs in ((PEAK_SD_GREY, 0, 0, 0), (0, PEAK_SD_GREY, 0, 0),
                                   (0, 0, REFERENCE_SD_HU, 0), (0, 0, 0, REFERENCE_SD_HU)):
            terms.append(hu_of(g, g_air + dga, g_soft + dgs, AIR_HU + dha, SOFT_TISSUE_HU + dhs) - h)
        out[str(int(h))] = round(float(np.sqrt(np.sum(np.square(terms)))), 1)
    return out


def estimate_hu_mapping(grey: np.ndarray) -> HUMapping:
    """Per-slice linear grey -> HU mapping from air, fat and soft tissue (see module
    docstring). Returns a mapping with ``method`` '' and NaN slope when neither line
    can be drawn (the caller falls back on the set's median)."""
    grey = np.asarray(grey)
    if grey.dtype != np.uint8:
        grey = np.clip(np.round(grey), 0, 255).astype(np.uint8)
    hist = np.bincount(grey.ravel(), minlength=256)
    t = otsu_threshold(hist)
    notes = []
    g_soft, why = find_soft_tissue_peak(grey, t)
    if why:
        notes.append(why)
    g_air, why = find_air(grey, t)
    if why:
        notes.append(why)
    if g_air is not None and g_air <= 2:
        notes.append(f"air clipped at grey {g_air:.0f} (window starts above -1000 HU)")
        g_air = None
    points: Dict[str, float] = {}
    if g_air is not None:
        points["air"] = g_air
    if g_soft is not None:
        points["soft_tissue"] = g_soft
    if g_air is None or g_soft is None or g_soft - g_air < 40:
        return HUMapping(float("nan"), float("nan"), points, "", None, None, notes)
    slope = (SOFT_TISSUE_HU - AIR_HU) / (g_soft - g_air)
    predicted_fat = g_air + (FAT_HU - AIR_HU) / slope
    g_fat = find_fat_peak(grey, t, predicted_fat, g_soft)
    pts = [(g_air, AIR_HU), (g_soft, SOFT_TISSUE_HU)]
    method = "air+soft tissue"
    if g_fat is not None:
        points["fat"] = g_fat
        pts.append((g_fat, FAT_HU))
        method = "air+fat+soft tissue"
    slope, intercept, rms = _line_through(pts)
    mapping = HUMapping(slope, intercept, points, method, rms, _propagated_uncertainty(g_air, g_soft), notes)
    level, width = mapping.window
    if not (600 <= width <= 2600 and -1600 <= intercept <= -600):
        mapping.notes.append(f"implausible window L {level:.0f} W {width:.0f}: not used; air point dropped")
        mapping.slope = mapping.intercept = float("nan")
        mapping.method = ""
        mapping.points.pop("air", None)  # the soft-tissue peak is the firmer of the two
        mapping.points.pop("fat", None)
        mapping.residual_hu = mapping.uncertainty_hu = None
    return mapping


def complete_mappings(mappings: List[HUMapping]) -> Dict[str, float]:
    """Fill slices without a usable line from the set's median slope (through the
    point they have) or median line; returns the set's summary."""
    good = [m for m in mappings if m.method]
    if not good:
        raise RuntimeError("no slice of the set gave a grey -> HU line")
    slopes = np.array([m.slope for m in good])
    intercepts = np.array([m.intercept for m in good])
    med_slope, med_int = float(np.median(slopes)), float(np.median(intercepts))
    for m in mappings:
        if m.method:
            continue
        if "air" in m.points:
            m.slope, m.intercept, m.method = med_slope, AIR_HU - med_slope * m.points["air"], "air+set median slope"
        elif "soft_tissue" in m.points:
            m.slope = med_slope
            m.intercept = SOFT_TISSUE_HU - med_slope * m.points["soft_tissue"]
            m.method = "soft tissue+set median slope"
        else:
            m.slope, m.intercept, m.method = med_slope, med_int, "set median line"
    own_levels = [m.window[0] for m in good]
    own_widths = [m.window[1] for m in good]
    hu_at = {g: np.array([m.slope * g + m.intercept for m in mappings]) for g in (64, 128)}
    residuals = [m.residual_hu for m in mappings if m.residual_hu is not None]
    unc600 = [m.uncertainty_hu["-600"] for m in mappings if m.uncertainty_hu]
    methods: Dict[str, int] = {}
    for m in mappings:
        methods[m.method] = methods.get(m.method, 0) + 1
    return {
        "slices": len(mappings),
        "methods": methods,
        "slope_hu_per_grey_median": round(med_slope, 3),
        "slope_iqr_own_lines": [round(float(v), 3) for v in np.percentile(slopes, [25, 75])],
        "own_lines": len(good),
        "window_width_hu_median": round(med_slope * 255, 0),
        "window_level_hu_median": round(float(np.median([m.window[0] for m in mappings])), 0),
        "window_level_iqr_own_lines": [round(float(v), 0) for v in np.percentile(own_levels, [25, 75])],
        "window_width_iqr_own_lines": [round(float(v), 0) for v in np.percentile(own_widths, [25, 75])],
        "window_level_iqr_all": [round(float(v), 0) for v in np.percentile([m.window[0] for m in mappings], [25, 75])],
        "three_point_fit_rms_residual_hu_median": round(float(np.median(residuals)), 1) if residuals else None,
        "three_point_fits": len(residuals),
        "propagated_sd_at_minus600_hu_median": round(float(np.median(unc600)), 1) if unc600 else None,
        "hu_of_grey_64_median_iqr": [round(float(v), 0) for v in np.percentile(hu_at[64], [50, 25, 75])],
        "hu_of_grey_128_median_iqr": [round(float(v), 0) for v in np.percentile(hu_at[128], [50, 25, 75])],
    }


# --------------------------------------------------------------------------- MedSeg slices
@dataclass
class MedSegSlice:
    name: str
    grey: np.ndarray  # radiological orientation (transposed from the file)
    truth: np.ndarray  # 0 background, 1 GGO, 2 consolidation; same orientation


def read_medseg_set(root: Path, set_name: str) -> List[MedSegSlice]:
    from PIL import Image
    folder = Path(root) / SETS[set_name]
    out = []
    for img in sorted((folder / "Imgs").glob("*.jpg"), key=lambda p: (len(p.stem), p.stem)):
        gt = folder / "GT" / (img.stem + ".png")
        if not gt.exists():
            continue
        grey = np.asarray(Image.open(img).convert("L"))
        truth = np.asarray(Image.open(gt))
        if truth.ndim == 3:
            truth = truth[..., 0]
        if truth.shape != grey.shape:
            raise ValueError(f"{gt} and {img} differ in size")
        # Stored transposed: see the module docstring.
        out.append(MedSegSlice(img.stem, np.ascontiguousarray(grey.T), np.ascontiguousarray(truth.T)))
    return out


def padded_hu(hu: np.ndarray) -> np.ndarray:
    return np.pad(hu, PAD, mode="constant", constant_values=PAD_HU)


def slice_geometry(spacing_mm: float) -> Geometry:
    """A one-slice volume in radiological display: rows A->P (+y), columns R->L (+x)."""
    return Geometry((spacing_mm, spacing_mm, SLICE_MM))


def lung_mask_of_slice(hu: np.ndarray, spacing_mm: float) -> Tuple[Optional[np.ndarray], str]:
    """Automatic lung mask of one (unpadded) HU slice, or None and the reason."""
    from ILDSegmentationLib.imaging.lungmask import compute_lung_mask
    try:
        m = compute_lung_mask(padded_hu(hu)[np.newaxis], slice_geometry(spacing_mm))[0]
    except LungMaskError as e:
        return None, str(e)
    return m[PAD:-PAD, PAD:-PAD] > 0, ""


class ConfusionCounts:
    """Pixels of each truth class (MedSeg 1 GGO, 2 consolidation; 0 the unlabelled
    rest of the evaluated lung) given each label 0..6 (0: outside the lung)."""

    def __init__(self) -> None:
        self.counts = np.zeros((3, len(LABEL_NAMES)), dtype=np.int64)

    def add(self, truth: np.ndarray, predicted: np.ndarray, lung: np.ndarray) -> None:
        truth = np.asarray(truth)
        predicted = np.asarray(predicted)
        sel = np.asarray(lung, bool) | (truth > 0)
        idx = truth[sel].astype(np.int64) * len(LABEL_NAMES) + predicted[sel].astype(np.int64)
        self.counts += np.bincount(idx, minlength=self.counts.size).reshape(self.counts.shape)

    def shares(self, truth_value: int) -> Dict[str, float]:
        row = self.counts[truth_value]
        total = row.sum()
        return {name: (float(row[i]) / total if total else float("nan")) for i, name in enumerate(LABEL_NAMES)}

    def correct_share(self, truth_value: int) -> float:
        row = self.counts[truth_value]
        return float(row[TRUTH_TARGET[truth_value]]) / row.sum() if row.sum() else float("nan")

    def summary(self) -> Dict:
        out = {}
        for v, name in ((1, "GGO"), (2, "Consolidation"), (0, "unlabelled_lung")):
            d = {"pixels": int(self.counts[v].sum()),
                 "labels_given": {k: round(s, 4) for k, s in self.shares(v).items()}}
            if v in TRUTH_TARGET:
                d["share_labelled_" + ("GGO" if v == 1 else "Consolidation")] = round(self.correct_share(v), 4)
            out[name] = d
        return out


def evaluate_medseg(model, slices: List[MedSegSlice], mappings: List[HUMapping], spacing_mm: float,
                    device: str = "cpu", hu_shift: float = 0.0, log=print) -> Dict:
    from ILDSegmentationLib.engine.inference import Inferer
    inferer = Inferer(model, device=device)
    conf = ConfusionCounts()
    in_auto = np.zeros(3, np.int64)  # GGO, Cons pixels inside the automatic mask; index by truth
    totals = np.zeros(3, np.int64)
    per_slice = []
    mask_failures = []
    network_spacing = None
    for s, m in zip(slices, mappings):
        hu = m.to_hu(s.grey) + np.float32(hu_shift)
        auto, why = lung_mask_of_slice(hu, spacing_mm)
        if auto is None:
            mask_failures.append(f"{s.name}: {why}")
            auto = np.zeros(hu.shape, bool)
        lung = auto | (s.truth > 0)
        for v in (1, 2):
            totals[v] += int((s.truth == v).sum())
            in_auto[v] += int(((s.truth == v) & auto).sum())
        res = inferer.segment(padded_hu(hu)[np.newaxis], padded_hu(lung.astype(np.uint8))[np.newaxis],
                              slice_geometry(spacing_mm))
        network_spacing = res.network_pixel_spacing_mm
        pred = res.labels[0][PAD:-PAD, PAD:-PAD]
        conf.add(s.truth, pred, lung)
        one = ConfusionCounts()
        one.add(s.truth, pred, lung)
        per_slice.append({"slice": s.name, "ggo_pixels": int((s.truth == 1).sum()),
                          "cons_pixels": int((s.truth == 2).sum()),
                          "ggo_to_ggo": _r(one.correct_share(1)), "cons_to_cons": _r(one.correct_share(2)),
                          "lung_mask": "automatic" if auto.any() else "labels only"})
    out = conf.summary()
    out["share_of_labelled_pixels_inside_automatic_mask"] = {
        "GGO": _r(in_auto[1] / totals[1]) if totals[1] else None,
        "Consolidation": _r(in_auto[2] / totals[2]) if totals[2] else None}
    out["automatic_mask_failed"] = mask_failures
    out["assumed_pixel_spacing_mm"] = spacing_mm
    out["network_pixel_spacing_mm"] = list(network_spacing) if network_spacing else None
    out["hu_shift"] = hu_shift
    out["per_slice"] = per_slice
    ggo_slices = [p["ggo_to_ggo"] for p in per_slice if p["ggo_pixels"] >= 100]
    out["per_slice_ggo_to_ggo_median_iqr"] = [_r(v) for v in np.percentile(ggo_slices, [50, 25, 75])] if ggo_slices else None
    return out


def _r(v, n: int = 4):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), n)


# --------------------------------------------------------------------------- RICORD
def evaluate_ricord(model, path: Path, device: str = "cpu", overlay_dir: Optional[Path] = None) -> Dict:
    from ILDSegmentationLib.engine.inference import Inferer
    from ILDSegmentationLib.imaging.io import read_ct
    from ILDSegmentationLib.imaging.lungmask import compute_lung_mask
    ct = read_ct(path)
    hu = np.asarray(ct.array)
    mask = compute_lung_mask(hu, ct.geometry)
    res = Inferer(model, device=device).segment(hu, mask, ct.geometry)
    lung = mask > 0
    counts = np.bincount(res.labels[lung].ravel(), minlength=len(LABEL_NAMES))
    out = {"ct": str(path), "lung_voxels": int(lung.sum()),
           "lung_volume_ml": round(float(lung.sum()) * ct.geometry.voxel_volume_ml, 1),
           "class_share_of_lung": {LABEL_NAMES[i]: round(float(counts[i]) / lung.sum(), 4)
                                   for i in range(1, len(LABEL_NAMES))},
           "network_pixel_spacing_mm": list(res.network_pixel_spacing_mm or ())}
    shares = out["class_share_of_lung"]
    out["ggo_above_reticulation"] = bool(shares["Ground glass opacity"] > shares["Reticulation"])
    if overlay_dir is not None:
        from ILDSegmentationLib.analysis.overlay import render_overlay
        overlay_dir.mkdir(parents=True, exist_ok=True)
        p = render_overlay(hu, res.labels, ct.geometry, overlay_dir / "ricord-000082_overlay.png",
                           title=f"RICORD 000082, model {Path(model.path).name}")
        out["overlay"] = str(p)
    return out


# --------------------------------------------------------------------------- CLI
def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _fmt_pct(v) -> str:
    return "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:5.1f}"


def print_medseg_table(title: str, res: Dict) -> None:
    print(f"\n{title} (pixels {res['assumed_pixel_spacing_mm']} mm assumed, network at "
          f"{res['network_pixel_spacing_mm']}, HU shift {res['hu_shift']:+g})")
    abbr = ["out"] + [c.abbreviation for c in CLASSES]
    print(f"  {'truth':<16}{'pixels':>9}  " + " ".join(f"{a:>6}" for a in abbr) + "   (% of the truth class)")
    for key in ("GGO", "Consolidation", "unlabelled_lung"):
        row = res[key]
        print(f"  {key:<16}{row['pixels']:>9}  " + " ".join(f"{_fmt_pct(v):>6}" for v in row["labels_given"].values()))
    inside = res["share_of_labelled_pixels_inside_automatic_mask"]
    print(f"  labelled pixels inside the automatic lung mask: GGO {_fmt_pct(inside['GGO'])} %, "
          f"consolidation {_fmt_pct(inside['Consolidation'])} %; automatic mask failed on "
          f"{len(res['automatic_mask_failed'])} slices")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model file (default: the bundled model)")
    ap.add_argument("--medseg", type=Path, help="the medseg-covid-slices folder")
    ap.add_argument("--ricord", type=Path, help="ricord-000082-5mm.nii.gz")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--overlay-dir", type=Path, help="write the RICORD overlay here (keep it out of the repository)")
    ap.add_argument("--spacing", type=float, default=DEFAULT_SPACING_MM, help="assumed MedSeg pixel spacing, mm")
    ap.add_argument("--alt-spacings", default="0.6,0.8", help="also run the TestingSet at these spacings ('' for none)")
    ap.add_argument("--hu-shifts", default="", help="also run the TestingSet with HU shifted by these (e.g. -30,30)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.medseg is None and args.ricord is None:
        ap.error("give --medseg and/or --ricord")

    from ILDSegmentationLib.engine.modelfile import load_model
    model = load_model(args.model)
    out: Dict = {"model": str(model.path), "model_sha256": model.sha256,
                 "command": " ".join([Path(sys.argv[0]).name] + list(sys.argv[1:] if argv is None else argv)),
                 "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.perf_counter()
    if args.medseg is not None:
        out["medseg"] = {}
        for set_name in SETS:
            slices = read_medseg_set(args.medseg, set_name)
            mappings = [estimate_hu_mapping(s.grey) for s in slices]
            summary = complete_mappings(mappings)
            entry = {"slices": len(slices), "hu_mapping": summary,
                     "hu_mapping_per_slice": {s.name: m.as_dict() for s, m in zip(slices, mappings)}}
            print(f"\n{set_name}: {len(slices)} slices; grey->HU: {summary['methods']}; median window "
                  f"L {summary['window_level_hu_median']:.0f} W {summary['window_width_hu_median']:.0f} HU "
                  f"(IQR over the {summary['own_lines']} slices with their own line: L {summary['window_level_iqr_own_lines']}, "
                  f"W {summary['window_width_iqr_own_lines']}); "
                  f"3-point fit RMS residual median {summary['three_point_fit_rms_residual_hu_median']} HU "
                  f"over {summary['three_point_fits']} slices; propagated 1-sd at -600 HU "
                  f"{summary['propagated_sd_at_minus600_hu_median']} HU")
            res = evaluate_medseg(model, slices, mappings, args.spacing, args.device)
            entry[f"spacing_{args.spacing}"] = res
            print_medseg_table(f"{set_name}", res)
            if set_name == "TestingSet":
                for sp in [float(v) for v in args.alt_spacings.split(",") if v.strip()]:
                    r = evaluate_medseg(model, slices, mappings, sp, args.device)
                    entry[f"spacing_{sp}"] = r
                    print_medseg_table(f"{set_name}", r)
                for shift in [float(v) for v in args.hu_shifts.split(",") if v.strip()]:
                    r = evaluate_medseg(model, slices, mappings, args.spacing, args.device, hu_shift=shift)
                    entry[f"spacing_{args.spacing}_shift_{shift:+g}"] = r
                    print_medseg_table(f"{set_name}", r)
            out["medseg"][set_name] = entry
        test = out["medseg"]["TestingSet"][f"spacing_{args.spacing}"]
        out["targets"] = {"medseg_test_ggo_to_ggo": test["GGO"]["share_labelled_GGO"],
                          "medseg_test_cons_to_cons": test["Consolidation"]["share_labelled_Consolidation"],
                          "target": ">= 0.50 each (issue 13)"}
    if args.ricord is not None:
        r = evaluate_ricord(model, args.ricord, args.device, args.overlay_dir)
        out["ricord"] = r
        print(f"\nRICORD 000082: lung {r['lung_volume_ml']} mL (automatic mask), network at "
              f"{r['network_pixel_spacing_mm']} mm")
        for k, v in r["class_share_of_lung"].items():
            print(f"  {k:<22}{100 * v:6.1f} %")
        print(f"  more GGO than reticulation: {r['ggo_above_reticulation']}" +
              (f"; overlay {r['overlay']}" if "overlay" in r else ""))
        if "targets" in out:
            out["targets"]["ricord_ggo_above_reticulation"] = r["ggo_above_reticulation"]
    out["seconds"] = round(time.perf_counter() - t0, 1)
    if "targets" in out:
        t = out["targets"]
        print(f"\nTargets (issue 13): MedSeg test GGO->GGO {_fmt_pct(t['medseg_test_ggo_to_ggo'])} % "
              f"(>= 50), Cons->Cons {_fmt_pct(t['medseg_test_cons_to_cons'])} % (>= 50)" +
              (f", RICORD GGO > reticulation: {t.get('ricord_ggo_above_reticulation')}" if "ricord" in out else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=_json_default))
    return 0


if __name__ == "__main__":
    benchmain.run_script(main)

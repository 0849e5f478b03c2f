"""Is this image plausibly a chest CT in Hounsfield units?

The network reads HU: a label map, a probability map, an MR series, a CT whose DICOM
rescale was lost (raw stored values 0..4095, air near 0 instead of -1000) or a CT
already windowed to grey levels 0..255 would all be "segmented" without a word, and
the result would look like an answer. :func:`check_ct_in_hu` looks at the metadata
(the DICOM Modality, when the input is a DICOM series or file) and at the values
(their range, how many distinct values there are, and the air/lung and soft-tissue
peaks of the histogram). It refuses (:class:`NotCTInHUError`, one line naming what was
seen) what cannot be a chest CT in HU, returns warnings where it is doubtful, and a
record of what it checked, which goes into the report.

Every chest CT in HU holds air and lung (about -1000 to -500 HU) and soft tissue
(about 0 to 60 HU, fat down to -100): the rules below rest on that.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from ..errors import InputError

#: DICOM Modality (0008,0060) values that are certainly not a CT.
NOT_CT_MODALITIES = {
    "MR": "magnetic resonance", "PT": "PET", "NM": "nuclear medicine", "US": "ultrasound",
    "CR": "computed radiography", "DX": "digital radiography", "MG": "mammography", "XA": "X-ray angiography",
    "RF": "radio fluoroscopy", "SEG": "a segmentation", "RTSTRUCT": "RT structures", "RTDOSE": "an RT dose map",
    "OCT": "optical coherence tomography", "SM": "slide microscopy", "XC": "a photograph", "ES": "endoscopy",
}
MODALITY_TAG = "0008|0060"

#: Below this many voxels the histogram's peaks say nothing; only the value range is judged.
MIN_VOXELS_FOR_PEAKS = 10_000
#: Voxels sampled for the histogram (evenly strided), enough for peaks to 25 HU.
_SAMPLE = 2_000_000
AIR_RANGE = (-1300.0, -400.0)    # air outside the body (-1000) and lung parenchyma (-900..-700)
SOFT_RANGE = (-200.0, 200.0)     # fat (-100), water (0), muscle and blood (40-60)
MIN_FRACTION = 0.005             # share of the voxels each range must hold


class NotCTInHUError(InputError):
    """The input cannot be a CT in Hounsfield units (a label map, an MR series...)."""


def _values_text(values: np.ndarray) -> str:
    shown = [f"{v:g}" for v in values[:6]]
    if len(values) == 1:
        return f"only the value {shown[0]}"
    if len(values) == 2:
        return f"only the values {shown[0]} and {shown[1]}"
    if len(values) <= 6:
        return f"only the {len(values)} values {', '.join(shown[:-1])} and {shown[-1]}"
    return f"only {len(values)} distinct values ({shown[0]} to {values[-1]:g})"


def _peak(sample: np.ndarray, lo: float, hi: float) -> Optional[float]:
    """Centre of the fullest 25 HU bin in [lo, hi), or None when empty."""
    inside = sample[(sample >= lo) & (sample < hi)]
    if inside.size == 0:
        return None
    edges = np.arange(lo, hi + 25, 25.0)
    counts, _ = np.histogram(inside, edges)
    k = int(np.argmax(counts))
    return float(edges[k] + 12.5)


def check_ct_in_hu(array: np.ndarray, name: str, modality: Optional[str] = None) -> Dict[str, Any]:
    """Judge whether ``array`` (the voxels as read, after any DICOM rescale) is
    plausibly a chest CT in HU. Raises :class:`NotCTInHUError` when it cannot be
    one; otherwise returns what was checked, with ``warnings`` (possibly empty) for
    what is doubtful. ``name`` names the input in messages; ``modality`` is the DICOM
    Modality, or None when the file format has none (NRRD, NIfTI, MHA)."""
    a = np.asarray(array)
    record: Dict[str, Any] = {"modality": modality or None, "checks": [], "warnings": []}
    checks: List[str] = record["checks"]
    warnings: List[str] = record["warnings"]
    what = f"the CT {name}"

    if modality:
        checks.append("DICOM Modality")
        m = modality.strip().upper()
        if m in NOT_CT_MODALITIES:
            raise NotCTInHUError(f"{what} is a DICOM series of Modality {m} ({NOT_CT_MODALITIES[m]}), not CT: "
                                 "ildseg needs a CT in HU")
        if m != "CT":
            warnings.append(f"{what} has DICOM Modality {m!r}, not CT: the values are read as HU")
    if a.size == 0:
        return record

    flat = a.reshape(-1)
    sample = flat[:: max(1, flat.size // _SAMPLE)].astype(np.float64, copy=False)
    lo, hi = float(a.min()), float(a.max())
    record["value_range"] = [lo, hi]
    checks.append("value range")
    distinct = np.unique(sample[:200_000]) if sample.size else sample
    few = distinct.size <= 16 and np.unique(sample).size <= 16
    integer = bool(np.all(np.mod(distinct, 1) == 0))
    if few:
        distinct = np.unique(sample)
        record["distinct_values"] = int(distinct.size)
    checks.append("distinct values")

    if few and integer and lo >= 0 and hi <= 255:
        raise NotCTInHUError(f"{what} holds {_values_text(distinct)}: a label map, not a CT in HU")
    if max(abs(lo), abs(hi)) <= 10:
        kind = ("a probability map or a normalized image" if lo >= 0 and hi <= 1
                else "a normalized or rescaled image")
        raise NotCTInHUError(f"{what} holds values from {lo:g} to {hi:g} only: {kind}, not a CT in HU "
                             "(air is about -1000 HU, soft tissue 0 to 60 HU)")
    if lo >= 0 and hi <= 255:
        raise NotCTInHUError(f"{what} holds values from {lo:g} to {hi:g} only: an 8-bit picture (a CT windowed "
                             "to grey levels?), not a CT in HU (air is about -1000 HU)")

    big = a.size >= MIN_VOXELS_FOR_PEAKS
    if lo >= 0:
        # Raw stored values: air near 0 and soft tissue near 1024 (a lost RescaleIntercept of -1024),
        # or another modality altogether.
        low_peak = _peak(sample, 0, 300) if big else None
        tissue_peak = _peak(sample, 800, 1300) if big else None
        if low_peak is not None and tissue_peak is not None \
                and np.mean(sample < 300) >= MIN_FRACTION and np.mean((sample >= 800) & (sample < 1300)) >= MIN_FRACTION:
            raise NotCTInHUError(f"{what} has no value below 0 ({lo:g} to {hi:g}), with air near {low_peak:g} and "
                                 f"soft tissue near {tissue_peak:g} instead of -1000 and 0 to 60: raw stored values "
                                 "of a CT whose DICOM rescale (RescaleIntercept, usually -1024) was lost, "
                                 "not a CT in HU")
        raise NotCTInHUError(f"{what} has no value below 0 ({lo:g} to {hi:g}): a chest CT in HU holds air and "
                             "lung at -1000 to -500 HU (another modality, or raw values whose DICOM rescale "
                             "was lost?)")

    if not big:
        record["histogram"] = f"not judged (under {MIN_VOXELS_FOR_PEAKS} voxels)"
        return record
    checks.append("air/lung and soft-tissue peaks of the histogram")
    air_share = float(np.mean((sample >= AIR_RANGE[0]) & (sample < AIR_RANGE[1])))
    soft_share = float(np.mean((sample >= SOFT_RANGE[0]) & (sample < SOFT_RANGE[1])))
    record["air_peak_hu"] = _peak(sample, *AIR_RANGE)
    record["soft_tissue_peak_hu"] = _peak(sample, *SOFT_RANGE)
    record["air_share"] = round(air_share, 4)
    record["soft_tissue_share"] = round(soft_share, 4)
    if air_share < MIN_FRACTION:
        warnings.append(f"{what} has almost no air or lung (under {MIN_FRACTION:.1%} of its voxels between "
                        f"{AIR_RANGE[0]:g} and {AIR_RANGE[1]:g} HU; values {lo:g} to {hi:g}): is it a chest CT in HU?")
    if soft_share < MIN_FRACTION:
        warnings.append(f"{what} has almost no soft tissue (under {MIN_FRACTION:.1%} of its voxels between "
                        f"{SOFT_RANGE[0]:g} and {SOFT_RANGE[1]:g} HU; values {lo:g} to {hi:g}): is it a CT in HU?")
    return record

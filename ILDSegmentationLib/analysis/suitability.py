"""Is this scan suitable? What the input tells about how it was acquired.

The paper's network was trained and tested on HRCT: slices 1-2 mm thick, a sharp
(lung) reconstruction kernel, no contrast. A scan that departs from that is still
segmented (a check never refuses), but the report says so, as ``input_checks``: a
list of ``{"check", "status": "ok" | "warning", "detail"}``, and ``ildseg segment``
prints the warnings.

What each check reads: DICOM tags when the CT was read from DICOM (the first file of
the series), the geometry and the voxels otherwise.

=====================  ==========================================================
check                  warning when
=====================  ==========================================================
slice_thickness        thicker than 3 mm (SliceThickness, else the slice spacing),
                       or slices spaced more than 1.5x their thickness (gaps)
reconstruction_kernel  a smooth or medium kernel (ConvolutionKernel, table below)
contrast               a contrast agent recorded (ContrastBolusAgent), or a series
                       description naming contrast
patient_position       decubitus; or the lung's gravity gradient contradicting the
                       recorded position; without a tag, an anteriorly denser lung
lung_coverage          lung on the first or last axial slice (>= 5 % of the largest
                       slice's lung area): apex or base cut off
pixel_size             the network ran outside the model's pixel range, or the CT's
                       pixels are more than 1.5x away from it
noise                  soft-tissue noise above 100 HU
=====================  ==========================================================

Prone scans (common in ILD work, to tell dependent density from early fibrosis) are
said so and are handled: the image's direction cosines, not the array order, place
the patient's right/left and anterior/posterior, so regions and pictures follow the
patient (tested with prone geometry in Testing/Python/test_regions.py).
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..imaging.geometry import Geometry, as_volume, canonical_view

log = logging.getLogger(__name__)

#: Above this slice thickness (mm) fine texture is averaged away (the paper: 1-2 mm).
MAX_SLICE_THICKNESS_MM = 3.0
#: Slices spaced more than this many times their thickness leave gaps (sequential HRCT).
MAX_SPACING_OVER_THICKNESS = 1.5
#: Lung on an end slice covering at least this share of the largest slice's lung: cut off.
CUT_LUNG_SHARE = 0.05
#: Soft-tissue noise (HU) above which texture is doubtful. Sharp lung kernels at
#: routine dose give about 50-90 HU (CPTAC C3N-00247, Siemens B70f: 68 HU, the
#: noisiest CT of the shared data); smooth kernels 6-20 HU. Above 100 HU the noise is
#: of the order of the attenuation change of faint ground glass (100-200 HU).
MAX_NOISE_HU = 100.0
#: Pixels more than this factor away from the model's range lose or invent detail on resampling.
PIXEL_FACTOR = 1.5
#: Lung attenuation gradient (HU, posterior minus anterior third) that counts as a clear
#: gravity gradient. Supine CTs of the shared data: +22 to +46 HU (one, with contrast
#: and a sharp kernel, +9 HU).
GRAVITY_GRADIENT_HU = 10.0

TAGS = {
    "slice_thickness": "0018|0050", "kernel": "0018|1210", "contrast_agent": "0018|0010",
    "contrast_route": "0018|1040", "position": "0018|5100", "series_description": "0008|103e",
    "protocol": "0018|1030", "manufacturer": "0008|0070", "model": "0008|1090",
}
POSITIONS = {
    "HFS": "head first, supine", "FFS": "feet first, supine", "HFP": "head first, prone",
    "FFP": "feet first, prone", "HFDR": "head first, decubitus right", "HFDL": "head first, decubitus left",
    "FFDR": "feet first, decubitus right", "FFDL": "feet first, decubitus left",
}
# Reconstruction kernels by vendor convention: sharp = lung/bone/edge kernels, which
# HRCT uses; smooth = soft-tissue/standard kernels.
_GE_SHARP = {"LUNG", "BONE", "BONEPLUS", "EDGE", "SHARP", "HD LUNG", "CHST"}
_GE_SMOOTH = {"STANDARD", "SOFT", "DETAIL", "SMOOTH", "ULTRA", "STND"}
_CONTRAST_WORDS = re.compile(r"(\bC\+|\bKM\b|contrast|kontrast|\bCE\b|enhanced|angio|arterial|venous|portal)", re.I)
_NO_CONTRAST_WORDS = re.compile(r"(non[- ]?contrast|w/o|without|\bC-|nativ|\bNC\b|unenhanced|plain)", re.I)


def _check(name: str, status: str, detail: str) -> Dict[str, str]:
    return {"check": name, "status": status, "detail": detail}


def dicom_tags(dicom_files: Sequence[str]) -> Dict[str, str]:
    """The tags of :data:`TAGS` (name -> stripped value) of the series' first file; empty
    without DICOM files or when they cannot be read again."""
    if not dicom_files:
        return {}
    import SimpleITK as sitk
    from ..imaging.io import itk_silenced
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(dicom_files[0]))
    try:
        with itk_silenced():
            reader.ReadImageInformation()
    except RuntimeError:  # the file changed since it was read: no tags rather than no result
        return {}
    keys = set(reader.GetMetaDataKeys())
    return {name: reader.GetMetaData(tag).strip() for name, tag in TAGS.items() if tag in keys}


def kernel_sharpness(kernel: str) -> Optional[str]:
    """'sharp', 'medium' or 'smooth' for a ConvolutionKernel value, None when unknown.

    Siemens B/Br/Bl/I/Hr/Qr + number: >= 50 sharp, 40-49 medium, below smooth; GE:
    LUNG, BONE, BONEPLUS, EDGE sharp, STANDARD, SOFT, DETAIL smooth; Canon/Toshiba FC +
    number: >= 50 sharp (lung), below smooth; Philips: L, D, E, Y* sharp, C medium, A,
    B smooth."""
    k = kernel.split("\\")[0].strip().upper()
    if not k:
        return None
    if k in _GE_SHARP:
        return "sharp"
    if k in _GE_SMOOTH:
        return "smooth"
    m = re.fullmatch(r"FC(\d{1,2})", k)
    if m:
        return "sharp" if int(m.group(1)) >= 50 else "smooth"
    m = re.fullmatch(r"(?:B|BR|BL|BV|I|IR|HR|QR|BF|BR|J)(\d{2})[A-Z]?\d?", k.replace(" ", ""))
    if m:
        n = int(m.group(1))
        return "sharp" if n >= 50 else "medium" if n >= 40 else "smooth"
    if re.fullmatch(r"L|D|E|Y[A-F]?", k):
        return "sharp"
    if k == "C":
        return "medium"
    if k in ("A", "B"):
        return "smooth"
    return None


def gravity_gradient_hu(hu_c: np.ndarray, lung_c: np.ndarray) -> Optional[float]:
    """Median lung attenuation (HU) of the posterior third of the lung's rows minus that
    of the anterior third (canonical view: rows run anterior -> posterior). Lying
    supine, the dependent (posterior) lung is denser by a few tens of HU; prone, the
    anterior. None for a lung too small to judge."""
    z, y, x = np.nonzero(lung_c)
    if z.size < 1000:
        return None
    lo, hi = np.percentile(y, [100 / 3, 200 / 3])
    values = hu_c[z, y, x]
    front, back = values[y <= lo], values[y >= hi]
    if front.size == 0 or back.size == 0:
        return None
    return float(np.median(back)) - float(np.median(front))


def _thickness(tags: Dict[str, str], slice_mm: float, slices: int) -> Dict[str, str]:
    recorded = _number(tags.get("slice_thickness"))
    if recorded is not None and recorded > 0:
        thick, source = recorded, "DICOM SliceThickness"
    elif slices < 2:
        return _check("slice_thickness", "ok", "one slice, thickness not recorded; the paper's HRCT had 1-2 mm")
    else:
        thick, source = slice_mm, "the slice spacing; the file records no thickness"
    text = f"{thick:.3g} mm slices ({source}); the paper's HRCT had 1-2 mm"
    if thick > MAX_SLICE_THICKNESS_MM:
        return _check("slice_thickness", "warning",
                      f"{text}: above {MAX_SLICE_THICKNESS_MM:g} mm the fine texture the model reads (micronodules, "
                      "reticulation, honeycomb walls) is averaged within the slice, and its labels are less "
                      "reliable")
    if recorded is not None and recorded > 0 and slice_mm > MAX_SPACING_OVER_THICKNESS * recorded:
        return _check("slice_thickness", "warning",
                      f"{recorded:.3g} mm slices every {slice_mm:.3g} mm (gaps between slices, as in sequential "
                      "HRCT): volumes assume each slice stands for the whole spacing")
    return _check("slice_thickness", "ok", text)


def _kernel(tags: Dict[str, str]) -> Dict[str, str]:
    kernel = tags.get("kernel", "")
    if not kernel:
        why = "no DICOM tags" if not tags else "not in the DICOM tags"
        return _check("reconstruction_kernel", "ok", f"not recorded ({why}); HRCT uses a sharp (lung) kernel")
    sharp = kernel_sharpness(kernel)
    maker = f"{tags['manufacturer']} " if tags.get("manufacturer") else ""
    if sharp in ("smooth", "medium"):
        return _check("reconstruction_kernel", "warning",
                      f"{sharp} kernel {maker}{kernel}: HRCT (the paper's data) uses a sharp lung kernel; a "
                      "smoother one blurs fine reticulation and micronodules, which the model may then miss")
    if sharp == "sharp":
        return _check("reconstruction_kernel", "ok", f"sharp kernel {maker}{kernel}, as HRCT uses")
    return _check("reconstruction_kernel", "ok", f"kernel {maker}{kernel}: its sharpness is not in ildseg's table")


def _contrast(tags: Dict[str, str]) -> Dict[str, str]:
    if not tags:
        return _check("contrast", "ok", "not recorded (no DICOM tags); HRCT is taken without contrast")
    agent = tags.get("contrast_agent", "")
    if agent and agent.upper() not in ("NONE", "NO", "N", "0", "-"):
        route = f", {tags['contrast_route']}" if tags.get("contrast_route") else ""
        return _check("contrast", "warning",
                      f"contrast agent recorded ({agent}{route}): enhanced vessels are brighter than in the "
                      "non-contrast HRCT the model expects, and may be labelled micronodules or consolidation")
    described = " / ".join(tags[k] for k in ("series_description", "protocol") if tags.get(k))
    if described and _CONTRAST_WORDS.search(described) and not _NO_CONTRAST_WORDS.search(described):
        return _check("contrast", "warning",
                      f"no contrast agent tag, but the series is described as '{described}': if contrast was "
                      "given, enhanced vessels may be labelled micronodules or consolidation")
    return _check("contrast", "ok", "no contrast agent recorded")


def _position(tags: Dict[str, str], gradient: Optional[float]) -> Dict[str, str]:
    code = tags.get("position", "").upper()
    grad = "" if gradient is None else f"; lung {abs(gradient):.0f} HU denser {'posteriorly' if gradient >= 0 else 'anteriorly'}"
    handled = ("the image's direction places the patient's right/left and anterior/posterior, so regions and "
               "pictures follow the patient, not the table")
    if code in POSITIONS:
        what = f"{POSITIONS[code]} ({code})"
        if "decubitus" in what:
            return _check("patient_position", "warning",
                          f"{what}{grad}: gravity runs right-left, so dependent density lies in one lung's "
                          f"lateral part; {handled}")
        prone = "prone" in what
        if gradient is not None and (gradient > 1.5 * GRAVITY_GRADIENT_HU if prone
                                     else gradient < -1.5 * GRAVITY_GRADIENT_HU):
            return _check("patient_position", "warning",
                          f"{what}{grad}, the opposite of what lying {'prone' if prone else 'supine'} gives: is "
                          "anterior/posterior swapped in the file's direction, or the position tag wrong?")
        if prone:
            return _check("patient_position", "ok",
                          f"{what}{grad}: prone scans are common in ILD work (dependent density clears when "
                          f"prone); {handled}")
        return _check("patient_position", "ok", f"{what}{grad}")
    if gradient is None:
        return _check("patient_position", "ok", "not recorded, and the lung is too small to tell")
    if gradient > GRAVITY_GRADIENT_HU:
        return _check("patient_position", "ok", f"not recorded{grad}, as lying supine gives")
    if gradient < -GRAVITY_GRADIENT_HU:
        return _check("patient_position", "warning",
                      f"not recorded{grad}: a prone scan, or anterior/posterior swapped in the file's direction; "
                      f"{handled}")
    return _check("patient_position", "ok", f"not recorded{grad}: no clear gravity gradient")


def _coverage(lung_c: np.ndarray, slice_mm: float) -> Dict[str, str]:
    area = lung_c.reshape(lung_c.shape[0], -1).sum(axis=1).astype(np.float64)
    if area.max() <= 0:
        return _check("lung_coverage", "ok", "no lung")
    share_top, share_bottom = area[0] / area.max(), area[-1] / area.max()
    cut = [name for name, share in (("apex (first slice)", share_top), ("base (last slice)", share_bottom))
           if share >= CUT_LUNG_SHARE]
    if cut:
        return _check("lung_coverage", "warning",
                      f"lung cut off at the {' and '.join(cut)}: the scan ends inside the lung "
                      f"({share_top:.0%} and {share_bottom:.0%} of the largest slice's lung area on the first and "
                      "last slice); volumes and zones are those of the part scanned")
    with_lung = np.flatnonzero(area)
    above = with_lung[0] * slice_mm
    below = (len(area) - 1 - with_lung[-1]) * slice_mm
    return _check("lung_coverage", "ok", f"whole lung in the scan ({above:.0f} mm above the apex, {below:.0f} mm "
                                         "below the base)")


def _pixel_size(pixel_mm: Tuple[float, float], model_range: Optional[Sequence[float]],
                network_mm: Optional[Sequence[float]]) -> Dict[str, str]:
    from ..engine.resolution import SPACING_TOLERANCE
    own = f"{pixel_mm[0]:.3g} x {pixel_mm[1]:.3g} mm pixels"
    if model_range is None:
        return _check("pixel_size", "ok", f"{own}; the model records no training range")
    lo, hi = float(model_range[0]), float(model_range[1])
    rng = f"the model's range {lo:.3g}-{hi:.3g} mm"
    inside = all(lo * (1 - SPACING_TOLERANCE) <= s <= hi * (1 + SPACING_TOLERANCE) for s in pixel_mm)
    if inside:
        return _check("pixel_size", "ok", f"{own}, within {rng}")
    if network_mm is None:  # a caller that did not say what the network ran at
        return _check("pixel_size", "ok", f"{own}, outside {rng} (--pixel-spacing model, the default, resamples "
                                          "such a CT into it)")
    ran = tuple(network_mm)
    ran_inside = all(lo * (1 - SPACING_TOLERANCE) <= s <= hi * (1 + SPACING_TOLERANCE) for s in ran)
    far = any(s < lo / PIXEL_FACTOR or s > hi * PIXEL_FACTOR for s in pixel_mm)
    if not ran_inside:
        return _check("pixel_size", "warning",
                      f"{own}, outside {rng}, and the network ran at them (--pixel-spacing native): it sees "
                      "every structure at another size than in training")
    done = f"resampled to {ran[0]:.3g} x {ran[1]:.3g} mm for the network, labels brought back"
    if far:
        return _check("pixel_size", "warning",
                      f"{own}, more than {PIXEL_FACTOR:g}x outside {rng}; {done}, but texture finer than the "
                      "CT's pixels cannot be restored (or is smoothed away)")
    return _check("pixel_size", "ok", f"{own}, outside {rng}; {done}")


def _noise(hu_c: np.ndarray, spacing: Sequence[float]) -> Dict[str, str]:
    from ..imaging.noise import estimate_noise
    model = estimate_noise(hu_c, spacing)
    if model.tiles == 0:
        return _check("noise", "ok", "not measured (too little flat fat or soft tissue in the scan)")
    sd = model.sd_hu
    text = f"{sd:.0f} HU noise in flat fat and soft tissue"
    if sd > MAX_NOISE_HU:
        return _check("noise", "warning",
                      f"{text}, above {MAX_NOISE_HU:g} HU: as large as the attenuation change of faint ground glass, "
                      "so the texture the model reads is doubtful (a low-dose scan with a sharp kernel?)")
    return _check("noise", "ok", text)


def _number(text: Optional[str]) -> Optional[float]:
    try:
        return float(str(text).split("\\")[0]) if text else None
    except ValueError:
        return None


def input_checks(hu: np.ndarray, lung: np.ndarray, geometry: Geometry, *, dicom_files: Sequence[str] = (),
                 model_pixel_range: Optional[Sequence[float]] = None,
                 network_pixel_mm: Optional[Sequence[float]] = None) -> List[Dict[str, str]]:
    """The checks of the module docstring, in its table's order. ``hu``: the CT (HU,
    K, J, I or J, I); ``lung``: its lung mask or label map (non-zero = lung), same
    shape; ``dicom_files``: the series' files (:attr:`ILDSegmentationLib.imaging.io.Volume.dicom_files`), empty
    for other formats; ``model_pixel_range``: (smallest, largest) in-plane pixel
    spacing (mm) the model was trained at; ``network_pixel_mm``: the (row, column)
    spacing the network ran at. Never raises for what it finds: a check that cannot
    run says so in its detail."""
    view = canonical_view(geometry)
    hu_c = view.to_canonical(as_volume(np.asarray(hu)))
    lung_c = view.to_canonical(as_volume(np.asarray(lung))) != 0
    spacing = view.canonical_spacing(geometry)
    tags = dicom_tags(dicom_files)
    checks = [
        _thickness(tags, spacing[0], hu_c.shape[0]),
        _kernel(tags),
        _contrast(tags),
        _position(tags, gravity_gradient_hu(hu_c, lung_c)),
        _coverage(lung_c, spacing[0]),
        _pixel_size((spacing[1], spacing[2]), model_pixel_range, network_pixel_mm),
        _noise(hu_c, spacing),
    ]
    return checks


def warning_lines(report: Dict[str, Any]) -> List[str]:
    """One line per input check that warns, '<check>: <detail>', for printing and for
    the Slicer panel. ``report``: the report dict (``input_checks`` key)."""
    return [f"{c['check'].replace('_', ' ')}: {c['detail']}" for c in report.get("input_checks", [])
            if c.get("status") == "warning"]

"""DICOM Segmentation objects (``.dcm``) of the six classes, for the archive.

A DICOM Segmentation (SOP Class 1.2.840.10008.5.1.4.1.1.66.4) is written with
highdicom over the DICOM series the CT was read from: one segment per class
(segment number = label value 1..6), each with the class's DICOM/SNOMED codes from
:mod:`ILDSegmentationLib.classes` (the codes the Slicer terminology file and ``.seg.nrrd`` segments
carry), the lung as its anatomic region, its display color, and the algorithm's
identification (name ``ILDSegmentation``, the package version, and the model's name
and file sha256 as algorithm parameters). Every frame references the CT slice it was
derived from (SOP Instance UID), and the object joins the CT's study.

Segmentation type BINARY, not LABELMAP: LABELMAP is a SOP class of its own
(Supplement 243, 2024) that 3D Slicer's QuantitativeReporting (through dcmqi), OHIF and
most archives did not read as of 2025, while BINARY "Segmentation Storage" is read by
all of them; empty frames are left out (a segment absent from a slice costs nothing),
and a class absent from the whole CT is still described, with no frames.

highdicom and pydicom are an optional extra (``pip install ildsegmentation[dicom]``):
they are imported only when a DICOM SEG is written or checked for.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import __version__
from .atomicfile import atomic_path
from ..classes import ANATOMIC_REGION, CATEGORY, CLASSES, Code
from ..errors import InputError

PathLike = Union[str, "os.PathLike[str]"]

ALGORITHM_NAME = "ILDSegmentation"
#: The extension that asks ``ildseg segment -o`` for a DICOM Segmentation.
DICOM_SEG_EXTENSION = ".dcm"
#: Series number of the segmentation: the CT's own plus this (a common convention
#: that keeps derived series after their source in a viewer's series list).
SERIES_NUMBER_OFFSET = 1000
#: Positions of the CT slices and of the SimpleITK grid must agree to this (mm).
POSITION_TOLERANCE_MM = 0.01


def is_dicom_seg_path(path: Optional[PathLike]) -> bool:
    """True for an output name that asks for a DICOM Segmentation (``*.dcm``)."""
    return path is not None and str(path).lower().endswith(DICOM_SEG_EXTENSION)


def require_highdicom() -> Tuple[Any, Any]:
    """The highdicom and pydicom modules, or InputError in one line saying how to install them."""
    try:
        import highdicom
        import pydicom
    except ImportError as e:
        raise InputError(f"a DICOM Segmentation output needs highdicom and pydicom ({e}): "
                         "pip install 'ildsegmentation[dicom]'") from None
    return highdicom, pydicom


def check_dicom_source(ct_path: PathLike, output: PathLike) -> None:
    """Before any work: ``output`` (a DICOM SEG) can be made from ``ct_path``, which must
    be a DICOM series folder (or one DICOM file); highdicom must be installed."""
    from .io import _looks_like_dicom
    p = Path(ct_path)
    if not (p.is_dir() or (p.is_file() and _looks_like_dicom(p))):
        raise InputError(f"DICOM SEG output {Path(output).name} needs a DICOM series as input, but the CT "
                         f"{p.name} is not DICOM: write .seg.nrrd, .nrrd, .nii.gz or .mha instead")
    require_highdicom()


def _rgb_to_dicom_lab(rgb: Tuple[float, float, float]) -> List[int]:
    """sRGB in 0..1 -> DICOM's scaled CIELab (PS3.3 C.10.7.1.1): L* 0..100 -> 0..65535,
    a*, b* -128..127 -> 0..65535; D65 white point."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = m @ np.array(linear) / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
    scaled = (lab[0] * 65535 / 100, (lab[1] + 128) * 65535 / 255, (lab[2] + 128) * 65535 / 255)
    return [int(round(min(max(v, 0), 65535))) for v in scaled]


def _read_sources(files: Sequence[str], pydicom: Any) -> List[Any]:
    """The CT's DICOM headers (no pixel data: highdicom needs only the attributes)."""
    sources = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as e:  # pydicom raises several types for a damaged file
            raise InputError(f"DICOM file {Path(f).name} cannot be read for the DICOM SEG: {e}") from None
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise InputError(f"DICOM file {Path(f).name} is a multi-frame image: a DICOM SEG is written only "
                             "over a series of single-frame slices")
        if "SOPInstanceUID" not in ds or "SeriesInstanceUID" not in ds:
            raise InputError(f"DICOM file {Path(f).name} has no SOP or Series Instance UID: a DICOM SEG "
                             "cannot reference it")
        sources.append(ds)
    return sources


def _check_slice_order(sources: Sequence[Any], reference: Any, shape: Tuple[int, ...]) -> None:
    """Frame k of the segmentation lies on source slice k: the headers' positions equal
    the grid's (a mismatch would shift every label onto another slice)."""
    n, rows, cols = shape
    if len(sources) != n:
        raise InputError(f"the labels have {n} slices but the DICOM series has {len(sources)} files")
    for k, ds in enumerate(sources):
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise InputError(f"DICOM file of slice {k} is {ds.Rows} x {ds.Columns}, the labels {rows} x {cols}")
        if "ImagePositionPatient" not in ds:
            continue  # a single slice without position (a 2D CT): nothing to misplace
        expected = np.array(reference.TransformIndexToPhysicalPoint((0, 0, k) if reference.GetDimension() == 3
                                                                    else (0, 0)))
        got = np.array([float(v) for v in ds.ImagePositionPatient])[:len(expected)]
        if np.abs(got - expected).max() > POSITION_TOLERANCE_MM:
            raise InputError(f"DICOM slice {k} lies at {got.round(3).tolist()} mm, not at the CT grid's "
                             f"{expected.round(3).tolist()} mm: cannot reference the series")


def _coded(hd: Any, code: Code) -> Any:
    scheme, value, meaning = code
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def segment_descriptions(hd: Any, model_name: str, model_sha256: str) -> List[Any]:
    """One highdicom SegmentDescription per class, numbered by the label value."""
    from pydicom.sr.codedict import codes
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, version=__version__, family=codes.cid7162.ArtificialIntelligence,
        parameters={"model": model_name, "model_sha256": model_sha256})
    out = []
    for c in CLASSES:
        d = hd.seg.SegmentDescription(
            segment_number=c.label, segment_label=c.name,
            segmented_property_category=_coded(hd, CATEGORY), segmented_property_type=_coded(hd, c.type_code),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            anatomic_regions=[_coded(hd, ANATOMIC_REGION)])
        if c.type_modifier is not None:
            # "Lung, Normal": the modifier sits inside the property type's code item (PS3.3 C.8.20.2).
            d.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                _coded(hd, c.type_modifier)]
        d.RecommendedDisplayCIELabValue = _rgb_to_dicom_lab(c.color)
        out.append(d)
    return out


def build_dicom_seg(labels: np.ndarray, ct: Any, *, model_name: str, model_sha256: str) -> Any:
    """The DICOM Segmentation (a pydicom Dataset) of ``labels`` (uint8 0..6, K,J,I on
    the CT's grid, as the engine returns them) over the DICOM series ``ct`` was read
    from (:attr:`~.io.Volume.dicom_files`)."""
    hd, pydicom = require_highdicom()
    if not ct.dicom_files:
        raise InputError("a DICOM SEG needs a DICOM series as input; this CT was not read from DICOM")
    volume = labels.reshape((-1,) + labels.shape[-2:]).astype(np.uint8, copy=False)
    if volume.max(initial=0) > len(CLASSES):
        raise ValueError(f"labels above {len(CLASSES)} in the label map")
    sources = _read_sources(ct.dicom_files, pydicom)
    _check_slice_order(sources, ct.image, volume.shape)
    with warnings.catch_warnings():
        # highdicom warns about the CT's own patient name when it has one component
        # (common after de-identification): nothing the user of ildseg can change.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name",
                                category=UserWarning)
        return _segmentation(hd, volume, sources, model_name, model_sha256)


def _segmentation(hd: Any, volume: np.ndarray, sources: List[Any], model_name: str, model_sha256: str) -> Any:
    first = sources[0]
    try:
        series_number = int(first.get("SeriesNumber") or 0) + SERIES_NUMBER_OFFSET
    except (TypeError, ValueError):
        series_number = SERIES_NUMBER_OFFSET
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=volume,  # a label map: value v is segment v, 0 is no segment
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(hd, model_name, model_sha256),
        series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=ALGORITHM_NAME, manufacturer_model_name=f"{ALGORITHM_NAME} {model_name}"[:64],
        software_versions=__version__, device_serial_number=model_sha256[:16],
        content_label="ILD_PATTERNS", content_description="ILD patterns (research use, not for clinical use)",
        series_description=f"ILD patterns ({ALGORITHM_NAME} {__version__})"[:64],
        omit_empty_frames=True)


def write_dicom_seg(labels: np.ndarray, ct: Any, path: PathLike, *, model_name: str, model_sha256: str) -> Path:
    """Write :func:`build_dicom_seg` to ``path`` through a temporary name."""
    seg = build_dicom_seg(labels, ct, model_name=model_name, model_sha256=model_sha256)
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return Path(path)

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

Other label maps over the same series (``ildseg compare``'s change map) are written
with :func:`build_segmentation` from their own :class:`SegmentSpec` list, described by
the same codes, colors and algorithm identification.

highdicom and pydicom are an optional extra (``pip install ildsegmentation[dicom]``):
they are imported only when a DICOM SEG is written or checked for.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import __version__
from .atomicfile import atomic_path
from ..classes import ANATOMIC_REGION, CATEGORY, CLASSES, Code, TissueClass
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


def check_dicom_source(ct_path: PathLike, output: PathLike, what: str = "the CT",
                       instead: str = "write .seg.nrrd, .nrrd, .nii.gz or .mha instead") -> None:
    """Before any work: ``output`` (a DICOM SEG) can be made from ``ct_path`` (``what``,
    in the message), which must be a DICOM series folder (or one DICOM file); highdicom
    must be installed. ``instead``: what the refusal suggests."""
    from .io import _looks_like_dicom
    p = Path(ct_path)
    if not (p.is_dir() or (p.is_file() and _looks_like_dicom(p))):
        raise InputError(f"DICOM SEG output {Path(output).name} needs a DICOM series as input, but {what} "
                         f"{p.name} is not DICOM: {instead}")
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


@dataclass(frozen=True)
class SegmentSpec:
    """What one segment of a DICOM SEG says: its number (1..N without gaps, the value
    of its voxels in the volume given to :func:`build_segmentation`), its label (at
    most 64 characters), its segmented property category, type and type modifier
    codes, its display color (sRGB 0..1) and an optional free-text description."""

    number: int
    label: str
    type_code: Code
    color: Tuple[float, float, float]
    category: Code = CATEGORY
    type_modifier: Optional[Code] = None
    description: Optional[str] = None

    @classmethod
    def of_class(cls, c: TissueClass, number: Optional[int] = None, label: Optional[str] = None,
                 color: Optional[Tuple[float, float, float]] = None,
                 description: Optional[str] = None) -> "SegmentSpec":
        """A segment described by the codes of class ``c`` (:mod:`ILDSegmentationLib.classes`);
        by default numbered, named and colored as the class."""
        return cls(c.label if number is None else number, c.name if label is None else label, c.type_code,
                   c.color if color is None else color, CATEGORY, c.type_modifier, description)


#: The six classes' segments, numbered by their label values.
CLASS_SEGMENTS: Tuple[SegmentSpec, ...] = tuple(SegmentSpec.of_class(c) for c in CLASSES)


def algorithm_identification(hd: Any, parameters: Dict[str, str]) -> Any:
    """The algorithm every segment names: ILDSegmentation, the package version, the
    artificial-intelligence family, and ``parameters`` (e.g. the model's name and sha256)."""
    from pydicom.sr.codedict import codes
    return hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, version=__version__, family=codes.cid7162.ArtificialIntelligence,
        parameters=dict(parameters) or None)


def segment_description(hd: Any, spec: SegmentSpec, algorithm: Any) -> Any:
    """The highdicom SegmentDescription of ``spec``: its codes, the lung as its
    anatomic region, its color as DICOM CIELab, made automatically by ``algorithm``."""
    d = hd.seg.SegmentDescription(
        segment_number=spec.number, segment_label=spec.label,
        segmented_property_category=_coded(hd, spec.category), segmented_property_type=_coded(hd, spec.type_code),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        anatomic_regions=[_coded(hd, ANATOMIC_REGION)])
    if spec.type_modifier is not None:
        # "Lung, Normal": the modifier sits inside the property type's code item (PS3.3 C.8.20.2).
        d.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _coded(hd, spec.type_modifier)]
    if spec.description:
        d.SegmentDescription = spec.description[:64]  # (0062,0006), LO
    d.RecommendedDisplayCIELabValue = _rgb_to_dicom_lab(spec.color)
    return d


def segment_descriptions(hd: Any, model_name: str, model_sha256: str) -> List[Any]:
    """One highdicom SegmentDescription per class, numbered by the label value."""
    algorithm = algorithm_identification(hd, {"model": model_name, "model_sha256": model_sha256})
    return [segment_description(hd, spec, algorithm) for spec in CLASS_SEGMENTS]


@dataclass(frozen=True)
class SegmentationContent:
    """What a DICOM SEG says of itself: its content label (CS, capitals, at most 16
    characters), content and series descriptions, and the algorithm's parameters."""

    label: str
    description: str
    series_description: str
    parameters: Dict[str, str]
    model_name: str = ""
    model_sha256: str = ""


def build_segmentation(volume: np.ndarray, ct: Any, segments: Sequence[SegmentSpec],
                       content: SegmentationContent) -> Any:
    """A DICOM Segmentation (a pydicom Dataset) over the DICOM series ``ct`` was read
    from (:attr:`~.io.Volume.dicom_files`): ``volume`` holds, per voxel (K, J, I on the
    CT's grid), the number of its segment in ``segments`` (0: none)."""
    hd, pydicom = require_highdicom()
    if not ct.dicom_files:
        raise InputError("a DICOM SEG needs a DICOM series as input; this CT was not read from DICOM")
    volume = volume.reshape((-1,) + volume.shape[-2:]).astype(np.uint8, copy=False)
    numbers = [s.number for s in segments]
    if numbers != list(range(1, len(segments) + 1)):
        raise ValueError(f"segment numbers must run 1..{len(segments)}, not {numbers}")
    if volume.max(initial=0) > len(segments):
        raise ValueError(f"values above {len(segments)} in the segment volume")
    sources = _read_sources(ct.dicom_files, pydicom)
    _check_slice_order(sources, ct.image, volume.shape)
    with warnings.catch_warnings():
        # highdicom warns about the CT's own patient name when it has one component
        # (common after de-identification): nothing the user of ildseg can change.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name",
                                category=UserWarning)
        algorithm = algorithm_identification(hd, content.parameters)
        return _segmentation(hd, volume, sources, [segment_description(hd, s, algorithm) for s in segments], content)


def build_dicom_seg(labels: np.ndarray, ct: Any, *, model_name: str, model_sha256: str) -> Any:
    """The DICOM Segmentation (a pydicom Dataset) of ``labels`` (uint8 0..6, K,J,I on
    the CT's grid, as the engine returns them) over the DICOM series ``ct`` was read
    from (:attr:`~.io.Volume.dicom_files`)."""
    if np.asarray(labels).max(initial=0) > len(CLASSES):
        raise ValueError(f"labels above {len(CLASSES)} in the label map")
    content = SegmentationContent(
        "ILD_PATTERNS", "ILD patterns (research use, not for clinical use)",
        f"ILD patterns ({ALGORITHM_NAME} {__version__})", {"model": model_name, "model_sha256": model_sha256},
        model_name, model_sha256)
    return build_segmentation(np.asarray(labels), ct, CLASS_SEGMENTS, content)


def _segmentation(hd: Any, volume: np.ndarray, sources: List[Any], descriptions: List[Any],
                  content: SegmentationContent) -> Any:
    first = sources[0]
    try:
        series_number = int(first.get("SeriesNumber") or 0) + SERIES_NUMBER_OFFSET
    except (TypeError, ValueError):
        series_number = SERIES_NUMBER_OFFSET
    model = f"{ALGORITHM_NAME} {content.model_name}".strip()
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=volume,  # a label map: value v is segment v, 0 is no segment
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=ALGORITHM_NAME, manufacturer_model_name=model[:64],
        software_versions=__version__, device_serial_number=content.model_sha256[:16] or "none",
        content_label=content.label, content_description=content.description[:64],
        series_description=content.series_description[:64],
        omit_empty_frames=True)


def write_segmentation_file(volume: np.ndarray, ct: Any, path: PathLike, segments: Sequence[SegmentSpec],
                            content: SegmentationContent) -> Path:
    """Write :func:`build_segmentation` to ``path`` through a temporary name."""
    return _save(build_segmentation(volume, ct, segments, content), path)


def write_dicom_seg(labels: np.ndarray, ct: Any, path: PathLike, *, model_name: str, model_sha256: str) -> Path:
    """Write :func:`build_dicom_seg` to ``path`` through a temporary name."""
    return _save(build_dicom_seg(labels, ct, model_name=model_name, model_sha256=model_sha256), path)


def _save(dataset: Any, path: PathLike) -> Path:
    with atomic_path(path) as tmp:
        dataset.save_as(tmp)
    return Path(path)

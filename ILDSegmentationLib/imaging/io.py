"""Reading CTs and lung masks, writing label maps, with SimpleITK.

Images come in as NRRD, NIfTI, MHA or a DICOM series folder and go out through a
temporary file and a rename. Arrays are K, J, I; geometry is LPS (see geometry.py).
"""
from __future__ import annotations

import contextlib
import gzip
import logging
import os
import struct
import sys
import tempfile
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .paths import check_input
from ..errors import InputError, LungMaskError
from .geometry import Geometry, as_volume, same_grid
from .images import image_like, write_image
from .plausibility import MODALITY_TAG
from .segfile import write_segmentation

log = logging.getLogger(__name__)
PathLike = Union[str, "os.PathLike[str]"]

IMAGE_EXTENSIONS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd", ".dcm")
LABEL_EXTENSIONS = (".nrrd", ".nii.gz", ".nii", ".mha", ".seg.nrrd")


@dataclass
class Volume:
    """An image as an array (K, J, I, or J, I for a 2D image) plus its geometry."""

    array: np.ndarray
    geometry: Geometry
    image: sitk.Image  # the source image, for writing outputs on the same grid
    description: str = ""
    modality: Optional[str] = None  # DICOM Modality (0008,0060); None for formats without one
    #: The DICOM files the image was read from, in slice order (file k is slice K = k);
    #: empty for other formats. A DICOM Segmentation references them (dicomseg.py).
    dicom_files: Tuple[str, ...] = ()


def _looks_like_dicom(path: Path) -> bool:
    """A DICOM file by its name or its preamble ("DICM" at byte 128)."""
    if path.name.upper() == "DICOMDIR":  # an index of the media, not an image
        return False
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _unreadable_dicom_files(folder: Path, listed: List[str]) -> List[Path]:
    """DICOM files of the folder that GDCM left out of every series: GDCM silently
    skips a truncated or corrupt file, which would leave a gap in the volume."""
    known = {os.path.realpath(f) for f in listed}
    return [p for p in sorted(folder.iterdir())
            if p.is_file() and os.path.realpath(p) not in known and _looks_like_dicom(p)]


_SILENCE_LOCK = threading.RLock()  # re-entrant: a nested use restores in order


@contextlib.contextmanager
def itk_silenced() -> Iterator[None]:
    """ITK, GDCM, MetaIO and HDF5 print warnings and error stacks straight to the
    process's stderr (file descriptor 2), around the exception that says the same in a
    line: a truncated .mha gave 3 lines, a folder read as an image 27. Within this block
    ITK's warnings are off and fd 2 goes to a scratch file; nothing of Python's own is
    logged inside it. fd 2 belongs to the whole process, so callers on other threads
    wait for each other (a read takes well under a second)."""
    with _SILENCE_LOCK:
        shown = sitk.ProcessObject.GetGlobalWarningDisplay()
        saved = None
        try:
            sitk.ProcessObject.SetGlobalWarningDisplay(False)
            flush = getattr(sys.stderr, "flush", None)  # None under pythonw, or with fd 2 closed
            if flush is not None:
                flush()
            try:
                saved = os.dup(2)
            except OSError:  # no fd 2 at all: warnings off is all we can do
                saved = None
            if saved is None:
                yield
                return
            with tempfile.TemporaryFile() as scratch:
                os.dup2(scratch.fileno(), 2)
                try:
                    yield
                finally:
                    os.dup2(saved, 2)
        finally:
            if saved is not None:
                os.close(saved)
            sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _read_dicom_folder(folder: Path) -> Tuple[sitk.Image, str, Tuple[str, ...]]:
    reader = sitk.ImageSeriesReader()
    with itk_silenced():
        series = reader.GetGDCMSeriesIDs(str(folder)) or ()
        files_per_series = {s: reader.GetGDCMSeriesFileNames(str(folder), s) for s in series}
    if not series:
        raise InputError(f"no DICOM series found in folder {folder}")
    bad = _unreadable_dicom_files(folder, [f for files in files_per_series.values() for f in files])
    if bad:
        # Refused rather than read without it: the missing slice would misplace every
        # slice after it (the volume assumes even spacing) and change the volumes.
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise InputError(f"DICOM file {bad[0].name}{more} in {folder} cannot be read (truncated or corrupt); "
                         "restore it, or move it out of the folder to accept a gap in the series")
    chosen = max(series, key=lambda s: len(files_per_series[s]))
    note = ""
    if len(series) > 1:
        note = (f"folder holds {len(series)} DICOM series; using the largest "
                f"({len(files_per_series[chosen])} files, series {chosen})")
        log.warning(note)
    reader.SetFileNames(files_per_series[chosen])
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with itk_silenced():  # its own uneven-spacing warning: ours below says it in a line
            image = reader.Execute()
    except RuntimeError as e:
        raise InputError(f"cannot read the DICOM series in {folder}: {_itk_reason(e)}") from None
    if reader.HasMetaDataKey(0, MODALITY_TAG):
        # The series image carries no tags of its own: keep the Modality for the HU check.
        image.SetMetaData(MODALITY_TAG, reader.GetMetaData(0, MODALITY_TAG).strip())
    uneven = _check_slice_spacing(files_per_series[chosen], image)
    if uneven:
        log.warning(uneven)
        note = f"{note}; {uneven}" if note else uneven
    return image, note, tuple(files_per_series[chosen])


def _check_slice_spacing(files: List[str], image: sitk.Image) -> str:
    """'' for evenly spaced slices, a note when they are not (a missing slice: the
    volume assumes even spacing); two slices at one position are refused."""
    if image.GetDimension() != 3 or len(files) < 3:
        return ""
    positions = []
    for f in files:
        r = sitk.ImageFileReader()
        r.SetFileName(f)
        r.ReadImageInformation()
        positions.append(np.array(r.GetOrigin()))
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    along = np.array([p @ normal for p in positions])
    order = np.argsort(along, kind="stable")
    gaps = np.diff(along[order])
    typical = max(float(np.median(gaps)), 1e-6)
    if (gaps < 0.01 * typical).any():
        # GDCM keeps both copies of a slice, sorts one far from its place and ITK then
        # assumes a wrong, averaged spacing for the whole volume.
        k = int(np.flatnonzero(gaps < 0.01 * typical)[0])
        first, second = sorted((Path(files[order[k]]).name, Path(files[order[k + 1]]).name))
        raise InputError(f"DICOM files {first} and {second} are slices at the same position (a duplicate?): "
                         "remove one of them")
    steps = np.diff(along)
    if np.ptp(steps) > 0.01 * typical:
        return (f"DICOM slices are unevenly spaced ({steps.min():.3g} to {steps.max():.3g} mm, a missing slice?); "
                f"volumes assume {image.GetSpacing()[2]:.3g} mm")
    return ""


def read_image(path: PathLike) -> Tuple[sitk.Image, str]:
    """Read a file or DICOM series folder; InputError with the reason on failure."""
    image, note, _ = _read_image_and_files(path)
    return image, note


def _read_image_and_files(path: PathLike) -> Tuple[sitk.Image, str, Tuple[str, ...]]:
    """:func:`read_image`, plus the DICOM files read, in slice order (none for other formats)."""
    # A symlink loop, a FIFO (open would block), /dev/zero, no permission: one line, before opening.
    p = check_input(path, "image", folder=True)
    if p.is_dir():
        return _read_dicom_folder(p)
    if p.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_complete(p)
    try:
        with itk_silenced():
            return sitk.ReadImage(str(p)), "", ((str(p),) if _looks_like_dicom(p) else ())
    except RuntimeError as e:
        raise InputError(f"cannot read image {p.name}: unreadable, truncated or unsupported file "
                         f"({_itk_reason(e)})") from None


def _check_nifti_complete(path: Path) -> None:
    """ITK reads a truncated NIfTI-1 file (plain or gzipped) without complaint and
    fills the missing voxels with zeros: compare the data with what the header declares.
    A gzipped file is decompressed once more for this, in chunks (about a second for
    a large CT, small beside the segmentation)."""
    with open(path, "rb") as f:
        # By content, not name: ITK reads an uncompressed NIfTI named .nii.gz.
        gz = f.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            header = f.read(352)
            if len(header) < 348 or header[344:348] != b"n+1\0":
                return  # not a single-file NIfTI-1: ITK judges it
            endian = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            vox_offset = struct.unpack(endian + "f", header[108:112])[0]
            if not 1 <= dims[0] <= 7 or bitpix <= 0 or min(dims[1:dims[0] + 1]) < 1 or not np.isfinite(vox_offset):
                return  # a malformed header: ITK says why
            expected = int(vox_offset) + int(np.prod(dims[1:dims[0] + 1], dtype=np.int64)) * bitpix // 8
            if gz:
                size = len(header)
                while True:
                    chunk = f.read(1 << 22)
                    if not chunk:
                        break
                    size += len(chunk)
            else:
                size = path.stat().st_size
    except (EOFError, OSError, zlib.error) as e:  # a gzip stream cut short or damaged
        raise InputError(f"cannot read image {path.name}: truncated or corrupt compressed file ({e})") from None
    if size < expected:
        raise InputError(f"cannot read image {path.name}: truncated file ({size} of the {expected} bytes "
                         "its header declares)")


def _itk_reason(e: RuntimeError) -> str:
    """The informative line of a (multi-line) ITK exception, shortened to one line."""
    reason = str(e).strip().splitlines()
    detail = next((line.strip() for line in reason if "ITK ERROR" in line or "Could not" in line or "Unable" in line),
                  reason[-1].strip() if reason else "unknown error")
    return detail[:160]


def read_ct(path: PathLike) -> Volume:
    """A CT in HU: one scalar channel, 2D or 3D, finite values."""
    image, note, dicom_files = _read_image_and_files(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"CT {Path(path).name} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                         "expected a scalar (grey-value) image")
    if image.GetDimension() not in (2, 3):
        if image.GetDimension() == 4 and image.GetSize()[3] == 1:
            image = image[:, :, :, 0]
        else:
            raise InputError(f"CT {Path(path).name} is {image.GetDimension()}D; expected a 2D slice or a 3D volume")
    array = _array_view(image)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError(f"CT {Path(path).name} contains NaN or infinite values")
    modality = image.GetMetaData(MODALITY_TAG).strip() if image.HasMetaDataKey(MODALITY_TAG) else None
    return Volume(array, Geometry.from_sitk(image), image, note, modality or None, dicom_files)


def check_ct_plausible(ct: Volume, path: PathLike) -> dict:
    """:func:`~ILDSegmentationLib.imaging.plausibility.check_ct_in_hu` on a CT as read: refuses
    (InputError) what cannot be a CT in HU, logs a warning for what is doubtful, and
    returns what was checked (for the report)."""
    from .plausibility import check_ct_in_hu
    record = check_ct_in_hu(ct.array, Path(path).name, ct.modality)
    for warning in record["warnings"]:
        log.warning(warning)
    return record


class _ImageBuffer:
    """Exposes an image's voxel buffer to numpy and keeps the image alive with it."""

    def __init__(self, image: sitk.Image) -> None:
        self.image = image
        self.__array_interface__ = sitk.GetArrayViewFromImage(image).__array_interface__


def _array_view(image: sitk.Image) -> np.ndarray:
    """The voxels as a numpy view, without a copy. sitk.GetArrayViewFromImage alone
    does not keep the image alive: ``read_ct(p).array`` would then point into freed
    memory (garbage voxels). Here the array's base holds the image."""
    return np.asarray(_ImageBuffer(image))


def read_lung_mask(path: PathLike, ct: Volume) -> np.ndarray:
    """A lung mask on the CT's grid (every non-zero voxel is lung): uint8 0/1, K,J,I.

    A mask on another grid is resampled onto the CT's with nearest neighbour when
    their physical extents overlap; otherwise it is refused.
    """
    image, _ = read_image(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"lung mask {Path(path).name} is a vector image; expected a label map")
    if image.GetDimension() != ct.image.GetDimension():
        raise InputError(f"lung mask {Path(path).name} is {image.GetDimension()}D but the CT is "
                         f"{ct.image.GetDimension()}D")
    mask_geometry = Geometry.from_sitk(image)
    mask = sitk.GetArrayViewFromImage(image)
    if mask.dtype.kind == "f" and not np.isfinite(mask).all():
        # NaN != 0, so a NaN background would count as lung everywhere.
        raise InputError(f"lung mask {Path(path).name} contains NaN or infinite values")
    lowest = mask.min() if mask.size else 0
    if lowest < 0:
        # Label maps are 0 and up; values like -1024 mean a CT was given as the mask.
        raise InputError(f"lung mask {Path(path).name} has negative values (down to {lowest:g}): "
                         "is it a CT? Give a label map (0 outside the lung)")
    if not same_grid(mask_geometry, as_volume(mask).shape, ct.geometry, as_volume(ct.array).shape):
        resampled = sitk.Resample(sitk.Cast(image != 0, sitk.sitkUInt8), ct.image, sitk.Transform(),
                                  sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        out = sitk.GetArrayFromImage(resampled)
        if not out.any():
            raise LungMaskError(f"lung mask {Path(path).name} does not overlap the CT in physical space "
                                "(check that both come from the same scan)")
        log.info("lung mask resampled onto the CT grid (nearest neighbour)")
        return out
    out = (np.asarray(mask) != 0).astype(np.uint8)
    if not out.any():
        raise LungMaskError(f"lung mask {Path(path).name} is empty")
    return out


def output_kind(path: PathLike) -> str:
    name = Path(path).name
    for ext in (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha"):
        if name.lower().endswith(ext) and len(name) > len(ext):
            if not name.endswith(ext):
                # ITK chooses its reader by a case-sensitive extension: Slicer and
                # SimpleITK cannot open 'labels.MHA' or 'labels.Nii'.
                raise InputError(f"output name {name}: write its extension in lower case ({ext}), "
                                 "as ITK-based tools (3D Slicer included) read only that")
            return ext[1:]
    raise InputError(f"unsupported output format for {name}: use .nrrd, .nii.gz, .mha or .seg.nrrd")


def probability_output_kind(path: PathLike) -> str:
    """The format of a probabilities output: a plain 6-component image. A ``.seg.nrrd``
    name would promise a Slicer segmentation, which a probability image is not."""
    kind = output_kind(path)
    if kind == "seg.nrrd":
        raise InputError(f"probabilities are a 6-component image, not a segmentation: name "
                         f"{Path(path).name} .nrrd, .nii.gz or .mha")
    return kind


def write_label_map(labels: np.ndarray, reference: sitk.Image, path: PathLike) -> Path:
    """uint8 label map (0..6) on the reference grid; ``.seg.nrrd`` writes a Slicer
    segmentation with names, colors and terminology."""
    kind = output_kind(path)
    if kind == "seg.nrrd":
        return write_segmentation(labels, reference, path)
    return write_image(image_like(labels.astype(np.uint8, copy=False), reference), path)


def write_probabilities(probabilities: np.ndarray, reference: sitk.Image, path: PathLike) -> Path:
    """float32 per-class probabilities (K,J,I,C) as a vector image on the reference grid."""
    probability_output_kind(path)
    return write_image(image_like(probabilities, reference, is_vector=True), path)

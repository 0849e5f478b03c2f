"""Reading CTs and lung masks, writing label maps, with SimpleITK.

Images come in as NRRD, NIfTI, MHA or a DICOM series folder and go out through a
temporary file and a rename. Arrays are K, J, I; geometry is LPS (see geometry.py).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .atomicfile import atomic_path
from .errors import InputError, LungMaskError
from .geometry import Geometry, as_volume, same_grid

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


def _read_dicom_folder(folder: Path) -> Tuple[sitk.Image, str]:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder)) or ()
    if not series:
        raise InputError(f"no DICOM series found in folder {folder}")
    files_per_series = {s: reader.GetGDCMSeriesFileNames(str(folder), s) for s in series}
    chosen = max(series, key=lambda s: len(files_per_series[s]))
    note = ""
    if len(series) > 1:
        note = (f"folder holds {len(series)} DICOM series; using the largest "
                f"({len(files_per_series[chosen])} files, series {chosen})")
        log.warning(note)
    reader.SetFileNames(files_per_series[chosen])
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    _warn_uneven_spacing(files_per_series[chosen], image)
    return image, note


def _warn_uneven_spacing(files: List[str], image: sitk.Image) -> None:
    if image.GetDimension() != 3 or len(files) < 3:
        return
    positions = []
    for f in files:
        r = sitk.ImageFileReader()
        r.SetFileName(f)
        r.ReadImageInformation()
        positions.append(np.array(r.GetOrigin()))
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    steps = np.diff([p @ normal for p in positions])
    if steps.size and np.ptp(steps) > 0.01 * max(abs(np.median(steps)), 1e-6):
        log.warning("DICOM slices are unevenly spaced (%.3g to %.3g mm); volumes assume %.3g mm",
                    steps.min(), steps.max(), image.GetSpacing()[2])


def read_image(path: PathLike) -> Tuple[sitk.Image, str]:
    """Read a file or DICOM series folder; InputError with the reason on failure."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"file not found: {p}")
    if p.is_dir():
        return _read_dicom_folder(p)
    try:
        return sitk.ReadImage(str(p)), ""
    except RuntimeError as e:
        reason = str(e).strip().splitlines()
        detail = next((line.strip() for line in reason if "ITK ERROR" in line or "Could not" in line or "Unable" in line),
                      reason[-1].strip() if reason else "unknown error")
        raise InputError(f"cannot read image {p.name}: unreadable, truncated or unsupported file "
                         f"({detail[:160]})") from None


def read_ct(path: PathLike) -> Volume:
    """A CT in HU: one scalar channel, 2D or 3D, finite values."""
    image, note = read_image(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"CT {Path(path).name} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                         "expected a scalar (grey-value) image")
    if image.GetDimension() not in (2, 3):
        if image.GetDimension() == 4 and image.GetSize()[3] == 1:
            image = image[:, :, :, 0]
        else:
            raise InputError(f"CT {Path(path).name} is {image.GetDimension()}D; expected a 2D slice or a 3D volume")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError(f"CT {Path(path).name} contains NaN or infinite values")
    return Volume(array, Geometry.from_sitk(image), image, note)


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


def image_like(array: np.ndarray, reference: sitk.Image, is_vector: bool = False) -> sitk.Image:
    """An image holding ``array`` with exactly the reference's geometry."""
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    image.CopyInformation(reference)
    return image


def output_kind(path: PathLike) -> str:
    name = str(path).lower()
    if name.endswith(".seg.nrrd"):
        return "seg.nrrd"
    for ext in (".nii.gz", ".nrrd", ".nii", ".mha"):
        if name.endswith(ext):
            return ext[1:]
    raise InputError(f"unsupported output format for {Path(path).name}: use .nrrd, .nii.gz, .mha or .seg.nrrd")


def write_image(image: sitk.Image, path: PathLike, compress: bool = True) -> Path:
    """Write through a temporary file and a rename: never a half-written output."""
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, tmp, compress)
        except RuntimeError as e:
            raise OSError(str(e).strip().splitlines()[-1]) from None
    return Path(path)


def write_label_map(labels: np.ndarray, reference: sitk.Image, path: PathLike) -> Path:
    """uint8 label map (0..6) on the reference grid; ``.seg.nrrd`` writes a Slicer
    segmentation with names, colors and terminology."""
    kind = output_kind(path)
    if kind == "seg.nrrd":
        from .segfile import write_segmentation
        return write_segmentation(labels, reference, path)
    return write_image(image_like(labels.astype(np.uint8, copy=False), reference), path)


def write_probabilities(probabilities: np.ndarray, reference: sitk.Image, path: PathLike) -> Path:
    """float32 per-class probabilities (K,J,I,C) as a vector image on the reference grid."""
    output_kind(path)
    return write_image(image_like(probabilities, reference, is_vector=True), path)

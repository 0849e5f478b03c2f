"""SimpleITK images from arrays, and writing them safely.

An array here is K, J, I (slice, row, column), as SimpleITK's GetArrayFromImage gives;
the image carries the reference's LPS geometry. Writes go through a temporary name and
a rename (:mod:`.atomicfile`): never a half-written output.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk

from .atomicfile import atomic_path
from .geometry import Geometry

PathLike = Union[str, "os.PathLike[str]"]


def image_like(array: np.ndarray, reference: sitk.Image, is_vector: bool = False) -> sitk.Image:
    """An image holding ``array`` with exactly the reference's geometry."""
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    image.CopyInformation(reference)
    return image


def image_from_array(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """An image holding ``array`` (K, J, I) on ``geometry``'s grid (spacing, origin and
    direction, LPS)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(v) for v in geometry.spacing))
    image.SetOrigin(tuple(float(v) for v in geometry.origin))
    image.SetDirection(tuple(float(v) for v in geometry.direction))
    return image


def write_array(array: np.ndarray, geometry: Geometry, path: PathLike, compress: bool = True) -> Path:
    """``array`` (K, J, I) on ``geometry``'s grid written to ``path`` (format from its
    extension), through a temporary name. ``compress`` False: faster to write and read."""
    return write_image(image_from_array(array, geometry), path, compress)


def write_image(image: sitk.Image, path: PathLike, compress: bool = True) -> Path:
    """Write through a temporary file and a rename: never a half-written output."""
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, tmp, compress)
        except RuntimeError as e:
            reason = str(e).strip().splitlines()[-1].strip()
            free = _free_bytes(Path(tmp).parent)
            # ITK's writers do not say why a write failed ("failed to flush pending
            # data"); a full file system is the usual cause, so say so when it is.
            if free is not None and free < _raw_bytes(image):
                raise OSError(errno.ENOSPC, f"no space left on the device ({free // 1024} kB free; {reason})") from None
            raise OSError(reason) from None
    return Path(path)


def _free_bytes(folder: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(str(folder)).free
    except OSError:
        return None


def _raw_bytes(image: sitk.Image) -> int:
    """Uncompressed size of the voxel data: above the free space, the disk is full."""
    return image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()

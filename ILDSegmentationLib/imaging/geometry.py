"""Image geometry and the canonical axial view the engine works in.

Conventions used throughout the library:

* Arrays are indexed **K, J, I** (numpy order of SimpleITK and of
  ``slicer.util.arrayFromVolume``); geometry is given per index axis **I, J, K**.
* Physical space is **LPS** (DICOM, ITK, SimpleITK): +x patient left, +y posterior,
  +z superior, millimetres. MRML nodes are RAS; :mod:`ILDSegmentationLib.slicer.mrml`
  converts.
* The *canonical view* of a volume is a view (no copy, no resampling) with axes
  (axial slice, row, column) where rows run anterior -> posterior and columns run
  patient right -> patient left: the radiological display of an axial slice. The
  engine, the lung mask and training all work in it, whatever the file's index
  order, so a CT stored sagittally or with flipped axes is handled the same way.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence, Tuple

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class Geometry:
    """Where a K, J, I array lies in LPS space.

    spacing: mm per step along I, J, K. origin: LPS position (mm) of voxel (0, 0, 0).
    direction: 3x3, column c is the LPS unit vector of index axis c (I, J, K).
    """

    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: Tuple[float, ...] = field(default=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))

    def __post_init__(self) -> None:
        sp = np.asarray(self.spacing, dtype=float)
        if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise InputError(f"invalid voxel spacing {tuple(self.spacing)}: must be three positive numbers (mm)")
        d = np.asarray(self.direction, dtype=float)
        if d.size != 9 or not np.all(np.isfinite(d)) or abs(abs(np.linalg.det(d.reshape(3, 3))) - 1) > 1e-3:
            raise InputError("invalid direction matrix: must be a 3x3 rotation or reflection")
        if len(self.origin) != 3 or not np.all(np.isfinite(self.origin)):
            raise InputError("invalid origin: must be three finite numbers (mm)")

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    @classmethod
    def from_sitk(cls, image) -> "Geometry":
        sp = tuple(image.GetSpacing())
        org = tuple(image.GetOrigin())
        d = tuple(image.GetDirection())
        if image.GetDimension() == 2:  # a 2D image is one axial slice
            sp = sp + (1.0,)
            org = org + (0.0,)
            d = (d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0)
        return cls(sp, org, d)


def _physical_axis_of_index_axes(direction: np.ndarray) -> Tuple[int, ...]:
    """For index axes I, J, K, the physical axis (0=x, 1=y, 2=z) each runs closest to.

    Chosen as the permutation maximizing the summed |cosines|, so an oblique matrix
    with two axes near the same physical axis still gets a one-to-one answer.
    """
    a = np.abs(direction)
    best = max(itertools.permutations(range(3)), key=lambda p: sum(a[p[c], c] for c in range(3)))
    return tuple(best)


@dataclass(frozen=True)
class CanonicalView:
    """How to turn a K, J, I array into (axial, row A->P, column R->L) and back."""

    axes: Tuple[int, int, int]  # numpy axes of the K,J,I array for (z, y, x)
    flips: Tuple[bool, bool, bool]  # whether (z, y, x) must be reversed

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        out = np.transpose(array, self.axes)
        for ax, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, axis=ax)
        return out

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        out = array
        for ax, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, axis=ax)
        return np.transpose(out, np.argsort(self.axes))

    def canonical_spacing(self, geometry: Geometry) -> Tuple[float, float, float]:
        """(slice, row, column) spacing in mm."""
        return tuple(float(geometry.spacing[2 - a]) for a in self.axes)  # type: ignore[return-value]


def canonical_view(geometry: Geometry) -> CanonicalView:
    """The axial axis is the index axis whose direction is closest to S (not always K)."""
    d = geometry.direction_matrix
    phys = _physical_axis_of_index_axes(d)  # index axis c -> physical axis
    index_of_phys = [phys.index(p) for p in range(3)]  # physical axis -> index axis
    # numpy axis of index axis c is 2 - c (K, J, I order).
    axes = tuple(2 - index_of_phys[p] for p in (2, 1, 0))
    # z: keep superior -> inferior display order (head first); y: A->P is +y in LPS;
    # x: patient right -> left is +x in LPS.
    flips = (
        d[2, index_of_phys[2]] > 0,
        d[1, index_of_phys[1]] < 0,
        d[0, index_of_phys[0]] < 0,
    )
    return CanonicalView(axes, flips)  # type: ignore[arg-type]


def axial_axis(geometry: Geometry) -> int:
    """numpy axis (of the K, J, I array) along which axial slices are stacked."""
    return canonical_view(geometry).axes[0]


def as_volume(array: np.ndarray) -> np.ndarray:
    """A 2D image (J, I) is one axial slice: give it a K axis of length one."""
    if array.ndim == 2:
        return array[np.newaxis]
    if array.ndim != 3:
        raise InputError(f"expected a 2D or 3D image, got {array.ndim} dimensions")
    return array


def same_grid(a: Geometry, a_shape: Sequence[int], b: Geometry, b_shape: Sequence[int], tol: float = 1e-4) -> bool:
    return (
        tuple(a_shape) == tuple(b_shape)
        and np.allclose(a.spacing, b.spacing, rtol=tol, atol=tol)
        and np.allclose(a.origin, b.origin, rtol=tol, atol=1e-3)
        and np.allclose(a.direction, b.direction, atol=tol)
    )

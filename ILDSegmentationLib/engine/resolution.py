"""Running the network at the pixel size its model was trained at.

The paper's network looks at a slice through 3x3 kernels dilated by 1 to 55 pixels, so
its receptive field, and what a 2 mm micronodule or a reticular line looks like to it,
are fixed in pixels, not millimetres. A model trained on 1.0-1.4 mm pixels that meets a
CT with 0.6 mm pixels sees every structure magnified about twice. The model file
records the in-plane pixel spacing range of its training crops
(:attr:`~ILDSegmentationLib.engine.modelfile.ModelInfo.pixel_spacing_mm`); a CT outside that
range is resampled in-plane to the nearest end of it, segmented there, and its labels
are brought back to the CT's own grid (:class:`InPlaneGrid`). Slices are never
resampled: the engine works slice by slice. The new grid is centred on the old one.

Resampling is linear, without smoothing first: that is how the bundled model's
training variants were made from finer CT (``scripts/train_bundled_model.py``), so the
network meets the texture it was trained on. Labels come back by nearest neighbour, and
only inside the CT's own lung mask.

All arrays here are canonical views (axial slice, row A->P, column R->L; see
:mod:`ILDSegmentationLib.imaging.geometry`); spacings are (row, column) in mm.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

#: A CT whose pixel spacing lies within this share of the model's range counts as
#: inside it (1.406 mm against a range ending at 1.4 mm is not worth resampling).
SPACING_TOLERANCE = 0.05

#: How inference picks the pixel size the network runs at: ``model`` resamples CTs
#: outside the model's training range into it, ``native`` runs at the CT's own pixel
#: size, as the paper did (its training and test scans came from the same scanners).
PIXEL_SPACING_CHOICES = ("model", "native")

Spacing = Tuple[float, float]


def network_pixel_spacing(spacing: Spacing, model_range: Optional[Spacing],
                          slice_shape: Optional[Tuple[int, int]] = None) -> Spacing:
    """The (row, column) spacing in mm to run the network at: the CT's own where it lies
    within ``model_range`` (smallest, largest; widened by SPACING_TOLERANCE) or where
    the range is unknown, else the nearest end of the range, per axis. Given the
    slice's (rows, columns), also the CT's own when resampling would shrink a slice
    of two pixels or more to one: instance normalization needs two."""
    if model_range is None:
        return spacing
    lo, hi = model_range
    out = []
    for s in spacing:
        if lo * (1 - SPACING_TOLERANCE) <= s <= hi * (1 + SPACING_TOLERANCE):
            out.append(s)
        else:
            out.append(float(min(max(s, lo), hi)))
    target = (out[0], out[1])
    if slice_shape is not None and np.prod(_resampled_size(slice_shape, spacing, target)) < 2 <= np.prod(slice_shape):
        return spacing
    return target


def _resampled_size(shape: Tuple[int, int], spacing: Spacing, new_spacing: Spacing) -> Tuple[int, int]:
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing))  # type: ignore[return-value]


def _new_centres(n: int, s: float, n_new: int, t: float) -> np.ndarray:
    """Centres (mm, from the first old centre) of a grid of n_new pixels of t mm
    centred on a grid of n pixels of s mm. Rounding n_new leaves at most half a new
    pixel over on each side, so every new centre lies within the old grid's extent."""
    return 0.5 * (n - 1) * s + (np.arange(n_new) - 0.5 * (n_new - 1)) * t


def _nearest_new(n: int, s: float, n_new: int, t: float) -> np.ndarray:
    """For each old pixel, the index of the new pixel whose centre is nearest."""
    first = _new_centres(n, s, n_new, t)[0]
    return np.clip(np.floor((np.arange(n) * s - first) / t + 0.5).astype(np.int64), 0, n_new - 1)


def _linear(array_c: np.ndarray, spacing: Spacing, new_spacing: Spacing) -> np.ndarray:
    rows, cols = _resampled_size(array_c.shape[1:], spacing, new_spacing)
    origin = (_new_centres(array_c.shape[2], spacing[1], cols, new_spacing[1])[0],
              _new_centres(array_c.shape[1], spacing[0], rows, new_spacing[0])[0], 0.0)
    import SimpleITK as sitk  # here, not at import: the engine runs without it when nothing is resampled
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_c, dtype=np.float32))
    image.SetSpacing((spacing[1], spacing[0], 1.0))
    # No new centre lies outside the old grid (see _new_centres), and ITK interpolates
    # up to the old grid's outer edge, so the default value is never used.
    out = sitk.Resample(image, (cols, rows, array_c.shape[0]), sitk.Transform(), sitk.sitkLinear, origin,
                        (new_spacing[1], new_spacing[0], 1.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
                        0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


class InPlaneGrid:
    """The resampled grid of a canonical volume's slices, and the way back.

    Going there, the CT is interpolated linearly (:meth:`ct`); the lung is every new
    pixel that a lung pixel contributes to, or is nearest to (:meth:`lung`). Coming
    back, each old pixel takes the values of its nearest new pixel, which is therefore
    always lung: every lung pixel gets a label, with no guessing (:meth:`back`)."""

    def __init__(self, shape_c: Tuple[int, int, int], spacing: Spacing, new_spacing: Spacing) -> None:
        self.spacing, self.new_spacing = spacing, new_spacing
        self.new_shape = (shape_c[0],) + _resampled_size(shape_c[1:], spacing, new_spacing)
        self.row_of = _nearest_new(shape_c[1], spacing[0], self.new_shape[1], new_spacing[0])
        self.col_of = _nearest_new(shape_c[2], spacing[1], self.new_shape[2], new_spacing[1])

    def ct(self, hu_c: np.ndarray, clip: Tuple[float, float] = (-1024.0, 3071.0)) -> np.ndarray:
        """The canonical HU volume on the new grid, float32, clipped first to ``clip``
        (the model's intensity range): padding such as -3024 HU must not darken the lung
        pixels it is interpolated with, and float64 values beyond float32's range must
        not become infinite."""
        x = np.asarray(hu_c)
        if x.dtype.kind == "f" and x.dtype.itemsize > 4:
            x = np.clip(x, *clip).astype(np.float32)
        else:
            x = x.astype(np.float32)
            np.clip(x, *clip, out=x)
        return _linear(x, self.spacing, self.new_spacing)

    def lung(self, lung_c: np.ndarray) -> np.ndarray:
        """bool lung on the new grid (``lung_c``: bool, canonical)."""
        weights = _linear(lung_c, self.spacing, self.new_spacing)
        out = weights > 1e-6
        for z in np.flatnonzero(lung_c.reshape(lung_c.shape[0], -1).any(axis=1)):
            r, c = np.nonzero(lung_c[z])
            out[z, self.row_of[r], self.col_of[c]] = True
        return out

    def back(self, values_r: np.ndarray, lung_c: np.ndarray) -> np.ndarray:
        """Values on the new grid (K,J',I', or K,J',I',C) on the old grid, zero outside
        ``lung_c``: a new array."""
        out = values_r[:, self.row_of[:, None], self.col_of[None, :]]
        out[~lung_c] = 0
        return out

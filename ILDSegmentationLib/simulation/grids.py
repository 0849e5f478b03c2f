"""Fine sub-voxel grids and the shapes drawn on them, shared by the simulator's patterns.

A :class:`FineBox` is a box of the canonical voxel grid (axial slice, row, column)
with a finer grid of sub-voxels inside: a pattern is drawn there, anti-aliased, and
averaged back onto the voxels (the voxel's and the slice's partial volume). Sizes
and coordinates are in mm (canonical: index * spacing). The phantom's voxel grid and
its tubes are :mod:`.phantom`'s own: it draws on whole voxels with sub-samples along z.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
from scipy import ndimage


def interp_weights(fine_u: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation from samples at 0..n-1 to positions fine_u (in sample
    units, clamped at the ends): lower index, upper index, weight of the upper."""
    u = np.clip(fine_u, 0.0, n - 1.0)
    i0 = np.floor(u).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    return i0, i1, (u - i0).astype(np.float32)


def apply_separable(f: np.ndarray, weights: Sequence[Tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """Separable linear resampling of a 3D array, one axis after the other (z, y, x):
    two gathers and a blend per axis, O(voxels)."""
    a = f.astype(np.float32, copy=False)
    # Axes that grow least first: the intermediate arrays stay small.
    order = sorted(range(3), key=lambda ax: len(weights[ax][0]) / max(f.shape[ax], 1))
    for ax in order:
        i0, i1, t = weights[ax]
        shape = [1, 1, 1]
        shape[ax] = -1
        tt = t.reshape(shape)
        lo = np.take(a, i0, axis=ax)
        hi = np.take(a, i1, axis=ax)
        lo *= 1.0 - tt
        hi *= tt
        lo += hi
        a = lo
    return a


@dataclass
class FineBox:
    """A box of the canonical grid and its fine sub-voxel grid.

    lo, hi: voxel index bounds (hi exclusive) per canonical axis. n: sub-voxels per
    voxel per axis. z, y, x: fine-grid coordinates (mm, canonical: index * spacing),
    shaped for broadcasting.
    """

    lo: np.ndarray
    hi: np.ndarray
    n: Tuple[int, int, int]
    spacing: Tuple[float, float, float]

    def __post_init__(self) -> None:
        self.coords = []
        self.units = []
        for ax in range(3):
            k = np.arange(self.lo[ax], self.hi[ax])
            sub = (np.arange(self.n[ax]) + 0.5) / self.n[ax] - 0.5
            u = (k[:, None] + sub[None, :]).ravel()  # in voxel index units
            self.units.append(u)
            self.coords.append(u * self.spacing[ax])
        self.z = self.coords[0][:, None, None].astype(np.float32)
        self.y = self.coords[1][None, :, None].astype(np.float32)
        self.x = self.coords[2][None, None, :].astype(np.float32)

    @property
    def slices(self) -> Tuple[slice, slice, slice]:
        return tuple(slice(int(a), int(b)) for a, b in zip(self.lo, self.hi))  # type: ignore[return-value]

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(int(b - a) for a, b in zip(self.lo, self.hi))  # type: ignore[return-value]

    @property
    def fine_shape(self) -> Tuple[int, int, int]:
        return tuple(s * n for s, n in zip(self.shape, self.n))  # type: ignore[return-value]

    @property
    def soft_mm(self) -> float:
        """Edge width (mm) for anti-aliased shapes: one fine in-plane step."""
        return float(min(self.spacing[1] / self.n[1], self.spacing[2] / self.n[2]))

    def to_fine(self, native: np.ndarray) -> np.ndarray:
        """Trilinear interpolation of a native box array onto the fine grid."""
        weights = [interp_weights(self.units[ax] - self.lo[ax], self.shape[ax]) for ax in range(3)]
        return apply_separable(native, weights)

    def to_native(self, fine: np.ndarray) -> np.ndarray:
        """Mean of each voxel's sub-voxels: the voxel's and the slice's partial volume."""
        (a, b, c), (p, q, r) = self.shape, self.n
        x = fine.astype(np.float32, copy=False).reshape(a, p, b, q, c, r)
        # A few strided adds beat numpy's reduction over short axes.
        out = np.zeros((a, b, c), np.float32)
        for i in range(p):
            for j in range(q):
                for k in range(r):
                    out += x[:, i, :, j, :, k]
        out *= np.float32(1.0 / (p * q * r))
        return out

    def smooth_noise(self, rng: np.random.Generator, scale_mm: float) -> np.ndarray:
        """Smooth Gaussian noise of unit sd on the fine grid, correlation length about
        scale_mm: white noise on a lattice of step scale_mm/2, filtered, then
        interpolated linearly (cheap: separable matrices)."""
        step = scale_mm / 2.0
        mats, lat_shape = [], []
        for ax in range(3):
            c = self.coords[ax]
            n = int(math.ceil((c[-1] - c[0]) / step)) + 5
            origin = c[0] - 2 * step
            lat_shape.append(n)
            mats.append(interp_weights((c - origin) / step, n))
        lat = ndimage.gaussian_filter(rng.standard_normal(lat_shape), 1.0, mode="wrap")
        lat /= max(float(lat.std()), 1e-6)
        return apply_separable(lat.astype(np.float32), mats)

    def index_range(self, ax: int, lo_mm: float, hi_mm: float) -> slice:
        c = self.coords[ax]
        return slice(int(np.searchsorted(c, lo_mm, "left")), int(np.searchsorted(c, hi_mm, "right")))


def ramp(f: np.ndarray, width: float) -> np.ndarray:
    """Soft membership 0..1 from a signed distance f (mm, > 0 inside): 0.5 on the
    border, linear over ``width`` mm."""
    return np.clip(0.5 + f / max(width, 1e-3), 0.0, 1.0).astype(np.float32)


def sphere_coverage(box: FineBox, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Anti-aliased union of spheres on the fine grid (0..1)."""
    out = np.zeros(box.fine_shape, np.float32)
    soft = box.soft_mm
    for c, r in zip(centres, radii):
        reach = r + soft
        sl = tuple(box.index_range(ax, c[ax] - reach, c[ax] + reach) for ax in range(3))
        if any(s.stop <= s.start for s in sl):
            continue
        d = np.sqrt((box.z[sl[0]] - c[0]) ** 2 + (box.y[:, sl[1]] - c[1]) ** 2 + (box.x[:, :, sl[2]] - c[2]) ** 2)
        np.maximum(out[sl], np.clip((r - d) / soft + 0.5, 0.0, 1.0), out=out[sl])
    return out


def tube_coverage(box: FineBox, segments: Sequence[Tuple[np.ndarray, np.ndarray, float, float]]) -> np.ndarray:
    """Anti-aliased union of tapered tubes (p0, p1, r0, r1 in mm) on the fine grid."""
    out = np.zeros(box.fine_shape, np.float32)
    soft = box.soft_mm
    for p0, p1, r0, r1 in segments:
        reach = max(r0, r1) + soft
        lo = np.minimum(p0, p1) - reach
        hi = np.maximum(p0, p1) + reach
        sl = tuple(box.index_range(ax, lo[ax], hi[ax]) for ax in range(3))
        if any(s.stop <= s.start for s in sl):
            continue
        d = (p1 - p0).astype(np.float32)
        l2 = max(float(d @ d), 1e-6)
        rz = box.z[sl[0]] - p0[0]
        ry = box.y[:, sl[1]] - p0[1]
        rx = box.x[:, :, sl[2]] - p0[2]
        t = np.clip((rz * d[0] + ry * d[1] + rx * d[2]) / l2, 0.0, 1.0)
        dist = np.sqrt((rz - t * d[0]) ** 2 + (ry - t * d[1]) ** 2 + (rx - t * d[2]) ** 2)
        radius = r0 + t * (r1 - r0)
        np.maximum(out[sl], np.clip((radius - dist) / soft + 0.5, 0.0, 1.0), out=out[sl])
    return out


def unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-9 else v


def random_perpendicular(u: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    v -= (v @ u) * u
    return unit(v)


# ------------------------------------------------- the phantom's voxel grid


@dataclass(frozen=True)
class VoxelGrid:
    """Model coordinates (mm, LPS, about the volume centre) of the voxel centres."""

    shape: Tuple[int, int, int]  # K, J, I
    spacing: Tuple[float, float, float]  # I, J, K (mm)
    origin: Tuple[float, float, float]  # x, y, z (mm) of voxel (0, 0, 0)

    @property
    def x(self) -> np.ndarray:  # (1, 1, I)
        return (self.origin[0] + self.spacing[0] * np.arange(self.shape[2], dtype=np.float32))[None, None, :]

    @property
    def y(self) -> np.ndarray:  # (1, J, 1)
        return (self.origin[1] + self.spacing[1] * np.arange(self.shape[1], dtype=np.float32))[None, :, None]

    @property
    def z(self) -> np.ndarray:  # (K, 1, 1)
        return (self.origin[2] + self.spacing[2] * np.arange(self.shape[0], dtype=np.float32))[:, None, None]


def voxel_tube_coverage(grid: VoxelGrid, p0: np.ndarray, p1: np.ndarray, r0: np.ndarray, r1: np.ndarray,
                        budget: int = 3_000_000) -> np.ndarray:
    """Fraction (0..1) of each voxel covered by the union of tapered tubes.

    p0, p1: (n, 3) end points of the tube axes (x, y, z mm); r0, r1: (n,) radii (mm)
    at those ends. Returns float32 (K, J, I). Each segment has round caps, so
    segments that share end points make a smooth polyline.

    Only each segment's bounding box is visited; segments are sorted by box size and
    evaluated in batches padded to the batch's largest box, so there is one numpy
    pass per batch instead of a python loop over voxels or segments.
    """
    nk, nj, ni = grid.shape
    out = np.zeros(nk * nj * ni, np.float32)
    p0 = np.asarray(p0, np.float64).reshape(-1, 3)
    p1 = np.asarray(p1, np.float64).reshape(-1, 3)
    r0 = np.broadcast_to(np.asarray(r0, np.float64), (len(p0),))
    r1 = np.broadcast_to(np.asarray(r1, np.float64), (len(p0),))
    if len(p0) == 0:
        return out.reshape(grid.shape)
    sp = np.asarray(grid.spacing, np.float64)
    org = np.asarray(grid.origin, np.float64)
    dims = np.array([ni, nj, nk])
    soft = float(min(sp[0], sp[1]))  # edge blur width: one in-plane voxel (partial volume)
    # Sub-samples through the slice thickness so a thin tube in a thick slice covers
    # only part of the voxel, as it does in a real CT.
    n_sub = max(1, int(round(sp[2] / soft)))
    sub = (((np.arange(n_sub) + 0.5) / n_sub) - 0.5) * sp[2]
    reach = np.maximum(r0, r1) + soft
    lo = np.minimum(p0, p1) - reach[:, None]
    hi = np.maximum(p0, p1) + reach[:, None]
    half_slab = np.array([0.0, 0.0, sp[2] / 2])
    ilo = np.maximum(np.ceil((lo - half_slab - org) / sp).astype(int), 0)
    ihi = np.minimum(np.floor((hi + half_slab - org) / sp).astype(int), dims - 1)
    keep = np.flatnonzero(np.all(ihi >= ilo, axis=1))
    if keep.size == 0:
        return out.reshape(grid.shape)
    ext = ihi[keep] - ilo[keep] + 1
    keep = keep[np.argsort(np.prod(ext, axis=1), kind="stable")]
    ext = ihi[keep] - ilo[keep] + 1
    start = 0
    while start < len(keep):
        box = ext[start].copy()
        stop = start + 1
        while stop < len(keep):
            grown = np.maximum(box, ext[stop])
            if (stop + 1 - start) * int(np.prod(grown)) * n_sub > budget:
                break
            box = grown
            stop += 1
        idx = keep[start:stop]
        start = stop
        ex, ey, ez = (int(v) for v in box)
        ii = ilo[idx, 0][:, None] + np.arange(ex)  # (m, ex)
        jj = ilo[idx, 1][:, None] + np.arange(ey)
        kk = ilo[idx, 2][:, None] + np.arange(ez)
        vx = ii <= ihi[idx, 0][:, None]
        vy = jj <= ihi[idx, 1][:, None]
        vz = kk <= ihi[idx, 2][:, None]
        a = p0[idx].astype(np.float32)
        d = (p1[idx] - p0[idx]).astype(np.float32)
        ra = r0[idx].astype(np.float32)
        dr = (r1[idx] - r0[idx]).astype(np.float32)
        rx = (org[0] + ii * sp[0]).astype(np.float32) - a[:, 0:1]
        ry = (org[1] + jj * sp[1]).astype(np.float32) - a[:, 1:2]
        rz = (org[2] + kk * sp[2]).astype(np.float32) - a[:, 2:3]
        # Broadcast to (m, z, y, x, sub). The squared distance to the axis is
        # |r|^2 - 2 t (r.d) + t^2 |d|^2, with r the voxel's offset from p0 and t the
        # clamped projection: fewer full-size temporaries than forming r - t d.
        X = rx[:, None, None, :, None]
        Y = ry[:, None, :, None, None]
        Z = rz[:, :, None, None, None] + sub.astype(np.float32)
        l2 = np.maximum((d * d).sum(axis=1), 1e-6)[:, None, None, None, None]
        dot = X * d[:, 0, None, None, None, None] + Y * d[:, 1, None, None, None, None]
        dot = dot + Z * d[:, 2, None, None, None, None]
        t = np.clip(dot / l2, 0.0, 1.0)
        r2 = (X * X + Y * Y) + Z * Z
        dist = np.sqrt(np.maximum(r2 - t * (2.0 * dot - t * l2), 0.0))
        radius = ra[:, None, None, None, None] + t * dr[:, None, None, None, None]
        cov = np.clip((radius - dist) / soft + 0.5, 0.0, 1.0).mean(axis=-1)
        valid = vz[:, :, None, None] & vy[:, None, :, None] & vx[:, None, None, :]
        sel = valid & (cov > 0)
        flat = (kk[:, :, None, None] * nj + jj[:, None, :, None]) * ni + ii[:, None, None, :]
        np.maximum.at(out, flat[sel], cov[sel])
    return out.reshape(grid.shape)

"""The noise of a CT: its level per axial slice and its noise power spectrum, measured.

Used by the simulator (fresh noise of the same level and grain where a pattern is
inserted) and by the input checks (a scan too noisy for the model). Arrays are in the
canonical view of :mod:`.geometry` (axial slice, row, column), in HU.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NoiseModel:
    """CT noise: its level per axial slice and its in-plane noise power spectrum (NPS).

    slice_sd_hu: standard deviation (HU) per slice of the canonical view (quantum
    noise changes along the body: higher through the shoulders and the upper
    abdomen than through the mid chest). freq: radial spatial frequencies (cycles
    per pixel, 0..0.71) of the NPS samples; nps: relative noise power there.
    Filtered back-projection gives noise whose power rises from the lowest
    frequencies (ramp filter) and falls at the highest (reconstruction kernel):
    neither white nor Gaussian-blurred, so it is measured rather than assumed.
    Noise is independent from slice to slice (non-overlapping 2-8 mm slices).
    tiles: number of tissue tiles the NPS was measured on (0: assumed).
    """

    slice_sd_hu: Tuple[float, ...]
    freq: Tuple[float, ...]
    nps: Tuple[float, ...]
    tiles: int = 0

    @property
    def sd_hu(self) -> float:
        """Median noise level over the slices (HU)."""
        return float(np.median(self.slice_sd_hu))

    def scaled_to(self, sd_hu: float) -> "NoiseModel":
        """The same spectrum and profile along z, with median level sd_hu."""
        k = sd_hu / max(self.sd_hu, 1e-6)
        return NoiseModel(tuple(v * k for v in self.slice_sd_hu), self.freq, self.nps, self.tiles)

    def sample(self, rng: np.random.Generator, shape: Tuple[int, int, int], first_slice: int = 0) -> np.ndarray:
        """Noise (HU, float32) for a box of (slices, rows, columns) starting at canonical
        slice ``first_slice``: white noise shaped in the Fourier domain, per slice."""
        white = rng.standard_normal(shape, dtype=np.float32)
        fy = np.fft.fftfreq(shape[1])[:, None]
        power = np.interp(np.sqrt(fy ** 2 + np.fft.rfftfreq(shape[2])[None, :] ** 2), self.freq, self.nps)
        # Mean power over the full (not the half) spectrum gives the variance.
        full = np.interp(np.sqrt(fy ** 2 + np.fft.fftfreq(shape[2])[None, :] ** 2), self.freq, self.nps)
        gain = np.sqrt(power / max(float(full.mean()), 1e-12)).astype(np.float32)
        out = np.fft.irfft2(np.fft.rfft2(white, axes=(1, 2)) * gain, s=shape[1:], axes=(1, 2)).astype(np.float32)
        sd = np.asarray(self.slice_sd_hu, np.float32)
        idx = np.clip(np.arange(first_slice, first_slice + shape[0]), 0, len(sd) - 1)
        out *= sd[idx][:, None, None]
        return out


def _gaussian_nps(sigma_px: float, sd: float, n_slices: int) -> NoiseModel:
    f = np.linspace(0.0, 0.75, 64)
    return NoiseModel((float(sd),) * max(n_slices, 1), tuple(f), tuple(np.exp(-(2 * np.pi * sigma_px * f) ** 2)))


def estimate_noise(ct: np.ndarray, spacing: Sequence[float], tile_mm: float = 20.0) -> NoiseModel:
    """Noise of a CT (canonical view, HU), measured in flat fat and soft tissue.

    Square tiles of about ``tile_mm`` (16 or 32 px) lying wholly in fat (-150..-40
    HU) or wholly in soft tissue (-20..120 HU: muscle, liver, heart), after a 2 px
    blur, are taken from up to 24 slices (a fat-muscle border inside a tile would
    pass for noise).

    * Spectrum: the 30 % of tiles whose blurred content varies least (no organ
      edge) are detrended (a plane is subtracted); their power spectra, averaged
      radially, are the NPS.
    * Level: the fine-scale part of the noise (the residual after a 1 px Gaussian
      blur) is measured per slice robustly (median absolute deviation) and scaled up
      by the share of the NPS that this residual holds. The low frequencies of a
      tile hold anatomy too (liver texture, small vessels), so the tile's variance
      would overstate the noise. Slices between the measured ones are interpolated.

    Falls back to 20 HU, lightly correlated, when the CT has too little fat or soft
    tissue (e.g. a crop of the lungs only).
    """
    nz = ct.shape[0]
    px = float(min(spacing[1], spacing[2]))
    size = 32 if tile_mm / px >= 24 else 16
    picks = np.unique(np.linspace(0, nz - 1, min(nz, 24)).astype(int))
    tiles, flatness = [], []
    fine_by_slice: Dict[int, np.ndarray] = {}
    for k in picks:
        sl = np.asarray(ct[k], np.float32)
        smooth = ndimage.gaussian_filter(sl, 2.0)
        fat = (smooth > -150) & (smooth < -40)
        soft = (smooth > -20) & (smooth < 120)
        fine_part = sl - ndimage.gaussian_filter(sl, 1.0)
        ny, nx = sl.shape[0] // size, sl.shape[1] // size
        pieces = []
        for j in range(ny):
            for i in range(nx):
                win = (slice(j * size, (j + 1) * size), slice(i * size, (i + 1) * size))
                if fat[win].all() or soft[win].all():
                    tiles.append(sl[win])
                    flatness.append(float(smooth[win].std()))
                    pieces.append(fine_part[win][2:-2, 2:-2].ravel())
        if len(pieces) >= 3:
            fine_by_slice[int(k)] = np.concatenate(pieces)
    if len(tiles) < 8 or not fine_by_slice:
        log.info("too little flat fat or soft tissue to measure the noise; assuming 20 HU")
        return _gaussian_nps(0.6, 20.0, nz)
    order = np.argsort(flatness)[: max(8, int(0.3 * len(tiles)))]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    design = np.stack([np.ones(size * size), yy.ravel(), xx.ravel()], 1)
    pinv = np.linalg.pinv(design)
    power = np.zeros((size, size))
    for t in order:
        v = tiles[t].ravel() - design @ (pinv @ tiles[t].ravel())
        power += np.abs(np.fft.fft2(v.reshape(size, size))) ** 2
    f = np.sqrt(np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None, :] ** 2).ravel()
    edges = np.arange(0.0, 0.75 + 1e-9, 1.0 / size)
    which = np.digitize(f, edges) - 1
    radial, centres = [], []
    for b in range(len(edges) - 1):
        sel = which == b
        if sel.any():
            radial.append(float(power.ravel()[sel].mean()))
            centres.append(float(f[sel].mean()))
    nps = np.array(radial) / max(float(np.mean(radial)), 1e-12)
    # Detrending empties the zero-frequency bin; hold the first measured level there
    # so that large boxes still get some low-frequency noise.
    if len(nps) > 1:
        nps[0] = nps[1]
    # Share of the noise variance left after a 1 px blur, from the NPS.
    f2 = np.sqrt(np.fft.fftfreq(64)[:, None] ** 2 + np.fft.fftfreq(64)[None, :] ** 2)
    nps2 = np.interp(f2, centres, nps)
    share = float((nps2 * (1.0 - np.exp(-2.0 * (np.pi * f2) ** 2)) ** 2).sum() / max(float(nps2.sum()), 1e-12))
    ks = np.array(sorted(fine_by_slice))
    sds = np.array([1.4826 * float(np.median(np.abs(fine_by_slice[k] - np.median(fine_by_slice[k]))))
                    for k in ks]) / math.sqrt(max(share, 1e-3))
    profile = np.interp(np.arange(nz), ks, sds)
    return NoiseModel(tuple(float(v) for v in profile), tuple(centres), tuple(float(v) for v in nps),
                      tiles=int(len(order)))

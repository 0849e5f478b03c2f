"""Optional intensity augmentation: random reconstruction kernel and noise per crop.

The paper augments only geometrically (the eight flips/rotations, see
:func:`~ILDSegmentationLib.training.dataset.dihedral`), which is the default here
(``none``). Its data came from many scanners; a user who trains on few CTs has one
kernel and one noise texture, and a network trained that way reads another scanner's
texture as another pattern (fine reticulation and micronodules are texture). The
``scanner`` option therefore changes, per crop and per epoch, what differs between
scanners while the anatomy and the patterns stay where they are, so the labels stay
true:

- the reconstruction kernel: a third of the crops are smoothed (Gaussian, sigma
  ``BLUR_SIGMA_PX``, as by a softer kernel), a third sharpened (unsharp masking,
  amount ``SHARPEN_AMOUNT``, as by a sharper kernel), a third left as they are;
- the noise: Gaussian noise of ``NOISE_SD_HU`` standard deviation (HU, before the
  model's intensity scaling) with a grain (Gaussian correlation, ``NOISE_GRAIN_PX``)
  from fine (sharp kernel) to coarse (soft kernel, low dose).

Mean attenuation is left alone on purpose: it is what tells ground glass from healthy
lung and consolidation from ground glass, so shifting it would make labels false.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
from scipy import ndimage

from ..engine.preprocessing import Intensity

INTENSITY_AUGMENTATIONS: Tuple[str, ...] = ("none", "scanner")

BLUR_SIGMA_PX: Tuple[float, float] = (0.3, 0.8)  # pixels; beyond ~1 px, 1-2 px micronodules vanish
SHARPEN_AMOUNT: Tuple[float, float] = (0.2, 0.8)  # unsharp mask x + a (x - blur_1px(x))
NOISE_SD_HU: Tuple[float, float] = (0.0, 25.0)  # added to the scan's own noise (15-40 HU in lung)
NOISE_GRAIN_PX: Tuple[float, float] = (0.5, 1.5)  # sigma of the noise correlation, pixels


def scanner_variation(image: np.ndarray, intensity: Intensity, rng: np.random.Generator) -> Tuple[np.ndarray, Dict]:
    """A new float32 crop (h, w) in the network's units: ``image`` with a random kernel
    and random added noise (module docstring), clipped back to the intensity range.

    Returns the crop and the drawn parameters (for tests and inspection).
    """
    x = image.astype(np.float32, copy=True)
    choice = int(rng.integers(0, 3))
    params: Dict = {"kernel": ("smooth", "sharpen", "as is")[choice]}
    if choice == 0:
        params["sigma_px"] = float(rng.uniform(*BLUR_SIGMA_PX))
        x = ndimage.gaussian_filter(x, params["sigma_px"], mode="nearest")
    elif choice == 1:
        params["amount"] = float(rng.uniform(*SHARPEN_AMOUNT))
        x = x + np.float32(params["amount"]) * (x - ndimage.gaussian_filter(x, 1.0, mode="nearest"))
    params["noise_sd_hu"] = float(rng.uniform(*NOISE_SD_HU))
    params["grain_px"] = float(rng.uniform(*NOISE_GRAIN_PX))
    noise = ndimage.gaussian_filter(rng.standard_normal(x.shape).astype(np.float32), params["grain_px"],
                                    mode="wrap")
    sd = float(noise.std())
    if sd > 0:
        x += noise * np.float32(params["noise_sd_hu"] / sd * intensity.scale)
    # The intensity's own range, in the network's units (its mapping may reverse order).
    lo, hi = np.sort(intensity.apply(np.array([intensity.clip_min, intensity.clip_max])))
    np.clip(x, lo, hi, out=x)
    return x.astype(np.float32, copy=False), params

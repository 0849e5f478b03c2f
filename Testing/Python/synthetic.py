"""Small synthetic inputs for fast engine tests (the full phantom is in phantom.py)."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from ILDSegmentationLib.imaging.geometry import Geometry
from ILDSegmentationLib.engine.modelfile import ModelInfo, load_model, save_model
from ILDSegmentationLib.engine.network import DilatedFCN, NetworkConfig
from ILDSegmentationLib.engine.preprocessing import INTENSITY_PRESETS


def two_lungs(n_slices: int = 5, rows: int = 80, cols: int = 112, seed: int = 0):
    """HU volume (K,J,I) with two elliptic 'lungs' in soft tissue, and their mask."""
    rng = np.random.default_rng(seed)
    k, j, i = np.mgrid[0:n_slices, 0:rows, 0:cols]
    mask = np.zeros((n_slices, rows, cols), np.uint8)
    for centre, size in (((rows * 0.5, cols * 0.28), (rows * 0.32, cols * 0.18)),
                         ((rows * 0.52, cols * 0.72), (rows * 0.30, cols * 0.16))):
        shrink = 1 - 0.08 * np.abs(k - n_slices / 2)
        inside = ((j - centre[0]) / (size[0] * shrink)) ** 2 + ((i - centre[1]) / (size[1] * shrink)) ** 2 < 1
        mask[inside] = 1
    mask[0] = 0  # a slice without lung
    hu = rng.normal(40, 15, mask.shape)
    hu[mask > 0] = rng.normal(-820, 60, int(mask.sum()))
    hu[:, rows // 2 - 3: rows // 2 + 3, cols // 4: cols // 4 + 6] = 60  # a 'vessel'
    return hu.astype(np.int16), mask


def random_model(tmp_path, seed: int = 7, intensity: str = "hu1000"):
    """A random-weight model whose outputs vary across classes (inputs scaled by
    1/1000 keep the logits moderate), to make label comparisons meaningful.
    intensity="hu" feeds raw HU instead (large logits: the hardest case for rounding)."""
    torch.manual_seed(seed)
    net = DilatedFCN(NetworkConfig())
    info = ModelInfo(name="random test model", network=net.config, intensity=INTENSITY_PRESETS[intensity])
    return load_model(save_model(tmp_path / f"random{seed}-{intensity}.safetensors", net, info))


def sitk_volume(hu: np.ndarray, spacing=(0.8, 0.8, 2.5), origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def array_and_geometry(image: sitk.Image):
    return sitk.GetArrayFromImage(image), Geometry.from_sitk(image)

"""A tiny annotated data set whose classes are visible in the intensity, for fast
training tests (the realistic one is ILDSegmentationLib.simulation.simulate)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ILDSegmentationLib.training.manifest import write_manifest

from synthetic import two_lungs

# Class -> HU offset from healthy lung, so the task is learnable in a few epochs.
LEVELS = {1: 0, 2: 250, 4: 800}


def make_case(folder: Path, seed: int, shape=(4, 64, 88)):
    hu, mask = two_lungs(*shape, seed=seed)
    rng = np.random.default_rng(seed)
    truth = np.where(mask > 0, 1, 0).astype(np.uint8)
    k, j, i = np.indices(hu.shape)
    for label in (2, 4):
        for _ in range(2):
            cj, ci = rng.integers(8, shape[1] - 8), rng.integers(8, shape[2] - 8)
            blob = ((j - cj) ** 2 + (i - ci) ** 2 < rng.integers(40, 90)) & (mask > 0)
            truth[blob] = label
    hu = hu.astype(np.float32)
    for label, offset in LEVELS.items():
        hu[truth == label] += offset
    annotation = truth.copy()
    annotation[(rng.random(hu.shape) < 0.5) & (truth == 1)] = 0  # sparse healthy annotation
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in (("ct.nrrd", hu.astype(np.int16)), ("mask.nrrd", mask), ("ann.nrrd", annotation)):
        image = sitk.GetImageFromArray(arr)
        image.SetSpacing((0.8, 0.8, 2.5))
        sitk.WriteImage(image, str(folder / name))
    return hu, mask, annotation


def make_manifest(root: Path, n_cases: int = 4, shape=(4, 64, 88)) -> Path:
    rows = []
    for n in range(n_cases):
        make_case(root / f"case{n}", seed=n, shape=shape)
        rows.append([f"case{n}", f"case{n}/ct.nrrd", f"case{n}/mask.nrrd", f"case{n}/ann.nrrd"])
    write_manifest(root / "cases.csv", rows)
    return root / "cases.csv"

"""What the simulator gives back: the modified CT, its labels and a record per region."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..imaging.noise import NoiseModel


@dataclass
class SimulatedRegion:
    """One inserted region (a pattern region or an annotated healthy patch).

    label: class value (1..6). centre_mm: LPS position (mm) of the region's centroid.
    size_mm: extent (mm) of its bounding box along x (right->left), y (anterior->
    posterior), z (cranio-caudal). volume_ml: lung volume labelled with it in truth.
    annotated_ml: part of it in the annotation.
    parameters: the values drawn for this region (HU, sizes, counts).
    """

    label: int
    name: str
    centre_mm: Tuple[float, float, float]
    size_mm: Tuple[float, float, float]
    volume_ml: float
    subpleural: bool
    annotated: bool
    annotated_ml: float = 0.0
    parameters: Dict[str, float] = field(default_factory=dict)


@dataclass
class SimulatedCase:
    """A CT with simulated patterns and its labels, all K, J, I like the input.

    hu: int16, the CT with patterns inserted (the input array is never modified).
    lung_mask: uint8, 1 right lung, 2 left lung (the given mask, split, or computed).
    truth: uint8 dense truth: 0 outside the lung, 1 healthy, 2..6 patterns.
    annotation: uint8 sparse annotation: 0 not annotated, 1..6 in annotated regions.
    regions: one :class:`SimulatedRegion` per pattern region.
    healthy_patches: the annotated healthy patches.
    noise: the noise model used (measured on the CT; sd possibly configured).
    """

    hu: np.ndarray
    lung_mask: np.ndarray
    truth: np.ndarray
    annotation: np.ndarray
    regions: List[SimulatedRegion]
    healthy_patches: List[SimulatedRegion] = field(default_factory=list)
    noise: Optional[NoiseModel] = None

    @property
    def noise_sd_hu(self) -> float:
        return self.noise.sd_hu if self.noise is not None else 0.0

    @property
    def annotated_fraction(self) -> float:
        """Annotated share of the lung voxels."""
        lung = np.count_nonzero(self.lung_mask)
        return float(np.count_nonzero(self.annotation)) / max(lung, 1)

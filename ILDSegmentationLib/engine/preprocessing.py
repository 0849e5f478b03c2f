"""Intensity handling: from Hounsfield units to the network's input.

The paper feeds CT slices to the network and lets the input normalization
(t0 = x + Norm(x)) adapt to each crop; it states no windowing or scaling. The
paper-faithful default is therefore HU as they are, only clipped to the range a CT
can hold (-1024..3071), which removes padding values such as -3024 or -2048 that
scanners write outside their field of view and that are not tissue.

A model file records the intensity handling it was trained with, and inference
always applies the model's own, so a model trained with another choice is run
correctly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict

import numpy as np


@dataclass(frozen=True)
class Intensity:
    """x = (clip(HU, clip_min, clip_max) - offset) * scale."""

    name: str = "hu"
    clip_min: float = -1024.0
    clip_max: float = 3071.0
    offset: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        values = (self.clip_min, self.clip_max, self.offset, self.scale)
        if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in values):
            raise ValueError("intensity settings must be finite numbers")
        if self.clip_min >= self.clip_max or self.scale == 0:
            raise ValueError("intensity clip_min must be below clip_max and scale non-zero")

    def apply(self, hu: np.ndarray) -> np.ndarray:
        """float32 network input from HU of any dtype (always a new array)."""
        x = np.asarray(hu)
        if x.dtype.kind == "f" and x.dtype.itemsize > 4:
            # Clip before narrowing: a float64 value beyond float32's range would
            # become inf (with an overflow warning) on the way.
            x = np.clip(x, self.clip_min, self.clip_max).astype(np.float32)
        else:
            x = x.astype(np.float32)
            np.clip(x, self.clip_min, self.clip_max, out=x)
        if self.offset:
            x -= np.float32(self.offset)
        if self.scale != 1:
            x *= np.float32(self.scale)
        return x

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Intensity":
        unknown = set(d) - {"name", "clip_min", "clip_max", "offset", "scale"}
        if unknown:
            raise ValueError(f"unknown intensity settings {sorted(unknown)}")
        return cls(**d)


#: Named choices. "hu" is the paper-faithful default; "hu1000" divides by 1000 so
#: the raw branch of t0 = x + Norm(x) is of the same order as the normalized one.
INTENSITY_PRESETS: Dict[str, Intensity] = {
    "hu": Intensity(),
    "hu1000": Intensity(name="hu1000", scale=1e-3),
}

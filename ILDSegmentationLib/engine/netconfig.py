"""The network's architecture description (:class:`NetworkConfig`), without torch.

Stored in every model file; reading a model file's metadata (``modelfile.read_info``)
needs only this, so it works before torch is imported or where torch is missing or
broken (the Slicer panel shows the model's details when it opens). The network
itself is in ``network.py``, which re-exports these names.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Tuple

FIBONACCI_DILATIONS: Tuple[int, ...] = (1, 1, 2, 3, 5, 8, 13, 21, 34, 55)


@dataclass(frozen=True)
class NetworkConfig:
    """Architecture of one network; stored in every model file.

    width: kernels per dilated 3x3 layer (paper: 32).
    dilations: one per dilated layer (paper: Fibonacci 1..55, receptive field 287).
    concatenate: feed the input and all dilated layers' outputs to the 1x1 head
        (paper: yes, 1 + 10 x 32 = 321 maps); otherwise only the last layer's.
    norm: instance normalization with affine parameters, image statistics in
        training and inference alike.
    norm_skip: y = c + Norm(c) (paper) rather than y = Norm(c).
    head: widths of the 1x1 blocks before the final 1x1 conv (paper: 128, 32).
    dropout: before the head (paper: 0.5).
    """

    width: int = 32
    dilations: Tuple[int, ...] = FIBONACCI_DILATIONS
    concatenate: bool = True
    norm: bool = True
    norm_skip: bool = True
    head: Tuple[int, ...] = (128, 32)
    dropout: float = 0.5
    num_classes: int = 6
    in_channels: int = 1
    kernel_size: int = 3

    def __post_init__(self) -> None:
        if self.width < 1 or self.num_classes < 2 or self.in_channels < 1 or not self.dilations:
            raise ValueError("width, num_classes, in_channels must be positive and dilations non-empty")
        if any(d < 1 for d in self.dilations) or self.kernel_size % 2 != 1 or not 0 <= self.dropout < 1:
            raise ValueError("dilations must be >= 1, kernel_size odd, dropout in [0, 1)")

    @property
    def receptive_field(self) -> int:
        return 1 + (self.kernel_size - 1) * sum(self.dilations)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dilations"] = list(self.dilations)
        d["head"] = list(self.head)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "NetworkConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown network settings {sorted(unknown)}")
        kw = dict(d)
        for key in ("dilations", "head"):
            if key in kw:
                kw[key] = tuple(int(v) for v in kw[key])
        for key in ("width", "num_classes", "in_channels", "kernel_size"):
            if key in kw:
                if isinstance(kw[key], bool) or not isinstance(kw[key], int):
                    raise ValueError(f"{key} must be an integer")
        for key in ("concatenate", "norm", "norm_skip"):
            if key in kw and not isinstance(kw[key], bool):
                raise ValueError(f"{key} must be true or false")
        return cls(**kw)

"""The dilated fully convolutional network of Anthimopoulos et al. 2018 (SPEC section 3).

One axial slice crop in (N, 1, H, W), per-pixel class scores out (N, C, H, W), any
H and W. Every ablation of the paper's Table II is a :class:`NetworkConfig`, not a
copy of the code: see :data:`PRESETS`.

Optional ``valid`` masks make zero-padded crops of different sizes batchable with
exactly the result of running each crop alone: the normalization statistics are
taken over the valid pixels only and activations outside them are held at zero, as
the zero "same" padding of an unpadded crop would see them.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F

# The architecture description lives in a torch-free module (model files are read
# without torch, e.g. by the Slicer panel); re-exported here where it always was.
from .netconfig import FIBONACCI_DILATIONS, NetworkConfig  # noqa: F401

EPS = 1e-5

#: Rows of the paper's Table II: (config, parameters x 1e5, CV balanced accuracy %).
PRESETS: Dict[str, NetworkConfig] = {
    "proposed": NetworkConfig(),
    "no-dilation": NetworkConfig(dilations=(1,) * 10),
    "no-concat": NetworkConfig(concatenate=False),
    "no-norm": NetworkConfig(norm=False),
    "no-norm-skip": NetworkConfig(norm_skip=False),
    "width16": NetworkConfig(width=16),
    "exponential-dilation": NetworkConfig(dilations=(1, 1, 2, 4, 8, 16, 32, 64)),
    "9-layers": NetworkConfig(dilations=FIBONACCI_DILATIONS[:9]),
    "width64": NetworkConfig(width=64),
    # Same network as "proposed"; training turns the entropy term off.
    "purely-supervised": NetworkConfig(),
}

#: What the paper reports for each preset (Table II): parameters x 1e5, CV BACC %.
PAPER_TABLE_II: Dict[str, Tuple[float, float]] = {
    "no-dilation": (1.30, 68.0),
    "no-concat": (0.93, 72.6),
    "no-norm": (1.29, 77.9),
    "no-norm-skip": (1.30, 78.6),
    "width16": (0.47, 79.2),
    "exponential-dilation": (1.03, 79.5),
    "purely-supervised": (1.30, 80.6),
    "9-layers": (1.18, 81.3),
    "proposed": (1.30, 81.8),
    "width64": (4.23, 82.1),
}


class InstanceNorm(nn.Module):
    """Instance normalization with affine parameters and no running statistics.

    Statistics always come from the current image (train and eval alike), as in the
    paper. With ``valid`` (N, 1, H, W) they come from the valid pixels only.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None,
                count: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16):
            # Under autocast (training's ``precision="bf16"``) the statistics of a
            # whole crop would lose digits in 8 mantissa bits: take them in float32,
            # and let the next convolution cast back down.
            x = x.float()
            valid = None if valid is None else valid.float()
        if valid is None:
            return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=EPS)
        mean = (x * valid).sum(dim=(2, 3), keepdim=True) / count
        centred = (x - mean) * valid
        var = (centred * centred).sum(dim=(2, 3), keepdim=True) / count
        scale = self.weight.view(1, -1, 1, 1) * torch.rsqrt(var + EPS)
        return centred * scale + self.bias.view(1, -1, 1, 1) * valid


class ByteDropout(nn.Dropout):
    """``nn.Dropout`` with the same distribution, drawn ~7x more cheaply.

    The paper's dropout (0.5) acts on the 321-channel concatenation, tens of millions
    of values per crop; torch's CPU ``bernoulli_`` draws one random number per value
    and took 12-21 % of a training step (profiled on a 2-core AMD EPYC). Here every draw
    of the generator gives seven random bytes, and a value is kept when its byte is
    at least ``256 p``: exactly Bernoulli(1 - p) for the paper's p = 0.5 and for
    every multiple of 1/256. Other rates, and any device but the CPU (where
    ``bernoulli_`` is a fast vectorized kernel), use torch's own dropout.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        threshold = self.p * 256
        if (not self.training or self.p == 0 or x.device.type != "cpu" or threshold != int(threshold)
                or self.inplace or sys.byteorder != "little"):
            return super().forward(x)
        n = x.numel()
        draws = torch.empty((n + 6) // 7, dtype=torch.int64).random_()  # 63 random bits each
        # Little-endian: bytes 0-6 of each draw are uniform; byte 7 holds the sign bit.
        keep = draws.view(torch.uint8).view(-1, 8)[:, :7].reshape(-1)[:n].view(x.shape) >= int(threshold)
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))


class Block(nn.Module):
    """conv -> y = c + Norm(c) (or Norm(c), or c) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int, norm: bool, norm_skip: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation)
        self.norm = InstanceNorm(cout) if norm else None
        self.norm_skip = norm_skip

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None,
                count: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = self.conv(x)
        if valid is not None:
            c = c * valid
        if self.norm is not None:
            n = self.norm(c, valid, count)
            c = c + n if self.norm_skip else n
        return F.relu(c)


class DilatedFCN(nn.Module):
    """The network. forward() returns logits (N, num_classes, H, W); softmax is left
    to the caller (the loss and the inferer), which is numerically safer."""

    def __init__(self, config: NetworkConfig = NetworkConfig()) -> None:
        super().__init__()
        self.config = config
        k = config.kernel_size
        self.input_norm = InstanceNorm(config.in_channels) if config.norm else None
        layers: List[Block] = []
        cin = config.in_channels
        for d in config.dilations:
            layers.append(Block(cin, config.width, k, d, config.norm, config.norm_skip))
            cin = config.width
        self.dilated = nn.ModuleList(layers)
        concat_channels = config.in_channels + config.width * len(config.dilations)
        cin = concat_channels if config.concatenate else config.width
        self.dropout = ByteDropout(config.dropout)
        head: List[Block] = []
        for w in config.head:
            head.append(Block(cin, w, 1, 1, config.norm, config.norm_skip))
            cin = w
        self.head = nn.ModuleList(head)
        self.classifier = nn.Conv2d(cin, config.num_classes, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal convolution weights, zero biases (as the authors' demo)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (N, in_channels, H, W) preprocessed intensities. valid: optional
        (N, 1, H, W) 0/1 mask of the real (unpadded) pixels of each crop."""
        h = self.features(x, valid)
        return self.classify(h, valid)

    def features(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The texture features the 1x1 head reads: the input and every dilated
        layer's output, concatenated (N, concat channels, H, W). Fine-tuning only the
        head computes them once per crop (training/trainer.py, ``trainable="head"``)."""
        if valid is not None:
            valid = valid.to(x.dtype)
            count = valid.sum(dim=(2, 3), keepdim=True).clamp_min(1)
            x = x * valid
        else:
            count = None
        t = x
        if self.input_norm is not None:
            n = self.input_norm(x, valid, count)
            t = x + n if self.config.norm_skip else n
        features = [t]
        h = t
        for block in self.dilated:
            h = block(h, valid, count)
            features.append(h)
        return torch.cat(features, dim=1) if self.config.concatenate else h

    def classify(self, h: torch.Tensor, valid: Optional[torch.Tensor] = None, start: int = 0) -> torch.Tensor:
        """Logits from :meth:`features` (``start=0``: dropout, the 1x1 head, the
        classifier) or from :meth:`head_input` with the same ``start`` (the head's
        blocks from index ``start`` on, and the classifier)."""
        count = None
        if valid is not None:
            valid = valid.to(h.dtype)
            count = valid.sum(dim=(2, 3), keepdim=True).clamp_min(1)
        if start == 0:
            h = self.dropout(h)
        for block in self.head[start:]:
            h = block(h, valid, count)
        return self.classifier(h)

    def head_input(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None, start: int = 0) -> torch.Tensor:
        """What head block ``start`` reads, with the earlier blocks as in evaluation
        (no dropout): fine-tuning only the later layers computes it once per crop."""
        h = self.features(x, valid)
        if start:
            count = None if valid is None else valid.to(h.dtype).sum(dim=(2, 3), keepdim=True).clamp_min(1)
            v = None if valid is None else valid.to(h.dtype)
            for block in self.head[:start]:
                h = block(h, v, count)
        return h

    def head_parameters(self, start: int = 0) -> List[nn.Parameter]:
        """The parameters :meth:`classify` trains from head block ``start`` on."""
        return [p for m in (*self.head[start:], self.classifier) for p in m.parameters()]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(config: NetworkConfig) -> Dict[str, Any]:
    """Layers, parameter count and receptive field, for ``ildseg architecture``."""
    model = DilatedFCN(config)
    layers = []
    if model.input_norm is not None:
        layers.append({"name": "input", "op": "x + Norm(x)" if config.norm_skip else "Norm(x)",
                       "channels": config.in_channels, "parameters": count_parameters(model.input_norm)})
    for i, (block, d) in enumerate(zip(model.dilated, config.dilations), 1):
        layers.append({"name": f"dilated{i}", "op": f"conv {config.kernel_size}x{config.kernel_size} dilation {d}",
                       "channels": block.conv.out_channels, "parameters": count_parameters(block)})
    concat = config.in_channels + config.width * len(config.dilations) if config.concatenate else config.width
    layers.append({"name": "concat+dropout", "op": f"concatenate, dropout {config.dropout}" if config.concatenate
                   else f"dropout {config.dropout}", "channels": concat, "parameters": 0})
    for i, block in enumerate(model.head, 1):
        layers.append({"name": f"head{i}", "op": "conv 1x1", "channels": block.conv.out_channels,
                       "parameters": count_parameters(block)})
    layers.append({"name": "classifier", "op": "conv 1x1, softmax", "channels": config.num_classes,
                   "parameters": count_parameters(model.classifier)})
    return {
        "config": config.to_dict(),
        "layers": layers,
        "parameters": count_parameters(model),
        "receptive_field": config.receptive_field,
    }

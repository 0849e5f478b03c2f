"""Model files: one ``.safetensors`` file, weights plus a JSON description.

A model file is data, never code: it is read with the safetensors format only (no
pickle), and its header is checked before anything is allocated. The metadata key
``ildseg`` holds a JSON object::

    {"format": "ildseg-model", "format_version": 1, "name": str,
     "network": NetworkConfig.to_dict(), "intensity": Intensity.to_dict(),
     "classes": [{"label": 1, "name": "Healthy", "color": [r, g, b]}, ...],
     "trained": bool, "provenance": {...free-form: data, command, date, metrics},
     "decision": {"default": "paper"|"prior", "prior": {"name": "prior", "tau": float,
                  "class_weights": [6 floats]}, ...how it was chosen}   (optional)}

``decision`` is the model's own decision rule for whole lungs (engine/decision.py);
a file without it runs the paper's argmax.

The training CLI writes the same format, so a trained model loads here unchanged.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

from ..imaging.atomicfile import atomic_path
from ..classes import CLASSES
from ..errors import ModelFileError
from .decision import check_model_decision
from .netconfig import NetworkConfig
from .preprocessing import Intensity

# torch is imported only where weights are loaded or written: reading a file's
# metadata (read_info) works without it, so the Slicer panel can show the model
# before torch is loaded (and where it is missing or broken).
if TYPE_CHECKING:
    import torch

    from .network import DilatedFCN

FORMAT = "ildseg-model"
FORMAT_VERSION = 1
METADATA_KEY = "ildseg"

#: A model of the paper's size is ~0.5 MB; the largest preset (width64) ~1.7 MB.
#: Anything far above is not one of ours and is refused before reading it.
MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024
#: safetensors metadata key of :func:`weights_checksum`, beside the model's own metadata.
WEIGHTS_CHECKSUM_KEY = "ildseg_weights_sha256"
_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}

PathLike = Union[str, "os.PathLike[str]"]


def default_model_path() -> Path:
    """The model bundled with the library (and installed with the Slicer module)."""
    return Path(__file__).resolve().parents[1] / "models" / "default.safetensors"


@dataclass
class ModelInfo:
    """What a model file says about itself."""

    name: str
    network: NetworkConfig
    intensity: Intensity = field(default_factory=Intensity)
    classes: List[Dict[str, Any]] = field(default_factory=lambda: [
        {"label": c.label, "name": c.name, "color": list(c.color)} for c in CLASSES])
    trained: bool = False
    provenance: Dict[str, Any] = field(default_factory=dict)
    #: Smallest and largest in-plane pixel spacing (mm) of the training crops, or None
    #: where unknown. The network's dilations are in pixels, so its receptive field in
    #: millimetres, and what a pattern looks like to it, depend on the pixel size;
    #: inference resamples CTs outside this range into it (see inference.py).
    pixel_spacing_mm: Optional[Tuple[float, float]] = None
    #: The model's decision rule for whole lungs (see engine/decision.py), or None:
    #: the paper's argmax. {"default": "paper"|"prior", "prior": {...}, ...}.
    decision: Optional[Dict[str, Any]] = None

    def to_json(self) -> str:
        d = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "name": self.name,
            "network": self.network.to_dict(), "intensity": self.intensity.to_dict(),
            "classes": self.classes, "trained": self.trained, "provenance": self.provenance,
        }
        if self.pixel_spacing_mm is not None:
            d["pixel_spacing_mm"] = list(self.pixel_spacing_mm)
        if self.decision is not None:
            d["decision"] = self.decision
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelInfo":
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ModelFileError(f"model metadata is not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ModelFileError("not an ILD segmentation model (metadata 'format' is not 'ildseg-model')")
        if d.get("format_version") != FORMAT_VERSION:
            raise ModelFileError(f"unsupported model format version {d.get('format_version')!r} "
                                 f"(this version reads {FORMAT_VERSION})")
        for key, kind in (("name", str), ("network", dict), ("intensity", dict), ("classes", list),
                          ("trained", bool), ("provenance", dict)):
            if not isinstance(d.get(key), kind):
                raise ModelFileError(f"model metadata field '{key}' is missing or not a {kind.__name__}")
        try:
            network = NetworkConfig.from_dict(d["network"])
            intensity = Intensity.from_dict(d["intensity"])
        except (TypeError, ValueError) as e:
            raise ModelFileError(f"model metadata describes an invalid network or intensity ({e})") from None
        if network.num_classes != len(CLASSES) or network.in_channels != 1:
            raise ModelFileError(f"model predicts {network.num_classes} classes from {network.in_channels} "
                                 f"channel(s); this tool needs {len(CLASSES)} classes from 1 CT channel")
        if network.width > 1024 or len(network.dilations) > 64 or max(network.dilations) > 4096 \
                or any(w > 4096 for w in network.head):
            raise ModelFileError("model metadata describes an absurdly large network")
        expected = [(c.label, c.name) for c in CLASSES]
        try:
            found = [(int(c["label"]), str(c["name"])) for c in d["classes"]]
        except (TypeError, KeyError, ValueError):
            raise ModelFileError("model metadata 'classes' must be a list of {label, name, color}") from None
        if found != expected:
            raise ModelFileError(f"model classes {found} differ from the six ILD classes {expected}")
        spacing = d.get("pixel_spacing_mm")
        if spacing is not None:
            try:
                lo, hi = (float(v) for v in spacing)
            except (TypeError, ValueError):
                raise ModelFileError("model metadata 'pixel_spacing_mm' must be [smallest, largest] in mm") from None
            if not (0 < lo <= hi < 100):
                raise ModelFileError(f"model metadata 'pixel_spacing_mm' {spacing} is not a range of pixel sizes in mm")
            spacing = (lo, hi)
        decision = d.get("decision")
        if decision is not None:
            try:
                check_model_decision(decision)
            except (TypeError, ValueError) as e:
                raise ModelFileError(f"model metadata 'decision' is invalid ({e})") from None
        return cls(d["name"], network, intensity, d["classes"], d["trained"], d["provenance"], spacing, decision)


@dataclass
class LoadedModel:
    network: DilatedFCN
    info: ModelInfo
    path: Path
    sha256: str


def sha256_of(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_header(path: Path) -> Dict[str, Any]:
    """Parse and check the safetensors header before the library touches the file."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ModelFileError(f"model file {path.name} is {size / 2**20:.0f} MB, far larger than any ILD model")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(f"model file {path.name} is truncated or empty")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise ModelFileError(f"{path.name} is not a safetensors model file (header length {n} "
                                 f"does not fit the file); .pt/.pth pickles are refused")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ModelFileError(f"{path.name} is not a safetensors model file (unreadable header)") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path.name} has a malformed safetensors header")
    data_bytes = size - 8 - n
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(t, dict) or t.get("dtype") not in _DTYPE_BYTES or not isinstance(t.get("shape"), list) \
                or not isinstance(t.get("data_offsets"), list) or len(t["data_offsets"]) != 2:
            raise ModelFileError(f"{path.name}: tensor '{name}' has a malformed or unsupported entry")
        count = 1
        for s in t["shape"]:
            if not isinstance(s, int) or s < 0:
                raise ModelFileError(f"{path.name}: tensor '{name}' has an invalid shape")
            count *= s
        start, end = t["data_offsets"]
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_bytes) \
                or end - start != count * _DTYPE_BYTES[t["dtype"]]:
            raise ModelFileError(f"{path.name}: tensor '{name}' does not fit in the file (truncated or forged)")
    return header


def read_info(path: PathLike) -> ModelInfo:
    """Metadata only (for showing a model's name, classes and provenance)."""
    p = _existing(path)
    meta = _read_header(p).get("__metadata__") or {}
    if METADATA_KEY not in meta:
        raise ModelFileError(f"{p.name} is a safetensors file without ILD model metadata")
    return ModelInfo.from_json(meta[METADATA_KEY])


def _existing(path: PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"model file not found: {p}")
    return p


def load_model(path: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu") -> LoadedModel:
    """Load and validate a model file (default: the bundled one) onto ``device``, in eval mode."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .network import DilatedFCN

    p = _existing(path if path is not None else default_model_path())
    info = read_info(p)
    network = DilatedFCN(info.network)
    try:
        state = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"cannot read the weights in {p.name} ({e})") from None
    expected = network.state_dict()
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))[:3]
        extra = sorted(set(state) - set(expected))[:3]
        raise ModelFileError(f"weights in {p.name} are of another architecture (missing {missing}, unexpected {extra})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ModelFileError(f"weights in {p.name} are of another architecture "
                                 f"('{k}' is {tuple(v.shape)}, expected {tuple(expected[k].shape)})")
        if not torch.isfinite(v).all():
            raise ModelFileError(f"weights in {p.name} contain NaN or infinite values ('{k}')")
    recorded = (_read_header(p).get("__metadata__") or {}).get(WEIGHTS_CHECKSUM_KEY)
    # Files written before the checksum existed carry none and are taken as they are.
    if recorded is not None and recorded != weights_checksum(state):
        raise ModelFileError(f"the weights in {p.name} do not match the checksum written with them: "
                             "the file is damaged; download or copy it again")
    network.load_state_dict({k: v.float() for k, v in state.items()})
    network.eval().to(device)
    return LoadedModel(network, info, p.resolve(), sha256_of(p))


def weights_checksum(state: Dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors' names, shapes and float32 bytes, in name order. A flipped
    bit in the weights still loads as numbers (within range, finite) and gives other
    labels; this catches it."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save_model(path: PathLike, network: DilatedFCN, info: ModelInfo) -> Path:
    """Write a model file atomically (temporary name in the same folder, then rename)."""
    import torch
    from safetensors.torch import save_file

    if info.network != network.config:
        raise ValueError("ModelInfo.network must equal the network's config")
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in network.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata={METADATA_KEY: info.to_json(), WEIGHTS_CHECKSUM_KEY: weights_checksum(state)})
    return Path(path)

"""Choosing where the network runs: CUDA, then Apple MPS, then CPU."""
from __future__ import annotations

import torch

from ..errors import DeviceError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def select_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit choice that is not
    available raises :class:`DeviceError` saying why, rather than silently using CPU."""
    requested = (requested or "auto").lower()
    if requested not in DEVICE_CHOICES and not requested.startswith("cuda:"):
        raise DeviceError(f"unknown device '{requested}' (choose from {', '.join(DEVICE_CHOICES)})")
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"CUDA requested but not available: {why_no_gpu()}")
        return torch.device(requested)
    if requested == "mps" and not _mps_available():
        raise DeviceError("Apple MPS requested but not available on this machine")
    return torch.device(requested)


def why_no_gpu() -> str:
    if torch.version.cuda is None:
        return (f"this torch {torch.__version__} is a CPU-only build; install a CUDA build "
                "(see README, 'GPU users')")
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU or driver"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "mps":
        return "mps (Apple GPU)"
    return f"cpu ({torch.get_num_threads()} threads)"

"""A PNG montage of representative axial slices: CT in a lung window with the
classes colored over it and a legend. Slices are shown in radiological
convention (patient right on the image's left, anterior up), with in-plane pixel
spacing respected."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
from PIL import Image, ImageDraw

from ..imaging.atomicfile import atomic_path
from ..classes import CLASSES
from ..imaging.geometry import Geometry, as_volume, canonical_view

PathLike = Union[str, "os.PathLike[str]"]

LUNG_WINDOW = (-600.0, 1500.0)  # level, width in HU
ALPHA = 0.45
TILE = 256  # pixels of the longer side of each tile


def representative_slices(labels_c: np.ndarray, count: int) -> List[int]:
    """Evenly spaced slices across the lung's extent (canonical axial index)."""
    with_lung = np.flatnonzero(labels_c.reshape(labels_c.shape[0], -1).any(axis=1))
    if with_lung.size == 0:
        return [labels_c.shape[0] // 2]
    if with_lung.size <= count:
        return [int(z) for z in with_lung]
    # Skip the thin apex and base: 10 % to 90 % of the lung's extent.
    positions = np.linspace(0.1, 0.9, count)
    return sorted({int(with_lung[int(round(p * (with_lung.size - 1)))]) for p in positions})


def blend(hu: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A slice (HU, labels 0..6) in the lung window with the class colours blended
    in: float RGB in [0, 1], shape (rows, columns, 3)."""
    level, width = LUNG_WINDOW
    grey = np.clip((hu.astype(np.float32) - (level - width / 2)) / width, 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for c in CLASSES:
        sel = labels == c.label
        if sel.any():
            rgb[sel] = (1 - ALPHA) * rgb[sel] + ALPHA * np.asarray(c.color)
    return rgb


def _tile(hu: np.ndarray, labels: np.ndarray, row_mm: float, col_mm: float) -> Image.Image:
    img = Image.fromarray((blend(hu, labels) * 255).astype(np.uint8))
    h_mm, w_mm = hu.shape[0] * row_mm, hu.shape[1] * col_mm
    scale = TILE / max(h_mm, w_mm)
    return img.resize((max(1, int(round(w_mm * scale))), max(1, int(round(h_mm * scale)))), Image.NEAREST)


def render_overlay(hu: np.ndarray, labels: np.ndarray, geometry: Geometry, path: PathLike,
                   count: int = 6, title: Optional[str] = None) -> Path:
    """Write the montage (PNG) atomically. hu, labels: K,J,I (or J,I)."""
    view = canonical_view(geometry)
    hu_c = view.to_canonical(as_volume(hu))
    lab_c = view.to_canonical(as_volume(labels))
    _, row_mm, col_mm = view.canonical_spacing(geometry)
    tiles = [(z, _tile(hu_c[z], lab_c[z], row_mm, col_mm)) for z in representative_slices(lab_c, count)]
    cols = min(3, len(tiles))
    rows = -(-len(tiles) // cols)
    legend_h = 22 * ((len(CLASSES) + 2) // 3) + 10
    title_h = 24 if title else 0
    canvas = Image.new("RGB", (cols * (TILE + 4) + 4, title_h + rows * (TILE + 4) + 4 + legend_h), "black")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 6), title, fill="white")
    for n, (z, t) in enumerate(tiles):
        x0 = 4 + (n % cols) * (TILE + 4) + (TILE - t.width) // 2
        y0 = title_h + 4 + (n // cols) * (TILE + 4) + (TILE - t.height) // 2
        canvas.paste(t, (x0, y0))
        draw.text((x0 + 3, y0 + 3), f"axial {z + 1}/{hu_c.shape[0]}", fill="yellow")
        draw.text((x0 + 3, y0 + t.height // 2 - 6), "R", fill="white")
    y = title_h + rows * (TILE + 4) + 8
    for n, c in enumerate(CLASSES):
        x = 8 + (n % 3) * ((cols * (TILE + 4)) // 3)
        yy = y + 22 * (n // 3)
        draw.rectangle([x, yy, x + 14, yy + 14], fill=c.color_uint8)
        draw.text((x + 20, yy + 2), f"{c.label} {c.name}", fill="white")
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)

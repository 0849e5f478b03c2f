"""A one-page visual report of a run (PNG or PDF): axial overlay montage, a coronal
view with the zones, a bar chart of the patterns per region, the distribution
descriptors and the input checks' warnings.

matplotlib is optional (``pip install ildsegmentation[report]``); without it a visual
report is refused before any work (:func:`check_available`). The figure is drawn with
matplotlib's object API on its own canvas: no pyplot, no backend switched, nothing
changed for the process (inside 3D Slicer the application's matplotlib state stays
as it was).

Pictures follow radiological convention: patient right on the image's left,
anterior (axial) or superior (coronal) up, pixel spacing respected.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from ..imaging.atomicfile import atomic_path
from ..classes import CLASSES
from ..errors import InputError
from ..imaging.geometry import Geometry, as_volume, canonical_view
from .overlay import _tile, blend, representative_slices
from .regions import SIDES, RegionMaps, region_maps

PathLike = Union[str, "os.PathLike[str]"]
FORMATS = (".png", ".pdf")
PAGE_INCHES = (8.27, 11.69)  # A4 portrait
DPI = 150


def check_available(path: PathLike) -> None:
    """Refuse, before any work, a visual report that cannot be made: a name that is
    not .png or .pdf, or no matplotlib."""
    name = Path(path).name
    if not name.lower().endswith(FORMATS) or len(name) <= 4:
        raise InputError(f"the visual report is a PNG or PDF page: name it .png or .pdf, not {name}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("the visual report needs matplotlib: pip install matplotlib "
                         "(or ildsegmentation[report])") from None


def _montage(hu_c: np.ndarray, lab_c: np.ndarray, row_mm: float, col_mm: float,
             count: int = 6) -> Tuple[np.ndarray, List[int], int]:
    """Axial tiles (as the overlay PNG draws them) side by side, 3 per row: RGB 0..1,
    the slices shown (canonical index) and the tiles per row."""
    from PIL import Image
    slices = representative_slices(lab_c, count)
    tiles = [_tile(hu_c[z], lab_c[z], row_mm, col_mm) for z in slices]
    size = 256
    cols = min(3, len(tiles))
    rows = -(-len(tiles) // cols)
    canvas = Image.new("RGB", (cols * (size + 4), rows * (size + 4)), "black")
    for n, t in enumerate(tiles):
        canvas.paste(t, ((n % cols) * (size + 4) + (size - t.width) // 2,
                         (n // cols) * (size + 4) + (size - t.height) // 2))
    return np.asarray(canvas, dtype=np.float32) / 255.0, slices, cols


def render_visual_report(hu: np.ndarray, labels: np.ndarray, geometry: Geometry, report: Dict[str, Any],
                         path: PathLike, *, title: Optional[str] = None, maps: Optional[RegionMaps] = None) -> Path:
    """Write the one-page report atomically (PNG or PDF by the name's extension).

    hu, labels: K, J, I (or J, I) arrays of the CT (HU) and the label map; report: the
    run's report dict, with the keys of :func:`.regions.regional_volumes` and, when
    present, ``input_checks``; maps: the region maps already computed (else computed
    here from the labels, with the report's band width)."""
    check_available(path)
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    view = canonical_view(geometry)
    hu_c = view.to_canonical(as_volume(np.asarray(hu)))
    lab_c = view.to_canonical(as_volume(np.asarray(labels)))
    slice_mm, row_mm, col_mm = view.canonical_spacing(geometry)
    if maps is None:
        band = (report.get("distribution") or {}).get("band_mm", 10.0)
        maps = region_maps(lab_c, (slice_mm, row_mm, col_mm), band)

    fig = Figure(figsize=PAGE_INCHES, dpi=DPI)
    import textwrap
    fig.suptitle(textwrap.fill(title or "ILD pattern report", 100), fontsize=9, y=0.993, va="top")
    fig.text(0.5, 0.952, "Research software, not for clinical use: read the model card before reading its labels",
             ha="center", fontsize=7, color="darkred")
    grid = fig.add_gridspec(4, 2, height_ratios=[1.25, 1.0, 0.8, 0.55], width_ratios=[1.45, 1.0],
                            left=0.06, right=0.97, top=0.94, bottom=0.03, hspace=0.35, wspace=0.12)

    # Axial montage.
    ax = fig.add_subplot(grid[0, 0])
    montage, slices, cols = _montage(hu_c, lab_c, row_mm, col_mm)
    ax.imshow(montage, interpolation="nearest")
    for n, z in enumerate(slices):
        ax.text((n % cols) * 260 + 6, (n // cols) * 260 + 16, f"axial {z + 1}/{hu_c.shape[0]}", color="yellow",
                fontsize=6)
        ax.text((n % cols) * 260 + 4, (n // cols) * 260 + 130, "R", color="white", fontsize=7)
    ax.set_axis_off()
    ax.set_title("axial slices (patient right on the left)", fontsize=8)

    # Coronal view through the lung's middle, with the zone borders of each lung.
    ax = fig.add_subplot(grid[0, 1])
    lung = lab_c != 0
    per_row = lung.sum(axis=(0, 2))
    row = int(np.argmax(per_row)) if per_row.any() else lab_c.shape[1] // 2
    ax.imshow(blend(hu_c[:, row, :], lab_c[:, row, :]), interpolation="nearest", aspect="equal",
              extent=(0, lab_c.shape[2] * col_mm, lab_c.shape[0] * slice_mm, 0))
    for side, name in SIDES:
        this = maps.side == side
        if not this.any():
            continue
        cols_side = np.flatnonzero(this.any(axis=(0, 1)))
        x0, x1 = cols_side[0] * col_mm, (cols_side[-1] + 1) * col_mm
        zone_of_slice = np.array([int(maps.zone[k][this[k]].max()) if this[k].any() else 0
                                  for k in range(lab_c.shape[0])])
        for k in range(1, len(zone_of_slice)):
            a, b = zone_of_slice[k - 1], zone_of_slice[k]
            if a and b and a != b:
                ax.plot([x0, x1], [k * slice_mm, k * slice_mm], color="white", lw=0.8, ls="--")
    ax.text(4, 12, "R", color="white", fontsize=8)
    ax.set_axis_off()
    ax.set_title(f"coronal, row {row + 1} (dashed: zone borders)", fontsize=8)

    # Percent of each region's lung per pattern (healthy left out: it is the rest).
    ax = fig.add_subplot(grid[1, :])
    regions: List[Dict[str, Any]] = list(report.get("regions", [])) + list(report.get("depth", []))
    names = [f"{r['side'][0].upper()} {r['zone']}" if "zone" in r else r["depth"] for r in regions]
    x = np.arange(len(regions))
    bottom = np.zeros(len(regions))
    for c in CLASSES[1:]:
        values = np.array([next(k["percent_of_region"] for k in r["classes"] if k["label"] == c.label)
                           for r in regions])
        ax.bar(x, values, bottom=bottom, color=c.color, edgecolor="black", linewidth=0.3, label=c.name)
        bottom += values
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize=7)
    ax.set_ylabel("% of the region's lung", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    band = (report.get("distribution") or {}).get("band_mm", maps.band_mm)
    ax.set_title(f"patterns per zone (thirds of each lung's height) and depth (subpleural: within {band:g} mm "
                 "of the costal pleura)", fontsize=8)
    if len(regions) > 6:
        ax.axvline(5.5, color="grey", lw=0.6)
    ax.legend(handles=[Patch(color=c.color, label=c.name) for c in CLASSES[1:]], fontsize=6, ncol=5,
              loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)

    # Distribution descriptors.
    ax = fig.add_subplot(grid[2, :])
    ax.set_axis_off()
    dist = report.get("distribution") or {}

    def fmt(v: Optional[float], pattern: str = "{:.2f}") -> str:
        return "-" if v is None else pattern.format(v)

    percent = {c["label"]: c["percent_of_lung"] for c in report.get("classes", [])}
    patterns = dist.get("patterns", {})
    cell = [[c.name, fmt(percent.get(c.label), "{:.1f}"), fmt(patterns[c.segment_id]["lower_upper_ratio"]),
             fmt(patterns[c.segment_id]["subpleural_fraction"]), fmt(patterns[c.segment_id]["left_right_ratio"])]
            for c in CLASSES if c.segment_id in patterns]
    if cell:
        table = ax.table(cellText=cell, colLabels=["pattern", "% of lung", "lower/upper", "subpleural share",
                                                   "left/right"], loc="upper center", cellLoc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(7)
        table.scale(1.0, 1.15)
    lung_ml = report.get("lung_volume_ml")
    summary = (f"lung {lung_ml:.0f} mL; " if lung_ml is not None else "") + \
        (f"fibrotic extent (reticulation + honeycombing) {dist['fibrotic_percent_of_lung']:.1f} % of the lung; "
         f"the band holds {100 * (dist['lung_subpleural_fraction'] or 0):.0f} % of the lung" if dist else "")
    ax.text(0.5, 0.02, summary, ha="center", va="bottom", fontsize=7, transform=ax.transAxes)
    ax.set_title("distribution (ratios of percent of zone or lung; subpleural share of the pattern's volume)",
                 fontsize=8)

    # Input checks.
    ax = fig.add_subplot(grid[3, :])
    ax.set_axis_off()
    lines = []
    for c in report.get("input_checks", []):
        mark = "WARNING" if c["status"] == "warning" else "ok"
        lines.append(f"[{mark}] {c['check'].replace('_', ' ')}: {c['detail']}")
    wrapped = "\n".join(textwrap.fill(s, 150, subsequent_indent="      ") for s in lines) or "no input checks"
    ax.text(0.0, 1.0, wrapped, ha="left", va="top", fontsize=5.6, family="monospace", transform=ax.transAxes)
    ax.set_title("is this scan suitable? (input checks)", fontsize=8)

    fmt_name = "pdf" if str(path).lower().endswith(".pdf") else "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt_name)
    return Path(path)

"""The one-page picture of ``ildseg compare``: matched axial slices of the baseline and
the registered follow-up side by side with the change map, and the fibrotic extent
per zone at both scans. Needs matplotlib (the ``report`` extra)."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Union

import numpy as np

from ..imaging.atomicfile import atomic_path
from ..imaging.geometry import Geometry, as_volume, canonical_view
from .overlay import blend
from .visual_report import check_available
from .change import NEW_OFFSET, RESOLVED_OFFSET, UNCOVERED

PathLike = Union[str, "os.PathLike[str]"]


def _matched_slices(change_c: np.ndarray, count: int = 3) -> List[int]:
    """Axial slices (canonical) with the most changed voxels, spread over the lung;
    evenly spaced ones when nothing changed."""
    lung = np.flatnonzero(change_c.reshape(change_c.shape[0], -1).any(axis=1))
    if lung.size == 0:
        return [change_c.shape[0] // 2]
    changed = (change_c > NEW_OFFSET).reshape(change_c.shape[0], -1).sum(axis=1)
    thirds = np.array_split(lung, min(count, lung.size))
    return [int(t[np.argmax(changed[t])]) if changed[t].any() else int(t[len(t) // 2]) for t in thirds]


def _change_rgb(hu: np.ndarray, change: np.ndarray) -> np.ndarray:
    """A slice in the lung window: new patterns red, resolved green, not covered grey."""
    rgb = blend(hu, np.zeros_like(change))
    for sel, colour in ((change > RESOLVED_OFFSET, (0.1, 0.9, 0.1)),
                        ((change > NEW_OFFSET) & (change < RESOLVED_OFFSET), (1.0, 0.1, 0.1)),
                        (change == UNCOVERED, (0.5, 0.5, 0.5)),
                        ((change >= 2) & (change <= 6), (1.0, 0.85, 0.0))):
        rgb[sel] = 0.45 * rgb[sel] + 0.55 * np.asarray(colour)
    return rgb


#: Lines of text the page has room for under the chart (6.5 pt monospace).
REPORT_TEXT_LINES = 12


def render_change_report(baseline_hu: np.ndarray, baseline_labels: np.ndarray, followup_hu: np.ndarray,
                         followup_labels: np.ndarray, change: np.ndarray, geometry: Geometry,
                         summary: Dict[str, Any], path: PathLike) -> Path:
    """Write the page (PNG or PDF by the name) atomically. Every array K, J, I on the
    baseline grid (``geometry``): the follow-up CT and labels registered onto it."""
    check_available(path)
    from matplotlib.figure import Figure

    view = canonical_view(geometry)
    c = [view.to_canonical(as_volume(np.asarray(a))) for a in
         (baseline_hu, baseline_labels, followup_hu, followup_labels, change)]
    _, row_mm, col_mm = view.canonical_spacing(geometry)
    slices = _matched_slices(c[4])
    fig = Figure(figsize=(8.27, 11.69), dpi=110)
    fig.suptitle(textwrap.fill(f"ILD change: {Path(summary['baseline']['ct']).name} -> "
                               f"{Path(summary['followup']['ct']).name}", 100), fontsize=9, y=0.993, va="top")
    fig.text(0.5, 0.965, "Research software, not for clinical use", ha="center", fontsize=7, color="darkred")
    grid = fig.add_gridspec(len(slices) + 2, 3, height_ratios=[1.0] * len(slices) + [1.1, 0.8],
                            left=0.07, right=0.97, top=0.925, bottom=0.02, hspace=0.35, wspace=0.05)
    extent = (0, c[0].shape[2] * col_mm, c[0].shape[1] * row_mm, 0)
    for r, z in enumerate(slices):
        for col, (img, title) in enumerate(((blend(c[0][z], c[1][z]), "baseline"),
                                            (blend(c[2][z], c[3][z]), "follow-up, registered"),
                                            (_change_rgb(c[0][z], c[4][z]),
                                             "change: red new, green resolved,\nyellow same pattern"))):
            ax = fig.add_subplot(grid[r, col])
            ax.imshow(img, extent=extent, interpolation="nearest")
            ax.set_axis_off()
            # Two short lines: one long title ran into its neighbour's.
            ax.set_title(f"axial {z + 1}/{c[0].shape[0]}: {title}", fontsize=7)
            ax.text(3, 12, "R", color="white", fontsize=7)

    ax = fig.add_subplot(grid[len(slices), :])
    regions = summary["regions"]
    shown = [r for r in regions if r["zone"] != "all" or r["depth"] != "all"]
    x = np.arange(len(shown))
    ax.bar(x - 0.2, [r["fibrotic_extent"]["baseline"] for r in shown], 0.4, label="baseline", color="#4477aa")
    ax.bar(x + 0.2, [r["fibrotic_extent"]["followup"] for r in shown], 0.4, label="follow-up", color="#cc3311")
    ax.set_xticks(x)
    ax.set_xticklabels([r["region"] for r in shown], fontsize=7)
    ax.set_ylabel("fibrotic extent, % of region", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7)
    ax.set_title("reticulation + honeycombing per zone and depth", fontsize=8)

    ax = fig.add_subplot(grid[len(slices) + 1, :])
    ax.set_axis_off()
    fe, reg = summary["fibrotic_extent"], summary["registration"]
    lines = [f"fibrotic extent {fe['baseline']:.2f} % -> {fe['followup']:.2f} % of the lung: {fe['change']:+.2f} "
             f"percentage points ({'significant' if fe['significant'] else 'not significant'}, minimum detectable "
             f"change {fe['mdc_percent_points']:g} pp)",
             f"lung {summary['lung']['baseline_ml']:.0f} mL -> {summary['lung']['followup_ml']:.0f} mL; registration: "
             f"lung Dice {reg['lung_dice_affine']:.3f} affine, {reg['lung_dice']:.3f} deformable"]
    lines += [f"{k['name']}: {k['baseline_percent']:.2f} -> {k['followup_percent']:.2f} % ({k['change_percent_points']:+.2f}"
              f" pp{', significant' if k['significant'] else ''})" for k in summary["classes"]]
    text = [t for line in lines for t in textwrap.wrap(line, 128)]
    warnings = [t for w in summary.get("warnings", []) for t in textwrap.wrap(f"WARNING {w}", 128)]
    # What fits under the chart at this size; the rest is in change.json, and said so.
    room = REPORT_TEXT_LINES - len(text)
    if len(warnings) > room:
        warnings = warnings[:room - 1] + ["... more warnings in change.json"]
    ax.text(0, 1, "\n".join(text + warnings), va="top", fontsize=6.5, family="monospace", transform=ax.transAxes)
    fmt = "pdf" if str(path).lower().endswith(".pdf") else "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt)
    return Path(path)

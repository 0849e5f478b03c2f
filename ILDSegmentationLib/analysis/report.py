"""Per-pattern volumes: the numbers a radiologist reads off the result."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from ..classes import CLASSES
from ..imaging.geometry import Geometry


def class_volumes(labels: np.ndarray, geometry: Geometry) -> Dict[str, Any]:
    """Lung volume and, per class, voxels, mL and percent of the lung.

    The lung is every voxel with a non-zero label (the engine labels every lung
    voxel), so the classes add up to the lung."""
    counts = np.bincount(labels.ravel(), minlength=len(CLASSES) + 1)
    lung_voxels = int(counts[1:].sum())
    ml = geometry.voxel_volume_ml
    classes: List[Dict[str, Any]] = []
    for c in CLASSES:
        n = int(counts[c.label])
        classes.append({
            "label": c.label, "name": c.name, "abbreviation": c.abbreviation,
            "voxels": n, "volume_ml": round(n * ml, 6),
            "percent_of_lung": round(100.0 * n / lung_voxels, 4) if lung_voxels else 0.0,
        })
    return {"lung_voxels": lung_voxels, "lung_volume_ml": round(lung_voxels * ml, 6),
            "voxel_volume_ml": ml, "classes": classes}


def format_table(volumes: Dict[str, Any]) -> str:
    rows = [f"{'label':>5}  {'class':<22} {'volume (mL)':>12} {'% of lung':>10}"]
    for c in volumes["classes"]:
        rows.append(f"{c['label']:>5}  {c['name']:<22} {c['volume_ml']:>12.1f} {c['percent_of_lung']:>10.1f}")
    rows.append(f"{'':>5}  {'Lung (total)':<22} {volumes['lung_volume_ml']:>12.1f} {100.0 if volumes['lung_voxels'] else 0.0:>10.1f}")
    return "\n".join(rows)


def panel_results(report: Dict[str, Any]) -> Dict[str, Any]:
    """What a results panel (the 3D Slicer module's) shows of a run, from its report
    dict, with no Slicer needed:

    * ``columns``: the regions table's column names (:data:`.regions.TABLE_COLUMNS`);
    * ``rows``: one list of values per region x class, in that column order: the whole
      lung, each lung, each lung's upper/middle/lower zone, the subpleural band and the
      core (``volume_ml`` in mL, ``percent_of_region`` in percent of that region's lung);
    * ``distribution``: the printed descriptors (lower/upper, subpleural, left/right,
      fibrotic extent) as text lines;
    * ``warnings``: one line per input check that warns (``<check>: <detail>``), empty
      when the scan looks suitable.

    A report without ``regions`` (written by an older ildseg) gives the whole-lung rows only."""
    from .regions import TABLE_COLUMNS, format_regions, table_rows
    from .suitability import warning_lines
    rows = [[r[c] for c in TABLE_COLUMNS] for r in table_rows(report)]
    text = format_regions(report)
    start = text.find("distribution")
    return {"columns": list(TABLE_COLUMNS), "rows": rows,
            "distribution": text[start:].splitlines() if start >= 0 else [],
            "warnings": warning_lines(report)}


UNTRAINED_WARNING = ("WARNING: the model '{name}' is UNTRAINED (random weights): its labels are meaningless. "
                     "Give a trained model with --model.")


def model_notice(model: dict) -> Optional[str]:
    """What a user must know about the weights before reading the labels: that they
    are untrained, or the model file's own warning (e.g. trained on simulated data)."""
    if not model["trained"]:
        return UNTRAINED_WARNING.format(name=model["name"])
    warning = (model.get("provenance") or {}).get("warning")
    return f"note on the model: {warning}" if warning else None

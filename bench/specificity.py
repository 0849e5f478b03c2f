"""Specificity on chest CTs without ILD: how much normal lung a model calls disease, and where.

Runs a model as ``ildseg segment`` does with its defaults (automatic lung mask,
``--pixel-spacing model``) on CTs that show no interstitial disease, and reports per
CT the percent of lung in each class and where the non-healthy voxels lie:

* **basal subpleural**: in the lowest third of the lung's height (axial slices from
  the lung mask's first to its last) and within ``SUBPLEURAL_MM`` (10 mm, in-plane)
  of the costal pleura. The costal pleura is taken as the edge of the convex hull of
  both lungs on that slice: ribs make the chest wall convex, while the mediastinum
  and the diaphragm's dome are concavities inside that hull, so distance to the
  outside of the hull is distance to the chest wall (lateral, anterior and posterior
  costal pleura), not to the dome or the heart. This is where fibrosis is looked for.
* **hilar**: else, in the upper two thirds of the lung's height, within ``HILAR_MM``
  (20 mm, in-plane) of the mediastinum, taken on each slice with both lungs as the
  largest non-lung region inside their joint convex hull (heart, great vessels,
  hila, oesophagus and the front of the spine form one connected block there).
  Hilar vessels, main and lobar bronchial walls and the lung against the heart and
  the paravertebral gutters lie here. Not in the basal third: there the largest
  such region also holds the liver or spleen under the diaphragm's dome, and lung
  against the dome is not hilar.
* **elsewhere**: the rest of the lung, including lung against the dome of the
  diaphragm away from the costal pleura.

The three regions partition the measured lung, so their non-healthy shares add up
to the CT's total non-healthy share (voxel counts exactly, percentages to rounding).
Tumour voxels are left out of the measure (of every denominator too) where a tumour
label lies beside the CT (a file in its folder whose name has ``tumor``/``tumour``
and ``label``): a tumour called consolidation is fair. Each region's own share of
the lung is reported with it, so "x % of the lung is disease in the hilar region"
can be read against how much lung that region is.

Run it on the CC BY CTs of ``../shared/data`` (``--data``, or ``$ILDSEG_TEST_DATA``)::

    python bench/specificity.py [--model MODEL] [--json out.json] [--overlay-dir DIR]

Nothing is asserted: it is a benchmark. The issue's goal for a CT without ILD is
>= 95 % healthy, reticulation + honeycombing <= 1 %, micronodules <= 2 %; the table
marks the figures that miss it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage

import benchmain  # noqa: E402  (bench/benchmain.py: the checkout on the path, main()'s wrapper)

from ILDSegmentationLib.classes import CLASSES  # noqa: E402
from ILDSegmentationLib.errors import InputError  # noqa: E402
from ILDSegmentationLib.imaging.geometry import Geometry, as_volume, canonical_view  # noqa: E402

#: In-plane distance (mm) to the costal pleura within which basal lung is subpleural.
SUBPLEURAL_MM = 10.0
#: In-plane distance (mm) to the mediastinum within which lung is hilar.
HILAR_MM = 20.0
#: The basal region is the lowest this fraction of the lung's height.
BASAL_FRACTION = 1.0 / 3.0
#: Regions, in the order they claim a voxel.
REGIONS = ("basal_subpleural", "hilar", "elsewhere")
#: The CC BY CTs of ../shared/data without ILD (README there): CT folder names. The
#: RICORD CT (CC BY-NC, COVID-19 ground glass) and the MedSeg slices (no HU) are not
#: CTs without disease.
CC_BY_CTS = ("lung-pet-ct-dx-A0002", "lidc-idri-0001", "lidc-idri-0002", "cptac-lscc-c3n-00247",
             "tcga-luad-tcga-17-z013", "tcga-luad-tcga-17-z015")
#: The issue's goals for a CT without ILD (percent of lung).
GOAL_HEALTHY_MIN = 95.0
GOAL_RET_HC_MAX = 1.0
GOAL_MICRONODULES_MAX = 2.0


def regions(lung: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Region index per voxel (K, J, I or J, I like ``lung``): -1 outside the lung,
    else the index into :data:`REGIONS`. ``lung``: non-zero = lung (both lungs; 1/2
    labels are not needed, the two lungs are told apart by their 2D components)."""
    from ILDSegmentationLib.imaging.lungsides import split_left_right
    from ILDSegmentationLib.imaging.lungmask import _convex_hull_2d
    view = canonical_view(geometry)
    lung_c = view.to_canonical(as_volume(np.asarray(lung)) != 0)
    _, row_mm, col_mm = view.canonical_spacing(geometry)
    out = np.full(lung_c.shape, -1, np.int8)
    slices = np.flatnonzero(lung_c.any(axis=(1, 2)))
    if slices.size == 0:
        return view.from_canonical(out).reshape(np.shape(lung))
    first, last = int(slices[0]), int(slices[-1])
    # Canonical slices run superior -> inferior: the base is at the end.
    basal_from = last + 1 - (last - first + 1) * BASAL_FRACTION
    sides = split_left_right(lung_c)
    for z in slices:
        here = lung_c[z]
        joint = _convex_hull_2d(here)
        to_wall = ndimage.distance_transform_edt(joint, sampling=(row_mm, col_mm))
        mediastinum = np.zeros_like(here)
        if z < basal_from and (sides[z] == 1).any() and (sides[z] == 2).any():
            # The largest non-lung region inside the lungs' joint hull: heart, great
            # vessels, hila, oesophagus and the front of the spine, one connected block.
            pieces, n = ndimage.label(joint & ~here)
            if n:
                sizes = np.bincount(pieces.ravel())
                sizes[0] = 0
                mediastinum = pieces == int(np.argmax(sizes))
        if mediastinum.any():
            to_mediastinum = ndimage.distance_transform_edt(~mediastinum, sampling=(row_mm, col_mm))
            hilar = to_mediastinum <= HILAR_MM
        else:
            hilar = np.zeros_like(here)
        basal = (to_wall <= SUBPLEURAL_MM) if z >= basal_from else np.zeros_like(here)
        region = np.full(here.shape, 2, np.int8)
        region[hilar] = 1
        region[basal] = 0
        region[~here] = -1
        out[z] = region
    return np.ascontiguousarray(view.from_canonical(out)).reshape(np.shape(lung))


def measure(labels: np.ndarray, lung: np.ndarray, geometry: Geometry,
            tumour: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """Per-class and per-region figures of one segmented CT.

    labels: the label map (0 outside the lung, 1 healthy ... 6), lung: the lung mask
    the labels were made in (non-zero = lung), tumour: optional mask of voxels to
    leave out. Counts are voxels of the measured lung (lung less tumour); percents are
    of the measured lung. ``regions[r]["non_healthy_voxels"]`` sum to
    ``non_healthy_voxels`` exactly.
    """
    labels = np.asarray(labels)
    lung = np.asarray(lung) != 0
    if labels.shape != lung.shape:
        raise InputError(f"labels {labels.shape} and lung mask {lung.shape} differ in shape")
    if tumour is not None and np.shape(tumour) != lung.shape:
        raise InputError(f"tumour mask {np.shape(tumour)} and lung mask {lung.shape} differ in shape")
    left_out = np.zeros(lung.shape, bool) if tumour is None else (np.asarray(tumour) != 0) & lung
    measured = lung & ~left_out
    n = int(np.count_nonzero(measured))
    if n == 0:
        raise InputError("no lung to measure (the lung mask is empty, or all tumour)")
    region = regions(lung, geometry)
    voxel_ml = geometry.voxel_volume_ml
    lab = labels[measured]
    reg = region[measured]
    class_counts = np.bincount(lab, minlength=7)[:7]
    pct = lambda v: 100.0 * int(v) / n  # noqa: E731  (plain floats: the report is JSON)
    out: Dict[str, Any] = {
        "lung_ml": round(float(np.count_nonzero(lung)) * voxel_ml, 1),
        "tumour_ml_left_out": round(float(np.count_nonzero(left_out)) * voxel_ml, 1),
        "measured_ml": round(n * voxel_ml, 1),
        "measured_voxels": n,
        "classes": {c.abbreviation: {"voxels": int(class_counts[c.label]), "percent": pct(class_counts[c.label])}
                    for c in CLASSES},
    }
    non_healthy = lab != 1
    out["non_healthy_voxels"] = int(np.count_nonzero(non_healthy))
    out["non_healthy_percent"] = pct(out["non_healthy_voxels"])
    out["regions"] = {}
    for index, name in enumerate(REGIONS):
        in_region = reg == index
        by_class = np.bincount(lab[in_region], minlength=7)[:7]
        out["regions"][name] = {
            "lung_voxels": int(np.count_nonzero(in_region)),
            "lung_percent": pct(np.count_nonzero(in_region)),
            "non_healthy_voxels": int(np.count_nonzero(in_region & non_healthy)),
            "non_healthy_percent": pct(np.count_nonzero(in_region & non_healthy)),
            # How much of the region itself is called disease (None for an empty region).
            "non_healthy_percent_of_region": (100.0 * int(np.count_nonzero(in_region & non_healthy))
                                              / int(np.count_nonzero(in_region))) if in_region.any() else None,
            "by_class_voxels": {c.abbreviation: int(by_class[c.label]) for c in CLASSES if c.label != 1},
        }
    c = out["classes"]
    out["meets_goal"] = {
        "healthy": bool(c["H"]["percent"] >= GOAL_HEALTHY_MIN),
        "reticulation_honeycombing": bool(c["Ret"]["percent"] + c["HC"]["percent"] <= GOAL_RET_HC_MAX),
        "micronodules": bool(c["MN"]["percent"] <= GOAL_MICRONODULES_MAX),
    }
    return out


def find_tumour_label(ct_path: Path) -> Optional[Path]:
    """A tumour label beside the CT: a file in its folder (or in the folder it is)
    whose name has "tumor" or "tumour" and "label"."""
    folder = ct_path if ct_path.is_dir() else ct_path.parent
    found = sorted(p for p in folder.iterdir() if p.is_file() and "label" in p.name.lower()
                   and ("tumor" in p.name.lower() or "tumour" in p.name.lower()))
    return found[0] if found else None


def find_ct(folder: Path) -> Path:
    """The CT of a data folder: ``<folder>/<folder name>.nrrd`` (or .nii.gz, .mha), else
    the folder itself when it holds a DICOM series."""
    for ext in (".nrrd", ".nii.gz", ".nii", ".mha"):
        candidate = folder / f"{folder.name}{ext}"
        if candidate.is_file():
            return candidate
    if any(p.suffix.lower() == ".dcm" for p in folder.iterdir()):
        return folder
    raise InputError(f"no CT in {folder} (expected {folder.name}.nrrd or a DICOM series)")


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def run_ct(ct_path: Path, inferer: Any, overlay: Optional[Path] = None, title: str = "") -> Dict[str, Any]:
    """Segment one CT as ``ildseg segment`` does (automatic lung mask) and measure it."""
    from ILDSegmentationLib.imaging.io import read_ct, read_lung_mask
    from ILDSegmentationLib.imaging.lungmask import compute_lung_mask
    t0 = time.perf_counter()
    ct = read_ct(ct_path)
    mask = compute_lung_mask(ct.array, ct.geometry)
    result = inferer.segment(ct.array, mask, ct.geometry)
    labels = result.labels.reshape(np.shape(ct.array))
    tumour_path = find_tumour_label(ct_path)
    tumour = None if tumour_path is None else read_lung_mask(tumour_path, ct)
    figures = measure(labels, mask, ct.geometry, tumour)
    figures["ct"] = str(ct_path)
    figures["tumour_label"] = None if tumour_path is None else tumour_path.name
    figures["network_pixel_spacing_mm"] = [round(v, 4) for v in result.network_pixel_spacing_mm]
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    if overlay is not None:
        from ILDSegmentationLib.analysis.overlay import render_overlay
        render_overlay(ct.array, labels, ct.geometry, overlay, count=9, title=title)
        figures["overlay"] = str(overlay)
        region_png = overlay.with_name(overlay.stem + "-regions.png")
        render_regions(ct.array, regions(mask, ct.geometry), ct.geometry, region_png,
                       title=f"{Path(ct_path).name}: regions of the specificity benchmark")
        figures["regions_overlay"] = str(region_png)
    return figures


#: Region colours of the region montage (RGB 0..1): red, yellow, light blue.
REGION_COLOURS = ((1.0, 0.0, 0.0), (1.0, 0.85, 0.0), (0.3, 0.6, 1.0))


def render_regions(hu: np.ndarray, region: np.ndarray, geometry: Geometry, path: Path, title: str = "") -> Path:
    """A PNG montage of the regions (to check their definitions on a CT), in the
    layout of :func:`ILDSegmentationLib.analysis.overlay.render_overlay`."""
    from PIL import Image, ImageDraw
    from ILDSegmentationLib.imaging.atomicfile import atomic_path
    from ILDSegmentationLib.analysis.overlay import LUNG_WINDOW, TILE, representative_slices
    view = canonical_view(geometry)
    hu_c, reg_c = view.to_canonical(as_volume(hu)), view.to_canonical(as_volume(region))
    _, row_mm, col_mm = view.canonical_spacing(geometry)
    level, width = LUNG_WINDOW
    picks = representative_slices(reg_c >= 0, 9)
    cols, rows = min(3, len(picks)), -(-len(picks) // 3)
    canvas = Image.new("RGB", (cols * (TILE + 4) + 4, 24 + rows * (TILE + 4) + 30), "black")
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 6), title, fill="white")
    for n, z in enumerate(picks):
        grey = np.clip((hu_c[z].astype(np.float32) - (level - width / 2)) / width, 0, 1)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        for index, colour in enumerate(REGION_COLOURS):
            sel = reg_c[z] == index
            rgb[sel] = 0.55 * rgb[sel] + 0.45 * np.asarray(colour)
        tile = Image.fromarray((rgb * 255).astype(np.uint8))
        scale = TILE / max(hu_c.shape[1] * row_mm, hu_c.shape[2] * col_mm)
        tile = tile.resize((max(1, int(round(hu_c.shape[2] * col_mm * scale))),
                            max(1, int(round(hu_c.shape[1] * row_mm * scale)))), Image.NEAREST)
        x0, y0 = 4 + (n % 3) * (TILE + 4), 24 + (n // 3) * (TILE + 4)
        canvas.paste(tile, (x0, y0))
        draw.text((x0 + 3, y0 + 3), f"axial {z + 1}/{hu_c.shape[0]}", fill="yellow")
    y = 24 + rows * (TILE + 4) + 8
    for index, (name, colour) in enumerate(zip(REGIONS, REGION_COLOURS)):
        x = 8 + index * 150
        draw.rectangle([x, y, x + 14, y + 14], fill=tuple(int(255 * c) for c in colour))
        draw.text((x + 20, y + 2), name.replace("_", " "), fill="white")
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def format_table(cases: Dict[str, Dict[str, Any]]) -> str:
    """Markdown tables: classes per CT, then regions per CT. A * marks a figure that
    misses the issue's goal."""
    head = "| CT | lung mL (tumour left out) | healthy | GGO | micronodules | consolidation | reticulation | honeycombing |"
    lines = [head, "|" + "---|" * 8]
    for name, f in cases.items():
        c = f["classes"]
        miss = f["meets_goal"]
        tumour = f" ({f['tumour_ml_left_out']:.0f})" if f.get("tumour_label") else ""
        lines.append(
            f"| {name} | {f['measured_ml']:.0f}{tumour} | {c['H']['percent']:.1f} %{'' if miss['healthy'] else ' *'} "
            f"| {c['GGO']['percent']:.1f} | {c['MN']['percent']:.1f}{'' if miss['micronodules'] else ' *'} "
            f"| {c['Cons']['percent']:.1f} | {c['Ret']['percent']:.1f} "
            f"| {c['HC']['percent']:.1f}{'' if miss['reticulation_honeycombing'] else ' *'} |")
    lines += ["", "Non-healthy voxels by region, % of the measured lung [the region's share of the lung; "
              "the share of the region called non-healthy]:", "",
              "| CT | non-healthy | basal subpleural | hilar | elsewhere |", "|---|---|---|---|---|"]

    def cell(r: Dict[str, Any]) -> str:
        rate = r.get("non_healthy_percent_of_region")
        return f"{r['non_healthy_percent']:.1f} [{r['lung_percent']:.0f} %; " + \
            ("-]" if rate is None else f"{rate:.0f} %]")

    for name, f in cases.items():
        r = f["regions"]
        cells = " | ".join(cell(r[k]) for k in REGIONS)
        lines.append(f"| {name} | {f['non_healthy_percent']:.1f} | {cells} |")
    return "\n".join(lines)


def default_data() -> Path:
    env = os.environ.get("ILDSEG_TEST_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="specificity", description="Specificity on chest CTs without ILD: percent of lung per class and "
        "where the non-healthy voxels lie (basal subpleural / hilar / elsewhere), as `ildseg segment` with defaults.")
    p.add_argument("--model", metavar="MODEL", help="model file (.safetensors); default: the bundled model")
    p.add_argument("--data", metavar="DIR", type=Path, default=None,
                   help="the shared data folder (default: $ILDSEG_TEST_DATA or ../shared/data)")
    p.add_argument("--ct", action="append", metavar="NAME",
                   help=f"a CT folder name under --data (repeatable; default: {', '.join(CC_BY_CTS)})")
    p.add_argument("--json", metavar="OUT.json", type=Path, help="write every figure and the machine as JSON")
    p.add_argument("--overlay-dir", metavar="DIR", type=Path,
                   help="write per CT a PNG montage of the labels (NAME.png) and of the regions (NAME-regions.png)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto, as `ildseg segment`)")
    p.add_argument("--pixel-spacing", default="model", choices=("model", "native"),
                   help="as `ildseg segment` (default: model)")
    p.add_argument("--decision", default="auto", choices=("auto", "paper", "prior"),
                   help="decision rule, as `ildseg segment` (default: auto)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    return benchmain.run_main("specificity", build_parser, _run, argv)


def _run(args: argparse.Namespace) -> int:
    from ILDSegmentationLib.commands.bench import machine_info
    from ILDSegmentationLib.engine.inference import Inferer
    from ILDSegmentationLib.engine.modelfile import load_model
    data = args.data or default_data()
    if not data.is_dir():
        raise InputError(f"data folder {data} not found (give --data or set ILDSEG_TEST_DATA)")
    names = args.ct or list(CC_BY_CTS)
    folders = [data / n for n in names]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise InputError(f"CT folder not found: {', '.join(missing)}")
    for path in (args.json,):
        if path is not None and not path.parent.is_dir():
            raise InputError(f"folder of {path} does not exist")
    loaded = load_model(args.model)
    inferer = Inferer(loaded, device=args.device, pixel_spacing=args.pixel_spacing, decision=args.decision)
    if args.overlay_dir is not None:
        args.overlay_dir.mkdir(parents=True, exist_ok=True)
    cases: Dict[str, Dict[str, Any]] = {}
    for name, folder in zip(names, folders):
        ct_path = find_ct(folder)
        overlay = None if args.overlay_dir is None else args.overlay_dir / f"{name}.png"
        print(f"{name}: segmenting ...", file=sys.stderr, flush=True)
        cases[name] = run_ct(ct_path, inferer, overlay, title=f"{name} - model: {loaded.info.name}")
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "model": {"file": str(loaded.path), "sha256": loaded.sha256, "name": loaded.info.name},
        "settings": {"lung_mask": "automatic", "pixel_spacing": args.pixel_spacing, "device": args.device,
                     "decision": inferer.decision.describe(),
                     "subpleural_mm": SUBPLEURAL_MM, "hilar_mm": HILAR_MM, "basal_fraction": BASAL_FRACTION},
        "machine": machine_info(),
        "cases": cases,
    }
    print(format_table(cases))
    m = report["machine"]
    print(f"\ndecision rule: {inferer.decision.describe()}")
    print(f"model {loaded.path.name} (sha256 {loaded.sha256[:12]}), commit {report['commit']}, {report['date']}; "
          f"{m['cpu_model']}, {m['cpu_usable']} CPUs usable, torch {m['torch']}")
    if args.json is not None:
        from ILDSegmentationLib.imaging.atomicfile import atomic_path
        with atomic_path(args.json) as tmp:
            Path(tmp).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    benchmain.run_script(main)

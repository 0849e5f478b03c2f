#!/usr/bin/env python
"""Labels under a changed lung mask (issue 17, part 3): how many labels a model keeps
when the lung mask's border moves by a few pixels, as it does between mask tools.

    python bench/mask_stability.py [--ct NAME|PATH ...] [--slices 10] [--policies mask,aerated]
                                   [--model MODEL] [--json out.json] [--data DIR] [--device cpu]
    python bench/mask_stability.py --from-json run1.json run2.json ... [--json pooled.json]

All seven CTs with 10 slices take about 15-30 minutes on 2 busy cores; one CT per run
(``--ct NAME --json NAME.json``, 2-4 minutes each) and ``--from-json`` to pool them
keep each job short.

For each CT (default: the real HU CTs of ``../shared/data``, the six CC BY CTs and
RICORD 000082):

1. the automatic lung mask (:func:`ILDSegmentationLib.imaging.lungmask.compute_lung_mask`) of
   the whole CT;
2. ``--slices`` axial slices spread evenly over the lung's height (the first and last
   lung slice left out); the whole CT goes to the engine, which segments only these
   slices (the network is 2D: they get the labels a whole-CT run gives them, and the
   right/left split of the mask sees every slice, as in ``ildseg segment``);
3. the reference labels: the model with that mask, as ``ildseg segment`` runs it
   (``--pixel-spacing model``), for each crop-box policy of ``--policies``;
4. the same with the mask changed in-plane (per axial slice): dilated by 1, 3, 6
   pixels (a disk), eroded by 1, 3, 6 pixels, and smoothed (Gaussian of
   ``SMOOTH_SIGMA_PX`` pixels, thresholded at 0.5, as a tool with a smoother border
   draws it). Pixels are the CT's own;
5. the share of labels unchanged, overall and per class as labelled in the reference
   run, inside the original mask (dilation), inside the eroded mask (erosion), inside
   both masks (smoothing): only pixels labelled in both runs count.

Policies (how each lung's crop box is placed; labels are always written inside the
mask): ``mask`` (the paper's, the default of ``ildseg segment``: mask box + 32 px),
``aerated`` (``--crop-box aerated``: the box of the aerated lung the mask outlines,
found in the CT), and candidates measured for the choice (BENCHMARKS.md):
``margin48`` / ``margin64`` (a wider margin), ``grid8`` / ``grid16`` (the paper's box
with its edges rounded outward to multiples of 8 / 16 pixels), ``opened3`` (the box
of the mask opened by a 3-px disk, so specks and strands do not widen it), ``tta3``
(softmax averaged over margins 24, 32, 40; three times the network time). Each
policy's reference is compared with the paper's (``vs_mask``): what the policy itself
changes.

The goal of the issue: with a 3-px dilation, >= 99 % of labels unchanged overall and
>= 95 % for every class; the summary marks it per policy (classes with fewer than
``MIN_CLASS_VOXELS`` reference voxels in all CTs together are listed, not judged).

Runs from a checkout without installing: the repository root is put on the path.
RICORD is non-commercial: it is evaluated here, never trained on; the JSON holds only
figures.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

import benchmain  # noqa: E402  (bench/benchmain.py: the checkout on the path, main()'s wrapper)

REPO = benchmain.REPO

from ILDSegmentationLib.classes import CLASSES  # noqa: E402
from ILDSegmentationLib.engine.cropping import CROP_MARGIN, CropBox, crop_boxes  # noqa: E402
from ILDSegmentationLib.errors import InputError  # noqa: E402
from ILDSegmentationLib.imaging.geometry import Geometry, canonical_view  # noqa: E402

#: The mask changes measured: (name, kind, pixels).
PERTURBATIONS: Tuple[Tuple[str, str, float], ...] = (
    ("dilate1", "dilate", 1), ("dilate3", "dilate", 3), ("dilate6", "dilate", 6),
    ("erode1", "erode", 1), ("erode3", "erode", 3), ("erode6", "erode", 6),
    ("smooth", "smooth", 2.0),
)
#: Sigma (pixels, in-plane) of the Gaussian that smooths the mask for "smooth".
SMOOTH_SIGMA_PX = 2.0
#: The issue's goal at a 3-px dilation (percent of labels unchanged).
GOAL_OVERALL = 99.0
GOAL_PER_CLASS = 95.0
GOAL_PERTURBATION = "dilate3"
#: A class needs this many reference voxels (all CTs together) to be judged by the goal.
MIN_CLASS_VOXELS = 500
#: The real HU CTs of ../shared/data (folder names); the MedSeg slices have no HU.
DEFAULT_CTS = ("lung-pet-ct-dx-A0002", "lidc-idri-0001", "lidc-idri-0002", "cptac-lscc-c3n-00247",
               "tcga-luad-tcga-17-z013", "tcga-luad-tcga-17-z015", "ricord-000082")
POLICIES = ("mask", "aerated", "margin48", "margin64", "grid8", "grid16", "opened3", "tta3")
TTA_MARGINS = (24, 32, 40)


# -- the measurement ----------------------------------------------------------------
def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return (x * x + y * y <= radius * radius)[None]  # in-plane only: one slice thick


def perturb(mask: np.ndarray, kind: str, amount: float) -> np.ndarray:
    """The mask (bool, canonical K, J, I) changed in-plane, slice by slice: ``dilate`` /
    ``erode`` by a disk of ``amount`` pixels, or ``smooth``: Gaussian of ``amount``
    pixels (sigma, in-plane), thresholded at 0.5. The input is not modified."""
    mask = np.asarray(mask, bool)
    if kind == "dilate":
        return ndimage.binary_dilation(mask, _disk(int(amount)))
    if kind == "erode":
        # border_value=1: the image edge is not a mask border (a lung cut by the field
        # of view is not eroded from there).
        return ndimage.binary_erosion(mask, _disk(int(amount)), border_value=1)
    if kind == "smooth":
        return ndimage.gaussian_filter(mask.astype(np.float32), (0, amount, amount)) >= 0.5
    raise ValueError(f"unknown mask change {kind!r}")


def compared_region(original: np.ndarray, changed: np.ndarray) -> np.ndarray:
    """Where both runs give labels: inside the original mask and the changed one
    (the original mask for a dilation, the eroded mask for an erosion)."""
    return np.asarray(original, bool) & np.asarray(changed, bool)


def agreement(reference: np.ndarray, labels: np.ndarray, region: np.ndarray) -> Dict[str, Any]:
    """Labels kept inside ``region``: overall and per class as labelled in
    ``reference`` (label maps, 0 outside the lung, 1..6). Percent, with the voxel
    counts (None where the region holds no voxel of that class)."""
    region = np.asarray(region, bool)
    ref = np.asarray(reference)[region]
    new = np.asarray(labels)[region]
    same = ref == new
    n = int(ref.size)
    out: Dict[str, Any] = {"voxels": n, "kept": int(same.sum()),
                           "percent": 100.0 * int(same.sum()) / n if n else None, "classes": {}}
    for c in CLASSES:
        sel = ref == c.label
        k = int(sel.sum())
        kept = int(same[sel].sum())
        out["classes"][c.abbreviation] = {"voxels": k, "kept": kept, "percent": 100.0 * kept / k if k else None}
    return out


def pooled(results: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Agreements of several CTs pooled voxel by voxel (the form of :func:`agreement`)."""
    n = sum(r["voxels"] for r in results)
    kept = sum(r["kept"] for r in results)
    out: Dict[str, Any] = {"voxels": n, "kept": kept, "percent": 100.0 * kept / n if n else None, "classes": {}}
    for c in CLASSES:
        k = sum(r["classes"][c.abbreviation]["voxels"] for r in results)
        kk = sum(r["classes"][c.abbreviation]["kept"] for r in results)
        out["classes"][c.abbreviation] = {"voxels": k, "kept": kk, "percent": 100.0 * kk / k if k else None}
    return out


def meets_goal(dilate3: Dict[str, Any], min_class_voxels: int = MIN_CLASS_VOXELS) -> Dict[str, Any]:
    """The issue's goal on a (pooled) 3-px-dilation agreement: overall >= 99 %, every
    class with at least ``min_class_voxels`` reference voxels >= 95 %."""
    judged = {k: v["percent"] for k, v in dilate3["classes"].items() if v["voxels"] >= min_class_voxels}
    failing = sorted(k for k, p in judged.items() if p < GOAL_PER_CLASS)
    overall = dilate3["percent"] is not None and dilate3["percent"] >= GOAL_OVERALL
    return {"overall": bool(overall), "classes_failing": failing,
            "classes_not_judged": sorted(set(dilate3["classes"]) - set(judged)),
            "met": bool(overall and not failing)}


# -- crop-box policies ----------------------------------------------------------------
def _grid_boxes(step: int):
    def boxes(sides: np.ndarray, hu: np.ndarray, z: int) -> List[CropBox]:
        h, w = sides.shape
        return [CropBox(b.slice_index, b.side, b.r0 // step * step, min(-(-b.r1 // step) * step, h),
                        b.c0 // step * step, min(-(-b.c1 // step) * step, w)) for b in crop_boxes(sides, z)]
    return boxes


def _opened_boxes(radius: int):
    def boxes(sides: np.ndarray, hu: np.ndarray, z: int) -> List[CropBox]:
        opened = np.zeros_like(sides)
        for side in (1, 2):
            opened[ndimage.binary_opening(sides == side, _disk(radius)[0])] = side
        anchor = {b.side: b for b in crop_boxes(opened, z)}
        out = []
        for b in crop_boxes(sides, z):  # an edge follows the mask only where the mask leaves the box
            a = anchor.get(b.side)
            if a is None:
                out.append(b)
                continue
            rows = np.flatnonzero((sides == b.side).any(axis=1))
            cols = np.flatnonzero((sides == b.side).any(axis=0))
            out.append(CropBox(z, b.side, b.r0 if rows[0] < a.r0 else a.r0, b.r1 if rows[-1] >= a.r1 else a.r1,
                               b.c0 if cols[0] < a.c0 else a.c0, b.c1 if cols[-1] >= a.c1 else a.c1))
        return out
    return boxes


def _margin_boxes(margin: int):
    return lambda sides, hu, z: crop_boxes(sides, z, margin)


def policy_runs(policy: str) -> List[Any]:
    """The Inferer crop_box arguments a policy runs (several: their softmax is averaged)."""
    if policy in ("mask", "aerated"):
        return [policy]
    if policy.startswith("margin"):
        return [_margin_boxes(int(policy[6:]))]
    if policy.startswith("grid"):
        return [_grid_boxes(int(policy[4:]))]
    if policy.startswith("opened"):
        return [_opened_boxes(int(policy[6:]))]
    if policy == "tta3":
        return [_margin_boxes(m) for m in TTA_MARGINS]
    raise InputError(f"unknown policy {policy!r} (choose from {', '.join(POLICIES)})")


# -- running ----------------------------------------------------------------------------
def pick_slices(lung: np.ndarray, n: int) -> np.ndarray:
    """``n`` axial slices (canonical index) spread evenly over the lung's height,
    the first and last lung slice left out (a sliver of lung at the apex or dome)."""
    zs = np.flatnonzero(np.asarray(lung).reshape(lung.shape[0], -1).any(axis=1))
    if zs.size == 0:
        raise InputError("the lung mask is empty")
    inner = zs[1:-1] if zs.size > 2 else zs
    idx = np.unique(np.linspace(0, inner.size - 1, min(n, inner.size)).round().astype(int))
    return inner[idx]


def segment_labels(inferers: Sequence[Any], hu: np.ndarray, mask: np.ndarray, geometry: Geometry,
                   only: np.ndarray) -> Tuple[np.ndarray, float]:
    """Labels (K, J, I) of one policy on the slices of ``only`` (its inferers' softmax
    averaged when there are several) and the seconds it took."""
    t0 = time.perf_counter()
    if len(inferers) == 1:
        labels = inferers[0].segment(hu, mask, geometry, only_slices_of=only).labels
    else:
        total = None
        for inf in inferers:
            p = inf.segment(hu, mask, geometry, probabilities=True, only_slices_of=only).probabilities
            total = p if total is None else total + p
        labels = np.where(mask & (total.sum(axis=-1) > 0), total.argmax(axis=-1) + 1, 0).astype(np.uint8)
    return labels, time.perf_counter() - t0


def run_ct(hu: np.ndarray, lung: np.ndarray, geometry: Geometry, picked: Sequence[int],
           inferers: Dict[str, Sequence[Any]], progress: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """Every policy and perturbation on one CT (``hu`` K, J, I in HU, ``lung`` its
    mask, bool), measured on the axial slices ``picked`` (canonical indices). The
    whole CT goes to the engine, which segments only those slices: its right/left
    split of the mask sees every slice, as in ``ildseg segment``. Returns, per policy,
    its reference seconds, its agreement with the ``mask`` policy's reference, and per
    perturbation the agreement (:func:`agreement`)."""
    view = canonical_view(geometry)
    lung = np.asarray(lung, bool)
    only_c = np.zeros(view.to_canonical(lung).shape, bool)
    only_c[list(picked)] = True
    only = np.ascontiguousarray(view.from_canonical(only_c))

    def changed(kind: str, amount: float) -> np.ndarray:
        return np.ascontiguousarray(view.from_canonical(perturb(view.to_canonical(lung), kind, amount)))

    out: Dict[str, Any] = {"lung_voxels_measured": int((lung & only).sum()), "changed_voxels": {}, "policies": {}}
    refs: Dict[str, np.ndarray] = {}
    for policy, runs in inferers.items():
        progress(f"{policy}: reference")
        refs[policy], seconds = segment_labels(runs, hu, lung, geometry, only)
        out["policies"][policy] = {"seconds": round(seconds, 2), "perturbations": {}}
        if "mask" in refs:
            out["policies"][policy]["vs_mask"] = agreement(refs["mask"], refs[policy], lung & only)
    # One changed mask at a time (a whole-CT mask per change would hold GBs).
    for name, kind, amount in PERTURBATIONS:
        m = changed(kind, amount)
        out["changed_voxels"][name] = int(((m != lung) & only).sum())
        for policy, runs in inferers.items():
            progress(f"{policy}: {name}")
            labels, _ = segment_labels(runs, hu, m, geometry, only)
            out["policies"][policy]["perturbations"][name] = agreement(
                refs[policy], labels, compared_region(lung, m) & only)
    return out


def find_ct(entry: str, data: Path) -> Path:
    """A CT from a --ct entry: a file or DICOM folder path, or a folder name under
    ``data`` holding ``<name>.nrrd`` / ``.nii.gz`` / ``.mha``, one image, or a DICOM series."""
    path = Path(entry)
    if not path.exists():
        path = data / entry
    if path.is_file():
        return path
    if not path.is_dir():
        raise InputError(f"CT not found: {entry} (neither a path nor a folder in {data})")
    for ext in (".nrrd", ".nii.gz", ".nii", ".mha"):
        if (path / f"{path.name}{ext}").is_file():
            return path / f"{path.name}{ext}"
    images = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith((".nrrd", ".nii.gz", ".nii", ".mha"))
                    and "label" not in p.name.lower())
    if len(images) == 1:
        return images[0]
    if any(p.suffix.lower() == ".dcm" for p in path.iterdir()):
        return path
    raise InputError(f"no CT in {path} (expected {path.name}.nrrd, one image file, or a DICOM series)")


def load_case(path: Path, slices: int):
    """(CT Volume, its automatic lung mask K, J, I bool, picked canonical slice indices)."""
    from ILDSegmentationLib.imaging.io import check_ct_plausible, read_ct
    from ILDSegmentationLib.imaging.lungmask import compute_lung_mask
    ct = read_ct(path)
    check_ct_plausible(ct, path)
    mask = np.asarray(compute_lung_mask(ct.array, ct.geometry)).reshape(np.shape(ct.array)) != 0
    picked = pick_slices(canonical_view(ct.geometry).to_canonical(mask), slices)
    return ct, mask, picked


# -- report ---------------------------------------------------------------------------
def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}"


def summarize(cases: Dict[str, Dict[str, Any]], policies: Sequence[str]) -> Dict[str, Any]:
    """Per policy, per perturbation, the agreement pooled over the CTs, and the goal."""
    out: Dict[str, Any] = {}
    for policy in policies:
        per = {name: pooled([c["policies"][policy]["perturbations"][name] for c in cases.values()])
               for name, _, _ in PERTURBATIONS}
        entry = {"perturbations": per, "goal": meets_goal(per[GOAL_PERTURBATION]),
                 "seconds": round(sum(c["policies"][policy]["seconds"] for c in cases.values()), 1)}
        if all("vs_mask" in c["policies"][policy] for c in cases.values()):
            entry["vs_mask"] = pooled([c["policies"][policy]["vs_mask"] for c in cases.values()])
        out[policy] = entry
    return out


def format_report(cases: Dict[str, Dict[str, Any]], summary: Dict[str, Any]) -> str:
    names = [n for n, _, _ in PERTURBATIONS]
    abbr = [c.abbreviation for c in CLASSES]
    lines = ["Labels unchanged, % (all CTs pooled):", "",
             "| policy | " + " | ".join(names) + " | reference s | vs paper's labels |",
             "|---" * (len(names) + 3) + "|"]
    for policy, s in summary.items():
        vs = s.get("vs_mask")
        lines.append(f"| {policy} | " + " | ".join(_pct(s["perturbations"][n]["percent"]) for n in names)
                     + f" | {s['seconds']:.1f} | {_pct(vs['percent']) if vs else '-'} |")
    lines += ["", f"Per class at {GOAL_PERTURBATION}, % kept of the reference's voxels of the class (voxels):", "",
              "| policy | " + " | ".join(abbr) + " | goal (>= 99 % overall, >= 95 % per class) |",
              "|---" * (len(abbr) + 2) + "|"]
    for policy, s in summary.items():
        cl = s["perturbations"][GOAL_PERTURBATION]["classes"]
        g = s["goal"]
        verdict = "met" if g["met"] else "missed" + ("" if g["overall"] else " overall") + \
            (f" ({', '.join(g['classes_failing'])})" if g["classes_failing"] else "")
        lines.append(f"| {policy} | " + " | ".join(f"{_pct(cl[a]['percent'])} ({cl[a]['voxels']})" for a in abbr)
                     + f" | {verdict} |")
    lines += ["", f"Per CT, overall at {GOAL_PERTURBATION} / smooth / erode3, %:", "",
              "| CT | slices | " + " | ".join(summary) + " |", "|---" * (len(summary) + 2) + "|"]
    for name, c in cases.items():
        cells = []
        for policy in summary:
            p = c["policies"][policy]["perturbations"]
            cells.append(f"{_pct(p['dilate3']['percent'])} / {_pct(p['smooth']['percent'])} / "
                         f"{_pct(p['erode3']['percent'])}")
        lines.append(f"| {name} | {len(c['slices']) if 'slices' in c else '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mask_stability", description=(
        "Labels kept when the lung mask's border moves (dilated/eroded 1-6 px, smoothed), per crop-box policy."))
    p.add_argument("--ct", action="append", metavar="NAME|PATH",
                   help=f"a CT: folder name under --data, or a path (repeatable; default: {', '.join(DEFAULT_CTS)})")
    p.add_argument("--data", type=Path, default=None, help="the shared data folder (default: $ILDSEG_TEST_DATA "
                   "or ../shared/data)")
    p.add_argument("--slices", type=int, default=10, help="axial slices per CT, spread over the lung (default 10)")
    p.add_argument("--policies", default="mask,aerated",
                   help=f"comma-separated crop-box policies; the first should be mask, the baseline "
                   f"(default mask,aerated; all: {','.join(POLICIES)})")
    p.add_argument("--model", help="model file (.safetensors); default: the bundled model")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    p.add_argument("--json", type=Path, metavar="OUT.json", help="write every figure and the machine as JSON")
    p.add_argument("--from-json", type=Path, nargs="+", metavar="RUN.json",
                   help="run nothing: pool the CTs of earlier --json runs (one CT per run keeps each run short) "
                        "and print their tables; with --json, write the pooled report")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    return benchmain.run_main("mask_stability", build_parser, _run, argv)


def _pool_runs(args: argparse.Namespace) -> int:
    """--from-json: the CTs of several runs, pooled (each run's machine is kept)."""
    cases: Dict[str, Dict[str, Any]] = {}
    runs = []
    for path in args.from_json:
        try:
            run = json.loads(Path(path).read_text())
            run_cases, policies = run["cases"], run["settings"]["policies"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path} is not a report of this benchmark ({exc})") from None
        runs.append({"file": str(path), "date": run.get("date"), "machine": run.get("machine"),
                     "model": run.get("model"), "settings": run.get("settings"), "seconds": run.get("seconds")})
        for name, case in run_cases.items():
            if name in cases:
                raise InputError(f"CT {name} is in more than one run")
            cases[name] = case
    policies = [p for p in runs[0]["settings"]["policies"] if all(p in c["policies"] for c in cases.values())]
    if not policies:
        raise InputError("the runs share no crop-box policy")
    summary = summarize(cases, policies)
    print(format_report(cases, summary))
    models = {(r["model"] or {}).get("sha256") for r in runs}
    if len(models) > 1:
        print("\nwarning: the runs used different models", file=sys.stderr)
    if args.json is not None:
        from ILDSegmentationLib.imaging.atomicfile import atomic_path
        with atomic_path(args.json) as tmp:
            Path(tmp).write_text(json.dumps({"runs": runs, "summary": summary, "cases": cases}, indent=1))
    return 0


def _run(args: argparse.Namespace) -> int:
    import os
    if args.from_json:
        return _pool_runs(args)
    from ILDSegmentationLib.commands.bench import machine_info
    from ILDSegmentationLib.engine.inference import Inferer
    from ILDSegmentationLib.engine.modelfile import load_model
    if args.slices < 1:
        raise InputError("--slices must be at least 1")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies:
        raise InputError("--policies names no policy")
    for p in policies:
        policy_runs(p)  # an unknown name fails before any work
    data = args.data or Path(os.environ.get("ILDSEG_TEST_DATA", REPO.parent / "shared" / "data"))
    entries = args.ct or list(DEFAULT_CTS)
    paths = {Path(e).name.split(".")[0] if Path(e).exists() else e: find_ct(e, data) for e in entries}
    if args.json is not None and not args.json.parent.is_dir():
        raise InputError(f"folder of {args.json} does not exist")
    loaded = load_model(args.model)
    inferers = {p: [Inferer(loaded, device=args.device, crop_box=b) for b in policy_runs(p)] for p in policies}
    cases: Dict[str, Dict[str, Any]] = {}
    t0 = time.perf_counter()
    for name, path in paths.items():
        print(f"{name}: reading, lung mask ...", file=sys.stderr, flush=True)
        ct, lung, picked = load_case(path, args.slices)
        r = run_ct(ct.array, lung, ct.geometry, picked, inferers,
                   progress=lambda s, n=name: print(f"{n}: {s}", file=sys.stderr, flush=True))
        r.update(ct=str(path), slices=[int(z) for z in picked],
                 spacing_mm=[round(float(v), 4) for v in ct.geometry.spacing])
        del ct, lung
        cases[name] = r
    summary = summarize(cases, policies)
    machine = machine_info()
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"file": str(loaded.path), "sha256": loaded.sha256, "name": loaded.info.name},
        "settings": {"slices_per_ct": args.slices, "policies": policies, "device": args.device,
                     "pixel_spacing": "model", "lung_mask": "automatic", "smooth_sigma_px": SMOOTH_SIGMA_PX,
                     "tta_margins": list(TTA_MARGINS), "crop_margin": CROP_MARGIN},
        "machine": machine, "seconds": round(time.perf_counter() - t0, 1),
        "summary": summary, "cases": cases,
    }
    print(format_report(cases, summary))
    print(f"\nmodel {loaded.path.name} (sha256 {loaded.sha256[:12]}); {machine['cpu_model']}, "
          f"{machine['cpu_usable']} CPUs usable, torch {machine['torch']}; {report['seconds']:.0f} s in all")
    if args.json is not None:
        from ILDSegmentationLib.imaging.atomicfile import atomic_path
        with atomic_path(args.json) as tmp:
            Path(tmp).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    benchmain.run_script(main)

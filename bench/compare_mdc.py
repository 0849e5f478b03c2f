"""Minimum detectable change of ``ildseg compare``: the change it reports when nothing
changed, on real CC BY CTs, and the registration figures of same-patient and
different-patient pairs (the refusal thresholds of imaging/registration.py).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/compare_mdc.py --json mdc.json
    # the held-out check CTs, after the constants were set:
    ... bench/compare_mdc.py --cts lidc-idri-0001 cptac-lscc-c3n-00247 --no-pairs

Per CT, a slab of about ``--slab-mm`` through the middle of the scan is the baseline
(segmented once with the bundled model, or ``--model``), and each of these follow-ups
is compared with it (``compare_files``, the baseline's labels reused):

* ``moved-a`` / ``moved-b``: the same CT moved (rotations of 1-3 degrees about each
  axis, shifts of 2-4 mm) and resampled (linear) onto the slab's grid;
* ``phase``: the slab cut half a slice further along the axial axis (resampled);
* ``mask+1`` / ``mask-1``: the baseline CT itself with its lung mask grown or shrunk by
  one voxel in plane (another mask tool's border).

The minimum detectable change per class is the largest |change| (percentage points of
the lung) over the calibration CTs' follow-ups, rounded up to 0.1 pp; the same for the
fibrotic extent. Calibration CTs (default): lidc-idri-0002, tcga-luad-tcga-17-z013,
tcga-luad-tcga-17-z015 (not the training held-out CTs lidc-idri-0001 and
cptac-lscc-c3n-00247, which only check the figures). Different-patient pairs: every
pair of the calibration slabs, registered with ``force``. Prints the machine and
every figure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CALIBRATION = ("lidc-idri-0002", "tcga-luad-tcga-17-z013", "tcga-luad-tcga-17-z015")
MOTIONS = {"moved-a": ((2.0, 1.0, 3.0), (3.0, -2.0, 4.0)), "moved-b": ((-3.0, 2.0, -1.5), (-4.0, 3.0, -2.0))}


def ct_file(name: str) -> Path:
    return DATA / name / f"{name}.nrrd"


def slab_grid(image, slab_mm: float):
    from ILDSegmentationLib.simulation.followup import shifted_grid
    n = image.GetSize()[2]
    count = min(n - 2, max(8, int(round(slab_mm / image.GetSpacing()[2]))))
    return shifted_grid(image, 0.0, (n - count) // 2, count), (n - count) // 2, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cts", nargs="+", default=list(CALIBRATION))
    ap.add_argument("--slab-mm", type=float, default=60.0)
    ap.add_argument("--model", default=None)
    ap.add_argument("--no-pairs", action="store_true", help="skip the different-patient pairs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import SimpleITK as sitk
    from scipy import ndimage

    from ILDSegmentationLib.analysis.change import MDC_FIBROTIC_PERCENT_POINTS, MDC_PERCENT_POINTS
    from ILDSegmentationLib.classes import CLASSES
    from ILDSegmentationLib.commands.compare import compare_files
    from ILDSegmentationLib.imaging.geometry import Geometry
    from ILDSegmentationLib.imaging.lungmask import compute_lung_mask
    from ILDSegmentationLib.engine.modelfile import load_model
    from ILDSegmentationLib.analysis.pipeline import segment_file
    from ILDSegmentationLib.simulation.followup import motion, moved_scan, shifted_grid

    machine = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "load_1min": round(os.getloadavg()[0], 2), "python": platform.python_version(),
               "threads": os.environ.get("OMP_NUM_THREADS")}
    print("machine:", machine)  # platform.processor() is often empty: see /proc/cpuinfo
    model = load_model(args.model)
    print(f"model: {model.info.name} ({model.sha256[:12]})")
    work = Path(tempfile.mkdtemp(prefix="compare-mdc-"))
    rows, slabs = [], {}
    for name in args.cts:
        full = sitk.ReadImage(str(ct_file(name)))
        grid, first, count = slab_grid(full, args.slab_mm)
        base, _ = moved_scan(full, grid, sitk.Transform())
        folder = work / name
        folder.mkdir()
        sitk.WriteImage(base, str(folder / "baseline.nrrd"), True)
        mask = compute_lung_mask(sitk.GetArrayFromImage(base), Geometry.from_sitk(base)).astype(np.uint8)
        mask_img = sitk.GetImageFromArray((mask != 0).astype(np.uint8))
        mask_img.CopyInformation(base)
        sitk.WriteImage(mask_img, str(folder / "baseline_mask.nrrd"), True)
        t = time.perf_counter()
        segment_file(folder / "baseline.nrrd", folder / "baseline.seg.nrrd", lung_mask=folder / "baseline_mask.nrrd",
                     model=model, report=folder / "report.json")
        print(f"{name}: slab of {count} slices from {first} ({count * full.GetSpacing()[2]:.0f} mm), "
              f"baseline segmented in {time.perf_counter() - t:.1f} s")
        slabs[name] = folder
        followups = {}
        for tag, (deg, shift) in MOTIONS.items():
            followups[tag] = (moved_scan(full, grid, motion(full, deg, shift))[0], None)
        followups["phase"] = (moved_scan(full, shifted_grid(full, 0.5, first, count), sitk.Transform())[0], None)
        in_plane = np.zeros((3, 3, 3), bool)
        in_plane[1] = ndimage.generate_binary_structure(2, 1)
        for tag, op in (("mask+1", ndimage.binary_dilation), ("mask-1", ndimage.binary_erosion)):
            m = sitk.GetImageFromArray(op(mask != 0, in_plane).astype(np.uint8))
            m.CopyInformation(base)
            followups[tag] = (base, m)
        for tag, (img, fmask) in followups.items():
            sitk.WriteImage(img, str(folder / f"{tag}.nrrd"), True)
            mask_arg = None
            if fmask is not None:
                sitk.WriteImage(fmask, str(folder / f"{tag}_mask.nrrd"), True)
                mask_arg = folder / f"{tag}_mask.nrrd"
            t = time.perf_counter()
            s = compare_files(folder / "baseline.nrrd", folder / f"{tag}.nrrd", folder / f"out-{tag}",
                              baseline_labels=folder / "baseline.seg.nrrd", followup_mask=mask_arg, model=model,
                              visual_report=False, force=True)
            row = {"ct": name, "followup": tag, "seconds": round(time.perf_counter() - t, 1),
                   "registration_s": s["registration"]["seconds"],
                   "dice_affine": s["registration"]["lung_dice_affine"], "dice": s["registration"]["lung_dice"],
                   "correlation": s["registration"]["lung_correlation"],
                   "fibrotic_change": s["fibrotic_extent"]["change"],
                   "fibrotic_baseline": s["fibrotic_extent"]["baseline"],
                   "change_pp": {c["label"]: c["change_percent_points"] for c in s["classes"]},
                   "baseline_pp": {c["label"]: c["baseline_percent"] for c in s["classes"]}}
            rows.append(row)
            print(f"  {tag:<8} dice {row['dice_affine']:.3f}/{row['dice']:.3f} corr {row['correlation']}  fibrotic "
                  f"{row['fibrotic_change']:+.2f} pp  per class " +
                  " ".join(f"{c.abbreviation} {row['change_pp'][c.label]:+.2f}" for c in CLASSES) +
                  f"  ({row['seconds']:.0f} s, registration {row['registration_s']:.0f} s)", flush=True)

    pairs = []
    if not args.no_pairs:
        names = list(slabs)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                s = compare_files(slabs[a] / "baseline.nrrd", slabs[b] / "baseline.nrrd", work / f"pair-{a}-{b}",
                                  baseline_labels=slabs[a] / "baseline.seg.nrrd",
                                  followup_labels=slabs[b] / "baseline.seg.nrrd", visual_report=False, force=True)
                r = s["registration"]
                pairs.append({"baseline": a, "followup": b, "dice_affine": r["lung_dice_affine"],
                              "dice": r["lung_dice"], "correlation": r["lung_correlation"],
                              "affine_scale": r["affine_scale"]})
                print(f"different patients {a} -> {b}: dice {r['lung_dice_affine']:.3f}/{r['lung_dice']:.3f} "
                      f"corr {r['lung_correlation']} scale {r['affine_scale']}", flush=True)

    calib = [r for r in rows if r["ct"] in CALIBRATION]
    mdc = {}
    if calib:
        for c in CLASSES:
            mdc[c.label] = math.ceil(10 * max(abs(r["change_pp"][c.label]) for r in calib) - 1e-9) / 10
        mdc["fibrotic"] = math.ceil(10 * max(abs(r["fibrotic_change"]) for r in calib) - 1e-9) / 10
        print("measured MDC (pp, calibration CTs):", mdc)
    print("shipped MDC (pp):", MDC_PERCENT_POINTS, "fibrotic", MDC_FIBROTIC_PERCENT_POINTS)
    exceed = [r for r in rows if abs(r["fibrotic_change"]) > MDC_FIBROTIC_PERCENT_POINTS
              or any(abs(r["change_pp"][k]) > v for k, v in MDC_PERCENT_POINTS.items())]
    print(f"follow-ups flagged significant by the shipped MDC although nothing changed: {len(exceed)} of {len(rows)}")
    same = [r for r in rows if r["followup"].startswith(("moved", "phase"))]
    if same:
        print(f"same patient (moved/phase): dice affine {min(r['dice_affine'] for r in same):.3f}.."
              f"{max(r['dice_affine'] for r in same):.3f}, correlation "
              f"{min(r['correlation'] for r in same):.3f}..{max(r['correlation'] for r in same):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "model": model.info.name, "rows": rows,
                                               "pairs": pairs, "mdc_measured": mdc}, indent=2))
    print(f"work files in {work}")


if __name__ == "__main__":
    main()

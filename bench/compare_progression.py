"""``ildseg compare`` against a known answer: fibrosis added to a real CC BY CT with the
simulator (``ILDSegmentationLib.simulation.followup.progressed_followup``), the
follow-up moved (2 degrees, 3 mm) and resampled; the fibrotic-extent change the tool
reports, from the truth labels (the change arithmetic and registration) and from the
model's own segmentations of both scans, beside the true change.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/compare_progression.py [--ct NAME] [--seeds 3 4]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ct", default="tcga-luad-tcga-17-z015")
    ap.add_argument("--slab-mm", type=float, default=60.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[3])
    ap.add_argument("--model", default=None)
    args = ap.parse_args()

    import SimpleITK as sitk

    from ILDSegmentationLib.commands.compare import compare_files
    from ILDSegmentationLib.engine.modelfile import load_model
    from ILDSegmentationLib.simulation.followup import motion, moved_scan, progressed_followup, shifted_grid

    print("machine:", {"cpu": platform.machine(), "cpus": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2)})
    model = load_model(args.model)
    print(f"model: {model.info.name} ({model.sha256[:12]})")
    full = sitk.ReadImage(str(DATA / args.ct / f"{args.ct}.nrrd"))
    n = full.GetSize()[2]
    count = int(round(args.slab_mm / full.GetSpacing()[2]))
    base = moved_scan(full, shifted_grid(full, 0.0, (n - count) // 2, count), sitk.Transform())[0]
    work = Path(tempfile.mkdtemp(prefix="compare-progression-"))
    for seed in args.seeds:
        case = progressed_followup(base, seed=seed, transform=motion(base, (1.5, -1.0, 2.0), (2.0, 3.0, -2.0)))
        d = work / f"seed{seed}"
        d.mkdir()
        sitk.WriteImage(case.baseline_ct, str(d / "b.nrrd"), True)
        sitk.WriteImage(case.followup_ct, str(d / "f.nrrd"), True)
        for name, arr, ref in (("b_truth", case.baseline_truth, case.baseline_ct),
                               ("f_truth", case.followup_truth, case.followup_ct),
                               ("b_lung", case.baseline_lung != 0, case.baseline_ct)):
            img = sitk.GetImageFromArray(np.asarray(arr, np.uint8))
            img.CopyInformation(ref)
            sitk.WriteImage(img, str(d / f"{name}.nrrd"), True)
        truth = compare_files(d / "b.nrrd", d / "f.nrrd", d / "truth", baseline_labels=d / "b_truth.nrrd",
                              followup_labels=d / "f_truth.nrrd", visual_report=False)
        modelled = compare_files(d / "b.nrrd", d / "f.nrrd", d / "model", baseline_mask=d / "b_lung.nrrd", model=model,
                                 visual_report=False)
        for label, s in (("truth labels", truth), ("model", modelled)):
            fe = s["fibrotic_extent"]
            print(f"{args.ct} seed {seed}: true change {case.true_fibrotic_change_pp:+.2f} pp; {label}: "
                  f"{fe['baseline']:.2f} -> {fe['followup']:.2f} % ({fe['change']:+.2f} pp, "
                  f"{'significant' if fe['significant'] else 'not significant'}); registration Dice "
                  f"{s['registration']['lung_dice_affine']:.3f}/{s['registration']['lung_dice']:.3f}", flush=True)
    print(f"work files in {work}")


if __name__ == "__main__":
    main()

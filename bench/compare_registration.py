"""Registration figures of ``ildseg compare`` again, on the work folders that
``bench/compare_mdc.py`` left (its labels reused, no network): lung Dice after the affine
and deformable stages and attenuation correlation, for every same-patient follow-up and
every different-patient pair of baselines. For rechecking the refusal thresholds after a
change of the registration without segmenting again.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/compare_registration.py /tmp/compare-mdc-XXXX [...]
"""
from __future__ import annotations

import sys
from itertools import combinations
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import SimpleITK as sitk

    from ILDSegmentationLib.imaging.registration import mismatch, register_lungs

    def lung(path: Path, like):
        img = sitk.Cast(sitk.ReadImage(str(path)) != 0, sitk.sitkUInt8)
        img.CopyInformation(like)
        return img

    def show(what: str, b: Path, bl: Path, f: Path, fl: Path) -> None:
        bi, fi = sitk.ReadImage(str(b)), sitk.ReadImage(str(f))
        r = register_lungs(bi, lung(bl, bi), fi, lung(fl, fi))
        s = r.summary()
        print(f"{what:<60} dice rigid {s.get('lung_dice_rigid')} affine {s['lung_dice_affine']:.3f} "
              f"final {s['lung_dice']:.3f} corr {s['lung_correlation']} {'REFUSED' if mismatch(r) else 'accepted'} "
              f"({s['seconds']:.0f} s)", flush=True)

    baselines = []
    for work in map(Path, sys.argv[1:]):
        for ct in sorted(p for p in work.iterdir() if p.is_dir() and (p / "baseline.seg.nrrd").exists()):
            baselines.append(ct)
            for out in sorted(ct.glob("out-*")):
                tag = out.name[4:]
                show(f"{ct.name} {tag}", ct / "baseline.nrrd", ct / "baseline.seg.nrrd", ct / f"{tag}.nrrd",
                     out / "followup.seg.nrrd")
    for a, b in combinations(baselines, 2):
        show(f"{a.name} -> {b.name} (different patients)", a / "baseline.nrrd", a / "baseline.seg.nrrd",
             b / "baseline.nrrd", b / "baseline.seg.nrrd")
    print(f"numpy {np.__version__}")


if __name__ == "__main__":
    main()

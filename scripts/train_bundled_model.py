"""Reproduce the bundled model: simulate ILD patterns in real CTs, train, evaluate
on simulated cases from a CT never used in training, and write the model card.

    python scripts/train_bundled_model.py --data ../shared/data --work /tmp/ildseg-train

Training CTs: the Lung-PET-CT-Dx series (resampled to 1.0 and 1.4 mm in-plane, so
the network sees patterns at several pixel sizes) and synthetic phantoms (seeds 1..).
Held-out CT: RICORD 000082 (its own GGO is real disease: the simulated annotation
there marks only simulated regions and healthy patches as the simulator chooses).
Every step runs through the public commands (`ildseg simulate | train | evaluate`).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]


def ildseg(*args: str) -> None:
    cmd = [sys.executable, "-m", "ILDSegmentationLib", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def resampled(src: sitk.Image, spacing_xy: float) -> sitk.Image:
    sp = src.GetSpacing()
    new_sp = (spacing_xy, spacing_xy, sp[2])
    size = [int(round(src.GetSize()[i] * sp[i] / new_sp[i])) for i in range(3)]
    return sitk.Resample(src, size, sitk.Transform(), sitk.sitkLinear, src.GetOrigin(), new_sp,
                         src.GetDirection(), -1024, src.GetPixelID())


def reinflated(src: sitk.Image, factor: float) -> sitk.Image:
    """The same chest at another inspiration: a lung voxel's tissue fraction (HU + 1000)
    scales with ``factor`` (< 1 deeper inspiration, darker lung; > 1 shallower).
    The change fades out between -300 and 0 HU so that vessels, walls and the chest
    wall keep their values. Healthy lung ranges from about -900 to -750 HU between
    scans and scanners; one real training CT alone covers one point of that range."""
    import numpy as np
    hu = sitk.GetArrayFromImage(src).astype(np.float32)
    w = np.clip(-hu / 300.0, 0.0, 1.0)
    out = hu + w * (factor - 1.0) * (hu + 1000.0)
    img = sitk.GetImageFromArray(np.round(out).astype(np.int16))
    img.CopyInformation(src)
    return img


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ildseg-train"))
    ap.add_argument("--phantoms", type=int, default=3)
    ap.add_argument("--cases-per-ct", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--patience", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--crops-per-epoch", type=int, default=100)
    ap.add_argument("--inflation", type=float, nargs="+", default=[1.0, 0.7],
                    help="tissue-fraction factors applied to the real training CT (see reinflated)")
    ap.add_argument("--init", type=Path, help="start training from this model's weights")
    ap.add_argument("--install", action="store_true", help="copy the model into ILDSegmentationLib/models")
    args = ap.parse_args()
    w = args.work
    cts = w / "cts"
    cts.mkdir(parents=True, exist_ok=True)

    train_cts = []
    dicom = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(args.data / "lung-pet-ct-dx-A0002")))
    for mm in (1.0, 1.4):
        for factor in args.inflation:
            tag = "" if factor == 1.0 else f"-x{factor:g}"
            p = cts / f"lungpetctdx-A0002-{mm:g}mm{tag}.nrrd"
            sitk.WriteImage(reinflated(resampled(dicom, mm), factor), str(p), True)
            train_cts.append(p)
    from ILDSegmentationLib.phantom import make_chest_phantom
    for seed in range(1, args.phantoms + 1):
        ph = make_chest_phantom(seed=seed)
        img = sitk.GetImageFromArray(ph.hu)
        img.SetSpacing(ph.geometry.spacing)
        img.SetOrigin(ph.geometry.origin)
        img.SetDirection(ph.geometry.direction)
        # The phantom's lung is darker than the real training CT's: brighten half of them.
        factor = 1.0 if seed % 2 else 1.2
        p = cts / f"phantom-{seed}{'' if factor == 1.0 else f'-x{factor:g}'}.nrrd"
        sitk.WriteImage(reinflated(img, factor), str(p), True)
        train_cts.append(p)

    ildseg("simulate", "--ct", *map(str, train_cts), "--out", str(w / "train"),
           "--cases-per-ct", str(args.cases_per_ct), "--seed", "100")
    ildseg("simulate", "--ct", str(args.data / "ricord-000082" / "ricord-000082-5mm.nii.gz"),
           "--out", str(w / "heldout"), "--cases-per-ct", "3", "--seed", "900")
    run = w / "run"
    ildseg("train", "--manifest", str(w / "train" / "manifest.csv"), "--out", str(run), "--val-fraction", "0.2",
           "--epochs", str(args.epochs), "--patience", str(args.patience), "--lr", str(args.lr),
           "--batch-size", str(args.batch_size), "--crops-per-epoch", str(args.crops_per_epoch), "--intensity", "hu1000", "--device", "auto", "--seed", "0",
           "--resume", *(["--init", str(args.init)] if args.init else []))
    ildseg("evaluate", "--manifest", str(w / "heldout" / "manifest.csv"), "--model", str(run / "model.safetensors"),
           "--report", str(w / "heldout_eval.json"), "--confusion", str(w / "heldout_confusion.png"))
    report = json.loads((w / "heldout_eval.json").read_text())
    print(f"held-out balanced accuracy: {report['balanced_accuracy']:.4f}")
    if args.install:
        models = REPO / "ILDSegmentationLib" / "models"
        shutil.copy(run / "model.safetensors", models / "default.safetensors")
        shutil.copy(w / "heldout_eval.json", models / "default-heldout-eval.json")
        shutil.copy(w / "heldout_confusion.png", REPO / "docs" / "img" / "default-model-heldout-confusion.png")
        shutil.copy(run / "learning_curves.png", REPO / "docs" / "img" / "default-model-learning-curves.png")
        print("installed into", models)


if __name__ == "__main__":
    main()

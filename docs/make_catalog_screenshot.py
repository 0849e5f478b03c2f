"""Make the Extensions Index screenshot docs/img/slicer-extension-screenshot.png: the
module's output on a case with simulated ILD, next to what was simulated, said so on
the picture.

No Slicer runs here, so the picture is not a screenshot of Slicer: the labels come
from ``ildseg segment``, the command the Slicer panel runs in its separate process,
with the panel's defaults (bundled model, run at the model's pixel size, the paper's
crop boxes). The case: 24 axial slices from the middle of LIDC-IDRI-0001 (CC BY 3.0,
a scan without ILD, held out of the bundled model's training), with the six classes'
patterns inserted by ``ildseg simulate``.

Usage (from the repository root; about 3 minutes on 2 CPU cores):
    python docs/make_catalog_screenshot.py [--data ../shared/data] [--out docs/img/slicer-extension-screenshot.png]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ILDSegmentationLib.classes import CLASSES  # noqa: E402
from ILDSegmentationLib.imaging.geometry import canonical_view  # noqa: E402
from ILDSegmentationLib.imaging.io import read_ct  # noqa: E402
from ILDSegmentationLib.analysis.overlay import blend  # noqa: E402

CT = "lidc-idri-0001/lidc-idri-0001.nrrd"
SLICES = 24
SEED = 29
CAPTION = ("SIMULATED ILD: patterns inserted by 'ildseg simulate' into LIDC-IDRI-0001 (CC BY 3.0, no ILD of its own). "
           "Bottom: ILD Segmentation's labels ('ildseg segment', the command the Slicer module runs; bundled model, "
           "trained on simulated patterns only). Research use only, not for clinical use.")


def _run(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ILDSegmentationLib", *args], check=True, cwd=str(REPO))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(REPO / "docs" / "img" / "slicer-extension-screenshot.png"))
    args = parser.parse_args(argv)
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        image = sitk.ReadImage(str(Path(args.data) / CT))
        middle = image.GetSize()[2] // 2
        sitk.WriteImage(image[:, :, middle - SLICES // 2: middle + SLICES // 2], str(work / "ct.nrrd"), True)
        _run("simulate", "--ct", str(work / "ct.nrrd"), "--out", str(work / "sim"), "--seed", str(SEED), "--quiet")
        _run("segment", str(work / "sim" / "ct.nrrd"), "-o", str(work / "labels.nrrd"), "--lung-mask",
             str(work / "sim" / "lung_mask.nrrd"), "--device", "cpu", "--quiet")
        ct = read_ct(work / "sim" / "ct.nrrd")
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "sim" / "truth.nrrd")))
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "labels.nrrd")))

    view = canonical_view(ct.geometry)
    _, row_mm, col_mm = view.canonical_spacing(ct.geometry)
    hu, truth_c, labels_c = (view.to_canonical(a) for a in (ct.array, truth, labels))
    lung = truth_c > 0
    # the three slices with the most simulated disease, in order
    disease = (truth_c > 1).reshape(truth_c.shape[0], -1).sum(axis=1)
    chosen = sorted(np.argsort(disease)[-3:])
    agreement = float((labels_c[lung] == truth_c[lung]).mean())

    fig, axes = plt.subplots(2, 3, figsize=(12, 8.4), dpi=100)
    for column, z in enumerate(chosen):
        for row, (name, shown) in enumerate((("simulated (truth)", truth_c), ("ILD Segmentation's output", labels_c))):
            ax = axes[row, column]
            ax.imshow(blend(hu[z], np.where(lung[z], shown[z], 0)), aspect=row_mm / col_mm)
            ax.set_title(f"{name}, axial {z + 1}/{hu.shape[0]}", fontsize=10)
            ax.axis("off")
    fig.legend(handles=[Patch(color=c.color, label=c.name) for c in CLASSES], loc="upper center", ncol=6,
               fontsize=10, frameon=False)
    fig.text(0.5, 0.035, CAPTION + f" Labels equal to the simulation in {100 * agreement:.0f} % of the lung.",
             ha="center", va="bottom", wrap=True, fontsize=9, color="darkred")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.92, bottom=0.12, wspace=0.02, hspace=0.12)
    fig.savefig(args.out)
    print(f"written {args.out}: slices {[int(z) + 1 for z in chosen]}, agreement in the lung {agreement:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

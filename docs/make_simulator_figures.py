"""Make the pictures of docs/simulator.md: each simulated pattern before and after
insertion, on the two real CTs of ../shared/data (never copied into the repository).

Usage (from the repository root):
    python docs/make_simulator_figures.py [--data ../shared/data] [--out docs/img] [--seed 0]

For each CT: one simulated case (default config, the given seed); for each pattern,
the region with the largest cross-section is shown in the axial slice where it is
largest, cropped to a square of ``--crop-mm`` mm round it, in the lung window
(L -600, W 1500): before | after | after with the region outlined. Only slices
through the body of the lungs are searched (lung section at least half the
largest), so the pictures show each pattern where it is usually read. Also one
overview slice per CT with the truth and the annotation overlaid.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from ILDSegmentationLib.classes import CLASSES, by_label  # noqa: E402
from ILDSegmentationLib.imaging.geometry import canonical_view  # noqa: E402
from ILDSegmentationLib.imaging.io import read_ct  # noqa: E402
from ILDSegmentationLib.simulation.config import PATTERNS  # noqa: E402
from ILDSegmentationLib.simulation.simulate import simulate_case  # noqa: E402

WINDOW = (-600 - 750, -600 + 750)  # lung window: level -600 HU, width 1500 HU
# Only CC BY backgrounds: these pictures are committed. RICORD (CC BY-NC, evaluation
# only) may be drawn into a folder outside the repository with --with-ricord.
CASES = (("dicom", "lung-pet-ct-dx-A0002", "Lung-PET-CT-Dx A0002: 0.65 x 0.65 mm, 8 mm slices"),)
RICORD_CASE = ("ricord", "ricord-000082/ricord-000082-5mm.nii.gz", "RICORD 000082: 1.41 x 1.41 mm, 5 mm slices")


def _best_slice(truth: np.ndarray, label: int):
    """Axial slice (canonical) and in-plane centre where the label's area is largest,
    among the slices whose lung section is at least half the largest (a slice through
    the body of the lungs, not through an apex or the top of a diaphragmatic dome)."""
    m = truth == label
    lung = (truth > 0).sum(axis=(1, 2))
    area = m.sum(axis=(1, 2)) * (lung >= 0.5 * lung.max())
    if area.max() == 0:
        return None
    z = int(np.argmax(area))
    # Centre on the largest piece in that slice (regions in both lungs would put the
    # mean in the mediastinum).
    pieces, n = ndimage.label(m[z])
    biggest = 1 + int(np.argmax(ndimage.sum_labels(m[z], pieces, range(1, n + 1))))
    rows, cols = np.nonzero(pieces == biggest)
    return z, int(round(rows.mean())), int(round(cols.mean()))


def _crop(a: np.ndarray, r: int, c: int, half: int) -> np.ndarray:
    pad = np.pad(a, half, mode="edge")
    return pad[r:r + 2 * half + 1, c:c + 2 * half + 1]


def figure_for_pattern(name, title, before, after, truth, spacing, label, out, crop_mm):
    found = _best_slice(truth, label)
    if found is None:
        print(f"  {by_label(label).name}: not in this case")
        return None
    z, r, c = found
    half = int(round(crop_mm / 2 / spacing[1]))
    b = _crop(before[z], r, c, half)
    a = _crop(after[z], r, c, half)
    t = _crop(truth[z], r, c, half)
    fig, axes = plt.subplots(1, 3, figsize=(9.0, 3.25), dpi=100)
    extent = (0, b.shape[1] * spacing[2], b.shape[0] * spacing[1], 0)
    for ax, img, what in zip(axes, (b, a, a), ("before", "after", "after, region outlined")):
        ax.imshow(img, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], interpolation="bilinear", extent=extent)
        ax.set_title(what, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    color = by_label(label).color
    axes[2].contour(np.linspace(0, extent[1], t.shape[1]), np.linspace(0, extent[2], t.shape[0]),
                    (t == label).astype(float), [0.5], colors=[color], linewidths=0.8)
    # 10 mm scale bar.
    axes[0].plot([4, 14], [extent[2] - 4] * 2, color="yellow", lw=2)
    axes[0].text(9, extent[2] - 6, "10 mm", color="yellow", ha="center", fontsize=7)
    fig.suptitle(f"{by_label(label).name} - {title} (slice {z}, L -600 W 1500)", fontsize=9)
    fig.tight_layout()
    path = out / f"sim_{name}_{by_label(label).segment_id}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def overview(name, title, after, truth, annotation, spacing, out):
    # The slice that shows the most patterns, then the largest patterned area.
    present = np.stack([(truth == lab).any(axis=(1, 2)) for lab in PATTERNS]).sum(axis=0)
    area = present * 1e7 + ((truth >= 2) & (truth <= 6)).sum(axis=(1, 2))
    z = int(np.argmax(area))
    colors = ListedColormap([(0, 0, 0, 0)] + [(*c.color, 1.0) for c in CLASSES])
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.9), dpi=90)
    aspect = spacing[1] / spacing[2]
    for ax, overlay, what in zip(axes, (None, truth[z], annotation[z]), ("CT with patterns", "truth (dense)",
                                                                          "annotation (sparse)")):
        ax.imshow(after[z], cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], aspect=aspect)
        if overlay is not None:
            ax.imshow(np.ma.masked_equal(overlay, 0), cmap=colors, vmin=-0.5, vmax=6.5, alpha=0.45,
                      interpolation="nearest", aspect=aspect)
        ax.set_title(what, fontsize=9)
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c.color) for c in CLASSES]
    fig.legend(handles, [c.name for c in CLASSES], loc="lower center", ncol=6, fontsize=7, frameon=False)
    fig.suptitle(f"{title}: slice {z}", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = out / f"sim_{name}_overview.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(REPO / "docs" / "img"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--with-ricord", action="store_true",
                    help="also RICORD 000082 (non-commercial data: write it outside the repository with --out)")
    ap.add_argument("--crop-mm", type=float, default=90.0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rel, title in CASES + ((RICORD_CASE,) if args.with_ricord else ()):
        path = Path(args.data) / rel
        if not path.exists():
            print(f"skipping {name}: {path} not found")
            continue
        ct = read_ct(path)
        hu = np.asarray(ct.array)
        t0 = time.perf_counter()
        sim = simulate_case(hu, ct.geometry, seed=args.seed)
        dt = time.perf_counter() - t0
        print(f"{name}: simulated in {dt:.1f} s (lung mask included), {len(sim.regions)} regions, "
              f"annotated {100 * sim.annotated_fraction:.1f} % of the lung, noise sd {sim.noise_sd_hu:.1f} HU")
        view = canonical_view(ct.geometry)
        spacing = view.canonical_spacing(ct.geometry)
        before, after = view.to_canonical(hu), view.to_canonical(sim.hu)
        truth, ann = view.to_canonical(sim.truth), view.to_canonical(sim.annotation)
        for label in PATTERNS:
            p = figure_for_pattern(name, title, before, after, truth, spacing, label, out, args.crop_mm)
            if p is not None:
                print(f"  {p}")
        print(f"  {overview(name, title, after, truth, ann, spacing, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""Normal lung parenchyma: the demo phantom's against the real CTs' (issue 24 item 4).

    python bench/lung_parenchyma.py [--data ../shared/data] [--slices 8] [--json out.json]

Per CT, on ``--slices`` axial slices evenly spread over the middle 60 % of the lung
(automatic lung mask, eroded by 3 mm so that the pleura and the mediastinum do not
count), each slice resampled in-plane to 1.0 mm (the pixel size the bundled model
runs at), pixels pooled:

* ``p5, p25, p50, p75, p95``: HU percentiles of the lung;
* ``dense_pct``: percent of the lung above -500 HU (vessels, bronchial walls);
* ``local_sd``: median standard deviation in 5 x 5 pixel windows wholly in the lung,
  without dense pixels (noise and fine texture of the parenchyma itself, HU);
* ``rms_diff_1, _2, _4``: root mean squared difference of parenchyma pixels 1, 2, 4
  mm apart (the variogram: how grainy and at what scale, HU);
* ``gravity``: median HU of the posterior fifth of the lung's depth minus that of
  the anterior fifth (the supine gravity gradient, HU).

The demo's case is measured the same way (its phantom, before any pattern is
inserted, and the slice thickness it has). Prints one row per CT.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The CC BY chest CTs of the training recipe: name -> path in --data.
from scripts.train_bundled_model import BACKGROUNDS as CTS  # noqa: E402
TARGET_MM = 1.0


def lung_statistics(hu_c: np.ndarray, lung_c: np.ndarray, spacing, slices: int = 8) -> dict:
    """hu_c, lung_c: canonical view (slice, row anterior->posterior, column); spacing
    (slice, row, column) mm."""
    zs = np.flatnonzero(lung_c.reshape(lung_c.shape[0], -1).any(axis=1))
    lo, hi = zs[0] + 0.2 * (zs[-1] - zs[0]), zs[0] + 0.8 * (zs[-1] - zs[0])
    chosen = np.linspace(lo, hi, slices).round().astype(int)
    zoom = (spacing[1] / TARGET_MM, spacing[2] / TARGET_MM)
    values, sds, diffs, gravity = [], [], {1: [], 2: [], 4: []}, []
    r = int(round(3.0 / TARGET_MM))
    disk = np.add.outer(np.arange(-r, r + 1) ** 2, np.arange(-r, r + 1) ** 2) <= r * r
    for z in chosen:
        h = ndimage.zoom(hu_c[z].astype(np.float32), zoom, order=1)
        m = ndimage.zoom(lung_c[z].astype(np.uint8), zoom, order=0) > 0
        m = ndimage.binary_erosion(m, disk)
        if m.sum() < 100:
            continue
        v = h[m]
        values.append(v)
        paren = m & (h < -500)
        # local SD in 5 x 5 windows wholly in the parenchyma
        mean = ndimage.uniform_filter(h, 5)
        sq = ndimage.uniform_filter(h * h, 5)
        whole = ndimage.binary_erosion(paren, np.ones((5, 5), bool))
        sds.append(np.sqrt(np.maximum(sq - mean * mean, 0))[whole])
        for d in diffs:
            for a, b in ((h[:, d:], h[:, :-d]), (h[d:, :], h[:-d, :])):
                pa = paren[:, d:] & paren[:, :-d] if a.shape[1] != h.shape[1] else paren[d:, :] & paren[:-d, :]
                diffs[d].append((a - b)[pa])
        rows = np.flatnonzero(m.any(axis=1))
        depth = rows[-1] - rows[0] + 1
        ant = m.copy()
        ant[rows[0] + depth // 5:] = False
        post = m.copy()
        post[:rows[-1] + 1 - depth // 5] = False
        if ant.any() and post.any():
            gravity.append(float(np.median(h[post & paren]) - np.median(h[ant & paren])))
    v = np.concatenate(values)
    out = {f"p{q}": float(np.percentile(v, q)) for q in (5, 25, 50, 75, 95)}
    out["dense_pct"] = float(100 * np.mean(v > -500))
    out["local_sd"] = float(np.median(np.concatenate(sds)))
    for d, lst in diffs.items():
        out[f"rms_diff_{d}"] = float(np.sqrt(np.mean(np.concatenate(lst) ** 2)))
    out["gravity"] = float(np.median(gravity))
    out["slice_mm"] = float(spacing[0])
    return out


def measure_ct(path: Path, slices: int) -> dict:
    from ILDSegmentationLib.imaging.geometry import canonical_view
    from ILDSegmentationLib.imaging.io import read_ct
    from ILDSegmentationLib.imaging.lungmask import compute_lung_mask
    ct = read_ct(path)
    mask = compute_lung_mask(ct.array, ct.geometry)
    view = canonical_view(ct.geometry)
    return lung_statistics(view.to_canonical(ct.array), view.to_canonical(mask) > 0,
                           view.canonical_spacing(ct.geometry), slices)


def measure_phantom(slices: int, seed: int = 0) -> dict:
    from ILDSegmentationLib.commands.demo import DEMO_SEED
    from ILDSegmentationLib.imaging.geometry import canonical_view
    from ILDSegmentationLib.simulation.phantom import make_chest_phantom
    ph = make_chest_phantom(seed=DEMO_SEED if seed is None else seed)
    view = canonical_view(ph.geometry)
    return lung_statistics(view.to_canonical(ph.hu), view.to_canonical(ph.lung_labels) > 0,
                           view.canonical_spacing(ph.geometry), slices)


KEYS = ("slice_mm", "p5", "p25", "p50", "p75", "p95", "dense_pct", "local_sd", "rms_diff_1", "rms_diff_2",
        "rms_diff_4", "gravity")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--slices", type=int, default=8)
    p.add_argument("--ct", nargs="*", default=None, help="CT names (default: all six CC BY CTs)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = {"demo phantom": measure_phantom(args.slices)}
    for name in args.ct if args.ct is not None else CTS:
        rows[name] = measure_ct(args.data / CTS[name], args.slices)
    print(f"{'':<24}" + "".join(f"{k:>11}" for k in KEYS))
    for name, r in rows.items():
        print(f"{name:<24}" + "".join(f"{r[k]:>11.1f}" for k in KEYS), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

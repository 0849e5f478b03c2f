"""Simulated against real ground glass and consolidation: the same texture
statistics inside real radiologist-labelled regions and inside simulated regions.

    ildseg simulate --ct ../shared/data/lidc-idri-0001/lidc-idri-0001.nrrd \\
        --out sim_lidc1 --cases-per-ct 2 --seed 13
    python bench/pattern_stats.py --medseg ../shared/data/medseg-covid-slices \\
        --sim-cases sim_lidc1 --json pattern_stats.json

Real regions: the 98 MedSeg COVID-19 slices (both sets; GGO = label 1,
consolidation = label 2), turned into HU with the per-slice mapping of
``bench/real_disease.py`` (air, fat, soft tissue), pixel spacing assumed 0.7 mm.
Simulated regions: the truth of ``ildseg simulate`` cases (2 = GGO, 4 =
consolidation), every axial slice through them. Healthy lung (MedSeg: the automatic
lung mask outside the labels; simulated: truth 1) is measured the same way for
reference. All statistics are 2D, per axial slice, pixels pooled over slices:

* ``p5 .. p95``: HU percentiles inside the region.
* ``local_sd``: median of the standard deviation in 5 x 5 pixel windows lying
  wholly inside the region (HU).
* ``rms_diff_d``: root of the mean squared difference between pixels d = 1, 2, 4
  pixels apart (rows and columns), both inside the region: the square root of the
  GLCM contrast without grey-level binning, i.e. of the variogram (HU).
* ``edge_step``, ``edge_width_mm``: the mean HU profile across the region's border
  towards unlabelled lung, by distance from the border (1..6 pixels inside and
  outside; averaging over the whole border removes the texture): the step is the
  inner plateau (4-6 pixels in) minus the outer one (4-6 pixels out), the width the
  distance over which the profile rises from 20 % to 80 % of the step (small =
  sharp; hand-drawn labels that miss the true edge widen it).

Caveats that move the real figures: the MedSeg JPEGs are 8-bit (about 5.5 HU per
grey level) and JPEG-compressed, which lowers fine-scale variation; the HU mapping's
slope is uncertain by about 7 % (local SD, differences, steps and gradients scale
with it) and its offset by about 15 HU at -600 HU; the labels are hand-drawn, so their
borders do not follow the image's edges exactly (widening the real edge). The row
``simulated via JPEG`` puts the simulated slices through the same path (the median
MedSeg window, 8 bits, JPEG quality 75) before measuring, so like is compared with
like.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import benchmain  # noqa: E402
import real_disease as rd  # noqa: E402

LAGS = (1, 2, 4)
EDGE_PX = 6  # profile bins on each side of the border
PLATEAU = slice(3, 6)  # bins 4..6 pixels from the border
JPEG_WINDOW = (-420.0, 1360.0)  # level, width: the median MedSeg window (bench/real_disease.py)
JPEG_QUALITY = 75


class RegionStats:
    """Accumulates the statistics of one kind of region over many slices."""

    def __init__(self) -> None:
        self.values: List[np.ndarray] = []
        self.local_sd: List[np.ndarray] = []
        self.sq_diff = {d: [0.0, 0] for d in LAGS}
        # Sums and counts of HU by distance (pixels) from the border: inside, outside.
        self.profile = np.zeros((2, 2, EDGE_PX))
        self.slices = 0
        self.pixel_mm: List[float] = []

    def add(self, hu: np.ndarray, region: np.ndarray, background: np.ndarray, pixel_mm: float) -> None:
        """hu: 2D slice (HU); region: the pattern's pixels; background: unlabelled
        lung next to which the border is measured."""
        if region.sum() < 10:
            return
        hu = hu.astype(np.float64)
        self.slices += 1
        self.pixel_mm.append(pixel_mm)
        self.values.append(hu[region].astype(np.float32))
        # Local standard deviation in 5 x 5 windows inside the region.
        m = ndimage.uniform_filter(hu, 5)
        m2 = ndimage.uniform_filter(hu * hu, 5)
        sd = np.sqrt(np.maximum(m2 - m * m, 0))
        core = ndimage.binary_erosion(region, np.ones((5, 5), bool))
        if core.any():
            self.local_sd.append(sd[core].astype(np.float32))
        for d in LAGS:
            for a, b, ra, rb in ((hu[d:], hu[:-d], region[d:], region[:-d]),
                                 (hu[:, d:], hu[:, :-d], region[:, d:], region[:, :-d])):
                both = ra & rb
                self.sq_diff[d][0] += float(np.sum((a[both] - b[both]) ** 2))
                self.sq_diff[d][1] += int(both.sum())
        # Edge: the mean profile across the border towards unlabelled lung.
        outside = background & ~region
        if outside.any():
            dist_in = ndimage.distance_transform_edt(region)
            dist_out = ndimage.distance_transform_edt(~region)
            near = ndimage.binary_dilation(outside, iterations=EDGE_PX) & region  # border facing the lung
            for side, (where, dist) in enumerate(((near, dist_in), (outside, dist_out))):
                k = np.rint(dist[where]).astype(int)
                ok = (k >= 1) & (k <= EDGE_PX)
                self.profile[side, 0] += np.bincount(k[ok] - 1, weights=hu[where][ok], minlength=EDGE_PX)
                self.profile[side, 1] += np.bincount(k[ok] - 1, minlength=EDGE_PX)

    def edge(self) -> Tuple[Optional[float], Optional[float]]:
        """(step HU, 20-80 % width mm) of the mean border profile."""
        counts = self.profile[:, 1]
        if (counts == 0).any():
            return None, None
        inner, outer = self.profile[0, 0] / counts[0], self.profile[1, 0] / counts[1]
        lo, hi = outer[PLATEAU].mean(), inner[PLATEAU].mean()
        step = hi - lo
        # Positions (pixels, outside negative) from far outside to far inside.
        x = np.concatenate([-(np.arange(EDGE_PX, 0, -1) - 0.5), np.arange(1, EDGE_PX + 1) - 0.5])
        y = np.concatenate([outer[::-1], inner])
        if abs(step) < 1e-6:
            return float(step), None
        f = (y - lo) / step

        def crossing(level: float) -> Optional[float]:
            for i in range(len(x) - 1):
                if (f[i] - level) * (f[i + 1] - level) <= 0 and f[i] != f[i + 1]:
                    return x[i] + (level - f[i]) * (x[i + 1] - x[i]) / (f[i + 1] - f[i])
            return None
        a, b = crossing(0.2), crossing(0.8)
        width = None if a is None or b is None else abs(b - a) * float(np.median(self.pixel_mm))
        return float(step), width

    def summary(self) -> Dict[str, Optional[float]]:
        if not self.values:
            return {"slices": 0}
        v = np.concatenate(self.values)
        out: Dict[str, Optional[float]] = {"slices": self.slices, "pixels": int(v.size),
                                           "pixel_mm": round(float(np.median(self.pixel_mm)), 3)}
        for p in (5, 25, 50, 75, 95):
            out[f"p{p}"] = round(float(np.percentile(v, p)), 0)
        out["local_sd"] = round(float(np.median(np.concatenate(self.local_sd))), 1) if self.local_sd else None
        for d in LAGS:
            s, n = self.sq_diff[d]
            out[f"rms_diff_{d}"] = round(float(np.sqrt(s / n)), 1) if n else None
        step, width = self.edge()
        out["edge_step"] = None if step is None else round(step, 0)
        out["edge_width_mm"] = None if width is None else round(width, 1)
        return out


# --------------------------------------------------------------------------- real regions
def medseg_regions(root: Path, spacing_mm: float = rd.DEFAULT_SPACING_MM) -> Dict[str, RegionStats]:
    stats = {"GGO": RegionStats(), "Consolidation": RegionStats(), "Healthy": RegionStats()}
    for set_name in rd.SETS:
        slices = rd.read_medseg_set(root, set_name)
        mappings = [rd.estimate_hu_mapping(s.grey) for s in slices]
        rd.complete_mappings(mappings)
        for s, m in zip(slices, mappings):
            hu = m.to_hu(s.grey)
            auto, _ = rd.lung_mask_of_slice(hu, spacing_mm)
            if auto is None:
                auto = np.zeros(hu.shape, bool)
            lung = auto | (s.truth > 0)
            unlabelled = lung & (s.truth == 0)
            stats["GGO"].add(hu, s.truth == 1, unlabelled, spacing_mm)
            stats["Consolidation"].add(hu, s.truth == 2, unlabelled, spacing_mm)
            stats["Healthy"].add(hu, unlabelled, np.zeros_like(unlabelled), spacing_mm)
    return stats


# --------------------------------------------------------------------------- simulated regions
def _through_jpeg(hu: np.ndarray) -> np.ndarray:
    """The MedSeg path: a display window, 8 bits, JPEG, and back to HU."""
    from PIL import Image
    level, width = JPEG_WINDOW
    lo = level - width / 2
    grey = np.clip(np.round((hu - lo) / width * 255), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="JPEG", quality=JPEG_QUALITY)
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L")).astype(np.float32)
    return back * width / 255 + lo


def simulated_cases(case_dirs: Sequence[Path]) -> Iterator[Tuple[str, np.ndarray, np.ndarray, np.ndarray, float]]:
    """(case id, hu, truth, lung mask, pixel mm) in the canonical view, from the
    manifest.csv of ``ildseg simulate`` output folders."""
    from ILDSegmentationLib.imaging.geometry import canonical_view
    import SimpleITK as sitk
    from ILDSegmentationLib.imaging.io import read_ct, read_image, read_lung_mask
    for folder in case_dirs:
        folder = Path(folder)
        with open(folder / "manifest.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            ct = read_ct(folder / row["ct"])
            case_dir = (folder / row["ct"]).parent
            truth = sitk.GetArrayFromImage(read_image(case_dir / "truth.nrrd")[0])  # labels 0..6, the CT's grid
            if truth.shape != np.shape(ct.array):
                raise ValueError(f"{case_dir / 'truth.nrrd'} is not on its CT's grid")
            lung = read_lung_mask(folder / row["lung_mask"], ct)
            view = canonical_view(ct.geometry)
            _, row_mm, col_mm = view.canonical_spacing(ct.geometry)
            yield (row["case_id"], view.to_canonical(rd_as_volume(ct.array)), view.to_canonical(rd_as_volume(truth)),
                   view.to_canonical(rd_as_volume(lung)), 0.5 * (row_mm + col_mm))


def rd_as_volume(a: np.ndarray) -> np.ndarray:
    from ILDSegmentationLib.imaging.geometry import as_volume
    return as_volume(np.asarray(a))


def simulated_regions(case_dirs: Sequence[Path], jpeg: bool = False) -> Dict[str, RegionStats]:
    stats = {"GGO": RegionStats(), "Consolidation": RegionStats(), "Healthy": RegionStats()}
    for _, hu, truth, lung, mm in simulated_cases(case_dirs):
        for z in range(hu.shape[0]):
            t = truth[z]
            if not (t > 1).any():
                continue
            h = _through_jpeg(hu[z].astype(np.float32)) if jpeg else hu[z]
            unlabelled = (lung[z] > 0) & (t <= 1)
            stats["GGO"].add(h, t == 2, unlabelled, mm)
            stats["Consolidation"].add(h, t == 4, unlabelled, mm)
            stats["Healthy"].add(h, t == 1, np.zeros_like(unlabelled), mm)
    return stats


# --------------------------------------------------------------------------- CLI
COLUMNS = ["slices", "p5", "p25", "p50", "p75", "p95", "local_sd", "rms_diff_1", "rms_diff_2", "rms_diff_4",
           "edge_step", "edge_width_mm"]


def table(rows: Dict[str, Dict]) -> str:
    head = f"| {'region':<34} | " + " | ".join(COLUMNS) + " |"
    sep = "|" + "---|" * (len(COLUMNS) + 1)
    lines = [head, sep]
    for name, s in rows.items():
        cells = []
        for c in COLUMNS:
            v = s.get(c)
            cells.append("-" if v is None else (f"{v:.0f}" if isinstance(v, float) and abs(v) >= 20 else f"{v}"))
        lines.append(f"| {name:<34} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--medseg", type=Path, required=True, help="the medseg-covid-slices folder")
    ap.add_argument("--sim-cases", type=Path, nargs="+", required=True, help="output folders of 'ildseg simulate'")
    ap.add_argument("--spacing", type=float, default=rd.DEFAULT_SPACING_MM, help="assumed MedSeg pixel spacing, mm")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows: Dict[str, Dict] = {}
    real = medseg_regions(args.medseg, args.spacing)
    sim = simulated_regions(args.sim_cases)
    sim_jpeg = simulated_regions(args.sim_cases, jpeg=True)
    for kind in ("GGO", "Consolidation", "Healthy"):
        rows[f"{kind}: real (MedSeg)"] = real[kind].summary()
        rows[f"{kind}: simulated"] = sim[kind].summary()
        rows[f"{kind}: simulated via JPEG"] = sim_jpeg[kind].summary()
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    benchmain.run_script(main)

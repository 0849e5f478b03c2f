"""Regional quantification (ILDSegmentationLib.analysis.regions): sides, zones and depth from
the geometry, regions that add up to the totals exactly, the descriptors, the CSV
table and the visual report, through the library and the ildseg command."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from typing import Dict, Tuple

import numpy as np
import pytest
import SimpleITK as sitk

from ILDSegmentationLib.classes import CLASSES
from ILDSegmentationLib.imaging.geometry import Geometry
from ILDSegmentationLib.analysis.regions import (DEFAULT_BAND_MM, TABLE_COLUMNS, costal_pleura_depth, format_regions,
                                                 regional_volumes, table_csv, table_rows, zone_of_slices)
from ILDSegmentationLib.analysis.report import class_volumes, panel_results

# ---------------------------------------------------------------- a chest with a known answer
# Built in the canonical view: (slice superior -> inferior, row anterior -> posterior,
# column patient right -> left), 2 mm slices and 1 mm pixels.
SP = (2.0, 1.0, 1.0)  # slice, row, column (mm)
NZ, NY, NX = 40, 120, 200
GGO, RET, HC = 2, 5, 6


def known_chest() -> Tuple[np.ndarray, Dict[str, object]]:
    """Canonical label map: two ellipsoid lungs (right: columns < 100); ground glass
    in the lowest fifth of the right lung's slices; honeycombing in the left lung's
    outer 4 mm (lateral); reticulation in a ball deep in the left lung's middle."""
    z, y, x = np.mgrid[0:NZ, 0:NY, 0:NX].astype(float)
    zc, yc = (NZ - 1) / 2, (NY - 1) / 2
    labels = np.zeros((NZ, NY, NX), np.uint8)
    right = ((z - zc) / 19.5) ** 2 + ((y - yc) / 50) ** 2 + ((x - 55) / 40) ** 2 <= 1
    left = ((z - zc) / 19.5) ** 2 + ((y - yc) / 50) ** 2 + ((x - 145) / 40) ** 2 <= 1
    labels[right | left] = 1
    first, last = np.flatnonzero(right.any(axis=(1, 2)))[[0, -1]]
    n = last - first + 1
    low = right & (z >= first + 0.8 * n)  # well inside the lower third
    labels[low] = GGO
    # Lateral edge of the left lung: within 4 mm of its outer (left) border, per row.
    lateral = np.zeros_like(left)
    for k in range(NZ):
        for j in range(NY):
            cols = np.flatnonzero(left[k, j])
            if cols.size:
                lateral[k, j, cols[-1] - 3: cols[-1] + 1] = True
    labels[lateral & left] = HC
    deep = ((z - zc) * SP[0]) ** 2 + ((y - yc) * SP[1]) ** 2 + ((x - 145) * SP[2]) ** 2 <= 8 ** 2
    labels[deep] = RET
    return labels, {"ggo": int(low.sum()), "hc": int((lateral & left).sum()), "ret": int(deep.sum())}


def from_canonical(c: np.ndarray, layout: str) -> Tuple[np.ndarray, Geometry]:
    """The canonical array stored as a file would hold it, with the geometry that
    says so. Written out by hand (not with geometry.py) so the test can fail."""
    sz, sy, sx = SP
    if layout == "supine":  # identity: I -> patient left, J -> posterior, K -> superior
        return np.ascontiguousarray(c[::-1]), Geometry((sx, sy, sz))
    if layout == "prone":  # DICOM prone: I -> patient right, J -> anterior, K -> superior
        return np.ascontiguousarray(c[::-1, ::-1, ::-1]), Geometry((sx, sy, sz), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    if layout == "feet_first":  # K -> inferior (slices stored head to feet)
        return np.ascontiguousarray(c), Geometry((sx, sy, sz), direction=(1, 0, 0, 0, 1, 0, 0, 0, -1))
    if layout == "sagittal":  # I -> posterior, J -> superior, K -> patient left
        arr = np.transpose(c[::-1], (2, 0, 1))
        return np.ascontiguousarray(arr), Geometry((sy, sz, sx), direction=(0, 0, 1, 1, 0, 0, 0, 1, 0))
    raise ValueError(layout)


def by_name(items, key, value):
    return next(r for r in items if r[key] == value)


def voxels(region, label: int) -> int:
    return next(c["voxels"] for c in region["classes"] if c["label"] == label)


@pytest.fixture(scope="module")
def chest():
    return known_chest()


@pytest.mark.parametrize("layout", ["supine", "prone", "feet_first", "sagittal"])
def test_sides_zones_and_depth_follow_the_geometry(chest, layout):
    canonical, truth = chest
    labels, geometry = from_canonical(canonical, layout)
    out = regional_volumes(labels, geometry)
    regions = out["regions"]
    # Ground glass: all of it in the right lower zone, none elsewhere.
    assert voxels(by_name([r for r in regions if r["side"] == "right"], "zone", "lower"), GGO) == truth["ggo"]
    assert sum(voxels(r, GGO) for r in regions) == truth["ggo"]
    # Honeycombing at the lateral pleura of the left lung: all subpleural, all left.
    assert voxels(by_name(out["depth"], "depth", "subpleural"), HC) == truth["hc"]
    assert voxels(by_name(out["sides"], "side", "left"), HC) == truth["hc"]
    # Reticulation 8 mm around the left lung's centre, some 40 mm deep: all core, left, middle zone.
    assert voxels(by_name(out["depth"], "depth", "core"), RET) == truth["ret"]
    assert voxels(by_name([r for r in regions if r["side"] == "left"], "zone", "middle"), RET) == truth["ret"]
    d = out["distribution"]["patterns"]
    assert d["honeycombing"]["subpleural_fraction"] == 1.0 and d["reticulation"]["subpleural_fraction"] == 0.0
    assert d["ground_glass_opacity"]["lower_upper_ratio"] is None  # none in the upper zones
    assert d["ground_glass_opacity"]["left_right_ratio"] == 0.0
    assert d["reticulation"]["left_right_ratio"] is None  # none in the right lung
    # The same answer in every layout: one geometry-driven result.
    reference = regional_volumes(*from_canonical(canonical, "supine"))
    assert out["regions"] == reference["regions"] and out["depth"] == reference["depth"]


def test_regions_add_up_to_the_totals_exactly(chest):
    labels, geometry = from_canonical(chest[0], "sagittal")
    assert_adds_up(labels, geometry)


def assert_adds_up(labels: np.ndarray, geometry: Geometry) -> Dict[str, object]:
    totals = class_volumes(labels, geometry)
    out = regional_volumes(labels, geometry)
    for c in totals["classes"]:
        n = c["voxels"]
        assert sum(voxels(r, c["label"]) for r in out["regions"]) == n
        assert sum(voxels(s, c["label"]) for s in out["sides"]) == n
        assert sum(voxels(d, c["label"]) for d in out["depth"]) == n
        for s in out["sides"]:  # each side is its three zones
            assert voxels(s, c["label"]) == sum(voxels(r, c["label"]) for r in out["regions"] if r["side"] == s["side"])
        # mL: the same integer counts times one voxel volume (rounded to 1e-6 mL each).
        assert sum(next(k["volume_ml"] for k in r["classes"] if k["label"] == c["label"]) for r in out["regions"]) \
            == pytest.approx(c["volume_ml"], abs=1e-5)
    for group in ("regions", "sides", "depth"):
        assert sum(r["lung_voxels"] for r in out[group]) == totals["lung_voxels"]
        for r in out[group]:
            assert r["lung_voxels"] == sum(c["voxels"] for c in r["classes"])
            if r["lung_voxels"]:
                assert sum(c["percent_of_region"] for c in r["classes"]) == pytest.approx(100, abs=0.01)
    return out


def test_zone_thirds_by_slice_centre():
    present = np.zeros(12, bool)
    present[2:11] = True  # 9 slices: 3 per zone
    assert zone_of_slices(present).tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0]
    one = np.zeros(5, bool)
    one[3] = True
    assert zone_of_slices(one).tolist() == [0, 0, 0, 2, 0]  # a single slice is the middle


def test_depth_is_measured_from_the_chest_wall_not_the_mediastinum():
    # One slice, two lungs 20 px apart: the medial border faces the mediastinum.
    lung = np.zeros((1, 60, 140), bool)
    lung[0, 10:50, 10:60] = True
    lung[0, 10:50, 80:130] = True
    depth = costal_pleura_depth(lung, (2.0, 1.0, 1.0))
    assert depth[0, 30, 10] == pytest.approx(1.0)  # lateral edge: 1 px from the chest wall
    assert depth[0, 30, 59] > 15  # medial edge, beside the mediastinum: deep
    assert depth[0, 30, 59] == pytest.approx(20.0)  # as deep as the nearest costal (anterior/posterior) pleura
    assert (depth[~lung] == 0).all()


def test_simulator_uses_the_same_depth_function():
    from ILDSegmentationLib.analysis import regions
    from ILDSegmentationLib.simulation import case
    assert case.inplane_distance is regions.inplane_distance
    assert case.inside_chest_wall is regions.inside_chest_wall and case.slice_hulls is regions.slice_hulls


def test_table_rows_csv_and_panel(chest):
    labels, geometry = from_canonical(chest[0], "supine")
    report = {**class_volumes(labels, geometry), **regional_volumes(labels, geometry)}
    rows = table_rows(report)
    # whole lung + 2 sides + 6 zones + 2 depths, six classes each
    assert len(rows) == 11 * len(CLASSES)
    assert {r["region"] for r in rows} >= {"lung", "right lung", "left lung", "right upper", "left lower",
                                           "subpleural", "core"}
    text = table_csv(report)
    parsed = list(csv.DictReader(text.splitlines()))
    assert tuple(parsed[0]) == TABLE_COLUMNS and len(parsed) == len(rows)
    ggo_rl = next(r for r in parsed if r["region"] == "right lower" and r["label"] == str(GGO))
    assert int(ggo_rl["voxels"]) == chest[1]["ggo"]
    panel = panel_results({**report, "input_checks": [
        {"check": "slice_thickness", "status": "warning", "detail": "5 mm slices"},
        {"check": "noise", "status": "ok", "detail": "12 HU"}]})
    assert panel["columns"] == list(TABLE_COLUMNS) and len(panel["rows"]) == len(rows)
    assert panel["warnings"] == ["slice thickness: 5 mm slices"]
    assert any("Honeycombing" in line for line in panel["distribution"])
    printed = format_regions(report)
    assert "right lower" in printed and "fibrotic extent" in printed


def test_visual_report_png_and_pdf(chest, tmp_path):
    pytest.importorskip("matplotlib")
    from ILDSegmentationLib.analysis.visual_report import render_visual_report
    canonical, _ = chest
    labels, geometry = from_canonical(canonical, "prone")
    hu = np.where(labels > 0, -850, 40).astype(np.int16)
    report = {**class_volumes(labels, geometry), **regional_volumes(labels, geometry),
              "input_checks": [{"check": "noise", "status": "ok", "detail": "12 HU"}]}
    png = render_visual_report(hu, labels, geometry, report, tmp_path / "page.png", title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    assert Image.open(png).size == (1240, 1753)  # A4 at 150 dpi
    pdf = render_visual_report(hu, labels, geometry, report, tmp_path / "page.pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.pdf", "page.png"]  # no temporary left


# ---------------------------------------------------------------- a real CT


def test_real_ct_regions_add_up_and_sides_match_the_lung_mask(ricord_path):
    from ILDSegmentationLib.imaging.io import read_ct
    from ILDSegmentationLib.imaging.lungmask import compute_lung_mask
    ct = read_ct(ricord_path)
    mask = compute_lung_mask(ct.array, ct.geometry)  # 1 right, 2 left (its own split)
    # Classes by attenuation bands: a deterministic stand-in for a model's labels.
    hu = np.asarray(ct.array)
    labels = np.where(mask > 0, 1 + np.digitize(hu, [-900, -800, -700, -500, -200]), 0).astype(np.uint8)
    out = assert_adds_up(labels, ct.geometry)
    ml = ct.geometry.voxel_volume_ml
    for side, value in (("right", 1), ("left", 2)):
        mine = by_name(out["sides"], "side", side)["lung_voxels"]
        theirs = int((mask == value).sum())
        assert mine == pytest.approx(theirs, rel=0.02), side
    right = by_name(out["sides"], "side", "right")["lung_volume_ml"]
    assert 1000 < right < 4000 and right == pytest.approx(int((mask == 1).sum()) * ml, rel=0.02)
    # Zones: thirds of each lung's height hold comparable volumes, the middle the most.
    zones = {z: sum(r["lung_voxels"] for r in out["regions"] if r["zone"] == z) for z in ("upper", "middle", "lower")}
    assert zones["middle"] > zones["upper"] and zones["middle"] > zones["lower"]
    # The subpleural band (10 mm) holds a fifth to a half of a real lung.
    assert 0.15 < out["distribution"]["lung_subpleural_fraction"] < 0.5
    assert out["distribution"]["band_mm"] == DEFAULT_BAND_MM


# ---------------------------------------------------------------- the command


def ildseg(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "ILDSegmentationLib", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def small_case(tmp_path_factory):
    from synthetic import random_model, two_lungs
    d = tmp_path_factory.mktemp("case")
    hu, mask = two_lungs(n_slices=9)
    for name, arr in (("ct.nrrd", hu), ("mask.nii.gz", mask)):
        image = sitk.GetImageFromArray(arr)
        image.SetSpacing((0.8, 0.8, 2.5))
        image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
        sitk.WriteImage(image, str(d / name))
    return d, random_model(d).path


def test_cli_writes_table_visual_report_and_regions_in_the_report(small_case, tmp_path):
    pytest.importorskip("matplotlib")
    d, model = small_case
    r = ildseg("segment", d / "ct.nrrd", "--lung-mask", d / "mask.nii.gz", "--model", model, "--device", "cpu",
               "-o", tmp_path / "labels.nrrd", "--report", tmp_path / "report.json", "--table", tmp_path / "t.csv",
               "--visual-report", tmp_path / "page.png", "--subpleural-band", "5")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(g["side"], g["zone"]) for g in report["regions"]] == \
        [(s, z) for s in ("right", "left") for z in ("upper", "middle", "lower")]
    assert [g["depth"] for g in report["depth"]] == ["subpleural", "core"] and report["depth"][0]["band_mm"] == 5
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labels.nrrd")))
    for c in report["classes"]:
        assert sum(voxels(g, c["label"]) for g in report["regions"]) == c["voxels"] == int((labels == c["label"]).sum())
        assert sum(voxels(g, c["label"]) for g in report["depth"]) == c["voxels"]
    assert {c["check"] for c in report["input_checks"]} == {
        "slice_thickness", "reconstruction_kernel", "contrast", "patient_position", "lung_coverage", "pixel_size",
        "noise"}
    assert all(c["status"] in ("ok", "warning") for c in report["input_checks"])
    rows = list(csv.DictReader((tmp_path / "t.csv").read_text().splitlines()))
    assert len(rows) == 11 * len(CLASSES)
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "right lower" in r.stdout and "fibrotic extent" in r.stdout
    # The small case is cut at both ends (lung on its first and last slice): a warning, not a refusal.
    assert "lung coverage" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nrrd", "page.png", "report.json", "t.csv"]


@pytest.mark.parametrize("case", ["table_txt", "table_missing_folder", "visual_jpg", "visual_missing_folder",
                                  "band_zero", "table_in_batch"])
def test_cli_bad_table_or_visual_report_exit_2_nothing_written(small_case, tmp_path, case):
    d, model = small_case
    extra = {"table_txt": ["--table", tmp_path / "t.txt"],
             "table_missing_folder": ["--table", tmp_path / "no" / "t.csv"],
             "visual_jpg": ["--visual-report", tmp_path / "v.jpg"],
             "visual_missing_folder": ["--visual-report", tmp_path / "no" / "v.png"],
             "band_zero": ["--subpleural-band", "0"],
             "table_in_batch": ["--table", tmp_path / "t.csv", "--out-dir", tmp_path / "batch"]}[case]
    r = ildseg("segment", d / "ct.nrrd", "--lung-mask", d / "mask.nii.gz", "--model", model, "--device", "cpu",
               "-o", tmp_path / "labels.nrrd", *extra)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ildseg: error:"), r.stderr
    assert list(tmp_path.iterdir()) == []

"""ildseg compare (issue 27): registration, change arithmetic, change map, refusals,
on real CC BY CT (tcga-luad-tcga-17-z015, a 60 mm slab of 5 mm slices to keep it
fast; lidc-idri-0002 for a different patient). Skips with the reason without the data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, REPO, _need

sitk = pytest.importorskip("SimpleITK")

from ILDSegmentationLib.analysis.change import (MDC_FIBROTIC_PERCENT_POINTS, NEW_OFFSET, RESOLVED_OFFSET, UNCOVERED,
                                                change_map, change_summary, scan_measures, voxel_changes)
from ILDSegmentationLib.commands.compare import compare_files
from ILDSegmentationLib.errors import InputError
from ILDSegmentationLib.imaging.geometry import Geometry

Z015 = DATA / "tcga-luad-tcga-17-z015" / "tcga-luad-tcga-17-z015.nrrd"
LIDC2 = DATA / "lidc-idri-0002" / "lidc-idri-0002.nrrd"


# ------------------------------------------------------------------ arithmetic, no CT


def test_change_map_labels_and_counts():
    g = Geometry((1.0, 1.0, 1.0))
    base = np.array([[[0, 1, 1, 5, 5, 6, 2, 1]]], np.uint8)
    foll = np.array([[[0, 1, 5, 5, 1, 5, 0, 6]]], np.uint8)
    m = change_map(base, foll)
    assert m.tolist() == [[[0, 1, NEW_OFFSET + 5, 5, RESOLVED_OFFSET + 5, NEW_OFFSET + 5, UNCOVERED,
                            NEW_OFFSET + 6]]]
    v = voxel_changes(base, foll, g)
    assert v["patterns"]["reticulation"] == {"new_ml": 0.002, "resolved_ml": 0.001, "unchanged_ml": 0.001}
    assert v["patterns"]["honeycombing"] == {"new_ml": 0.001, "resolved_ml": 0.001, "unchanged_ml": 0.0}
    assert v["not_covered_ml"] == 0.001


def test_change_summary_percent_points_and_significance():
    g = Geometry((1.0, 1.0, 2.0))
    base = np.ones((6, 20, 40), np.uint8)
    foll = base.copy()
    foll[:, :, :2] = 5  # 2 of 40 columns: 5 % of the lung becomes reticulation
    s = change_summary(scan_measures(base, g), scan_measures(foll, g))
    ret = next(c for c in s["classes"] if c["label"] == 5)
    assert ret["baseline_percent"] == 0 and ret["followup_percent"] == pytest.approx(5.0)
    assert ret["change_percent_points"] == pytest.approx(5.0)
    assert ret["change_ml"] == pytest.approx(6 * 20 * 2 * 2 / 1000)
    assert ret["significant"] is True
    assert s["fibrotic_extent"]["change"] == pytest.approx(5.0) and s["fibrotic_extent"]["significant"]
    same = change_summary(scan_measures(base, g), scan_measures(base, g))
    assert not same["fibrotic_extent"]["significant"]
    assert all(c["change_percent_points"] == 0 and c["significant"] is False for c in same["classes"])
    # Regions: each side x zone, each side, both depths, all with their own fibrotic extent.
    assert {r["region"] for r in s["regions"]} >= {"right lung", "left upper", "subpleural", "core"}
    assert all(c["significant"] is None for r in s["regions"] for c in r["classes"])


# ------------------------------------------------------------------ real CT


def _slab(path: Path, slab_mm: float = 60.0):
    from ILDSegmentationLib.simulation.followup import moved_scan, shifted_grid
    full = sitk.ReadImage(str(_need(path)))
    n = full.GetSize()[2]
    count = int(round(slab_mm / full.GetSpacing()[2]))
    first = (n - count) // 2
    grid = shifted_grid(full, 0.0, first, count)
    return full, grid, first, count, moved_scan(full, grid, sitk.Transform())[0]


def _lung(image):
    from ILDSegmentationLib.imaging.lungmask import compute_lung_mask
    return compute_lung_mask(sitk.GetArrayFromImage(image), Geometry.from_sitk(image))


def _write(array, reference, path):
    img = sitk.GetImageFromArray(np.asarray(array, np.uint8))
    img.CopyInformation(reference)
    sitk.WriteImage(img, str(path), True)
    return path


@pytest.fixture(scope="module")
def z015(tmp_path_factory):
    """The slab, its lung mask, and the slab moved (2.5 degrees, 4 mm) and resampled."""
    from ILDSegmentationLib.simulation.followup import motion, moved_scan
    full, grid, first, count, base = _slab(Z015)
    d = tmp_path_factory.mktemp("z015")
    sitk.WriteImage(base, str(d / "baseline.nrrd"), True)
    # Not one of the motions bench/compare_mdc.py calibrated the minimum detectable change on.
    moved = moved_scan(full, grid, motion(full, (-1.5, 2.5, 2.0), (-2.0, 4.0, 3.0)))[0]
    sitk.WriteImage(moved, str(d / "moved.nrrd"), True)
    lung = _lung(base)
    _write(lung != 0, base, d / "baseline_mask.nrrd")
    return {"dir": d, "full": full, "grid": grid, "base": base, "lung": lung}


def test_same_lung_moved_shows_no_significant_change(z015, default_model):
    """The issue's first 'done when': the model segments both; the fibrotic extent
    changes by at most 1 percentage point and is not flagged significant."""
    d = z015["dir"]
    s = compare_files(d / "baseline.nrrd", d / "moved.nrrd", d / "out-moved", baseline_mask=d / "baseline_mask.nrrd",
                      model=default_model, visual_report=False)
    assert abs(s["fibrotic_extent"]["change"]) <= 1.0
    assert s["fibrotic_extent"]["significant"] is False
    assert s["registration"]["lung_dice_affine"] > 0.9
    on_disk = json.loads((d / "out-moved" / "change.json").read_text())
    assert on_disk["fibrotic_extent"] == s["fibrotic_extent"]
    for c in on_disk["classes"]:
        assert {"baseline_percent", "followup_percent", "change_percent_points", "baseline_ml", "followup_ml",
                "change_ml", "significant"} <= set(c)
    names = {p.name for p in (d / "out-moved").iterdir()}
    assert {"change.json", "change.csv", "change_map.seg.nrrd", "baseline.seg.nrrd", "followup.seg.nrrd",
            "baseline_report.json", "followup_report.json"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temporary file left
    cmap = sitk.ReadImage(str(d / "out-moved" / "change_map.seg.nrrd"))
    assert cmap.GetSize() == z015["base"].GetSize()
    assert np.allclose(cmap.GetOrigin(), z015["base"].GetOrigin())


def test_simulated_progression_has_the_right_sign_and_size(z015, tmp_path):
    """The second 'done when', with truth labels reused (the change arithmetic and
    registration path): fibrosis added to the same CT, then moved; the reported change
    has the truth's sign and lies within half to twice it."""
    from ILDSegmentationLib.simulation.followup import motion, progressed_followup
    full, base = z015["full"], z015["base"]
    case = progressed_followup(base, z015["lung"], seed=3, transform=motion(base, (1.5, -1.0, 2.0), (2.0, 3.0, -2.0)))
    truth_change = case.true_fibrotic_change_pp  # on the baseline grid, before the motion
    assert truth_change > 1.0, "the progression added too little fibrosis to test against"
    sitk.WriteImage(case.baseline_ct, str(tmp_path / "b.nrrd"), True)
    sitk.WriteImage(case.followup_ct, str(tmp_path / "f.nrrd"), True)
    _write(case.baseline_truth, case.baseline_ct, tmp_path / "b_truth.nrrd")
    _write(case.followup_truth, case.followup_ct, tmp_path / "f_truth.nrrd")
    s = compare_files(tmp_path / "b.nrrd", tmp_path / "f.nrrd", tmp_path / "out", baseline_labels=tmp_path / "b_truth.nrrd",
                      followup_labels=tmp_path / "f_truth.nrrd", visual_report=False)
    got = s["fibrotic_extent"]["change"]
    assert 0.5 * truth_change <= got <= 2.0 * truth_change
    assert s["fibrotic_extent"]["significant"] == (abs(got) > MDC_FIBROTIC_PERCENT_POINTS)
    new = sum(v["new_ml"] for k, v in s["voxel_changes"]["patterns"].items() if k in ("reticulation", "honeycombing"))
    assert new > 0
    assert s["registration"]["lung_dice_affine"] > 0.9


def test_different_patients_are_refused_and_nothing_is_written(z015, tmp_path):
    """lidc-idri-0002 as the 'follow-up' of tcga-17-z015: refused after registration,
    the output folder removed; with force, compared with a loud warning."""
    _, _, _, _, other = _slab(LIDC2)
    sitk.WriteImage(other, str(tmp_path / "other.nrrd"), True)
    # The lung masks as all-healthy label maps: registration only, no network needed.
    _write((z015["lung"] != 0), z015["base"], tmp_path / "b_lab.nrrd")
    _write((_lung(other) != 0), other, tmp_path / "o_lab.nrrd")
    out = tmp_path / "out"
    with pytest.raises(InputError, match="do not match"):
        compare_files(z015["dir"] / "baseline.nrrd", tmp_path / "other.nrrd", out, baseline_labels=tmp_path / "b_lab.nrrd",
                      followup_labels=tmp_path / "o_lab.nrrd", visual_report=False)
    assert not out.exists()
    s = compare_files(z015["dir"] / "baseline.nrrd", tmp_path / "other.nrrd", out, baseline_labels=tmp_path / "b_lab.nrrd",
                      followup_labels=tmp_path / "o_lab.nrrd", visual_report=False, force=True)
    assert any("DIFFERENT PATIENTS" in w for w in s["warnings"])


def test_mismatched_inputs_are_refused_in_one_line(z015, tmp_path):
    d = z015["dir"]
    # Labels of another grid (the moved slab's labels are on the same grid: use the full CT's size instead).
    wrong = np.ones(sitk.GetArrayFromImage(z015["full"]).shape, np.uint8)
    _write(wrong, z015["full"], tmp_path / "wrong.nrrd")
    with pytest.raises(InputError, match="not on the baseline CT's grid"):
        compare_files(d / "baseline.nrrd", d / "moved.nrrd", tmp_path / "o1", baseline_labels=tmp_path / "wrong.nrrd",
                      followup_labels=tmp_path / "wrong.nrrd", visual_report=False)
    assert not (tmp_path / "o1").exists()
    proc = subprocess.run([sys.executable, "-m", "ILDSegmentationLib", "compare", str(d / "baseline.nrrd"),
                           str(d / "baseline.nrrd"), "--out", str(tmp_path / "o2")],
                          capture_output=True, text=True, cwd=str(REPO), env={"OMP_NUM_THREADS": "1",
                                                                              "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["ildseg: error: the baseline and the follow-up are the same file"]
    assert not (tmp_path / "o2").exists()


def test_pair_checks_warn_about_thickness_and_position(dicom_dir):
    """A follow-up with other slices (8 mm DICOM vs 5 mm NRRD) and a prone follow-up are
    warned about; the scanner and kernel are not claimed for a file without tags."""
    from ILDSegmentationLib.commands.compare import _position_check, pair_checks
    from ILDSegmentationLib.imaging.io import read_ct
    cts = {"baseline": read_ct(_need(Z015)), "followup": read_ct(dicom_dir)}
    checks = {c["check"]: c for c in pair_checks(cts)}
    assert checks["slice_thickness"]["status"] == "warning" and "8 mm" in checks["slice_thickness"]["detail"]
    assert checks["scanner"]["status"] == "ok" and "not recorded" in checks["scanner"]["detail"]
    same = pair_checks({"baseline": cts["followup"], "followup": cts["followup"]})
    assert all(c["status"] == "ok" for c in same)
    assert any("SIEMENS" in c["detail"].upper() for c in same if c["check"] == "scanner")
    supine = [{"check": "patient_position", "status": "ok", "detail": "head first, supine (DICOM)"}]
    prone = [{"check": "patient_position", "status": "ok", "detail": "head first, prone (DICOM)"}]
    assert _position_check({"baseline": supine, "followup": prone})["status"] == "warning"
    assert _position_check({"baseline": supine, "followup": supine})["status"] == "ok"


def test_an_earlier_segment_output_folder_is_found(tmp_path):
    """--baseline-labels DIR: the labels its report.json names (a batch case folder), else
    its one .seg.nrrd; a folder with neither is refused in one line."""
    from ILDSegmentationLib.commands.compare import _labels_path
    case = tmp_path / "case1"
    case.mkdir()
    (case / "labels.seg.nrrd").write_bytes(b"")
    (case / "report.json").write_text(json.dumps({"outputs": {"labels": "elsewhere/labels.seg.nrrd"},
                                                  "input_checks": []}))
    path, report = _labels_path(case)
    assert path == case / "labels.seg.nrrd" and report["input_checks"] == []
    (case / "report.json").unlink()
    assert _labels_path(case) == (case / "labels.seg.nrrd", None)
    (case / "other.seg.nrrd").write_bytes(b"")
    with pytest.raises(InputError, match="no labels found"):
        _labels_path(case)


def test_labelling_differences_are_warned_about():
    """Different models or decision rules at the two scans make part of the change the
    labelling's; a rule other than the paper's is not what the minimum detectable
    change was measured with. Unknown (labels reused without a report): nothing said."""
    from ILDSegmentationLib.commands.compare import labelling_warnings
    same = {"baseline": {"sha256": "a"}, "followup": {"sha256": "a"}}
    assert labelling_warnings(same, {"baseline": "paper", "followup": "paper"}) == []
    assert labelling_warnings({"baseline": {}, "followup": {}}, {"baseline": None, "followup": None}) == []
    other_model = labelling_warnings({"baseline": {"sha256": "a"}, "followup": {"sha256": "b"}},
                                     {"baseline": "paper", "followup": "paper"})
    assert other_model == ["pair: the two scans were labelled by different models: the change is partly the models'"]
    mixed = labelling_warnings(same, {"baseline": "paper", "followup": "prior"})
    assert len(mixed) == 2 and "different decision rules (paper, prior)" in mixed[0]
    assert "'prior' decision rule" in mixed[1] and "--decision paper" in mixed[1]
    assert len(labelling_warnings(same, {"baseline": "prior", "followup": "prior"})) == 1
    assert labelling_warnings(same, {"baseline": None, "followup": "paper"}) == []

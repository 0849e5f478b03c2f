"""``ildseg segment`` over many CTs (batch.py): one folder per case, summary.csv, a
broken case reported and skipped, exit code 3, resuming, --overwrite, one model load."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from synthetic import random_model

from ILDSegmentationLib.commands.batch import (EXIT_SOME_FAILED, BatchCase, CaseOutcome, cases_from_paths,
                                               read_batch_manifest, summary_row)
from ILDSegmentationLib.classes import CLASSES


def ildseg(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "ILDSegmentationLib", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)


SPACING = (3.6, 3.6, 25.0)  # a small, coarse synthetic chest: fast, and the automatic lung mask finds its lungs
VOXEL_ML = SPACING[0] * SPACING[1] * SPACING[2] / 1000


def _write_ct(path: Path, seed: int) -> np.ndarray:
    """A synthetic chest CT (phantom.py) at ``path``; returns its lung mask."""
    from ILDSegmentationLib.simulation.phantom import make_chest_phantom
    p = make_chest_phantom(seed=seed, size=96, n_slices=8, spacing=SPACING)
    image = sitk.GetImageFromArray(p.hu)
    image.SetSpacing(SPACING)
    image.SetOrigin(p.geometry.origin)
    sitk.WriteImage(image, str(path))
    return (p.lung_labels > 0).astype(np.uint8)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Two good synthetic chest CTs, one truncated file, a lung mask and a random model."""
    d = tmp_path_factory.mktemp("batch_in")
    mask = _write_ct(d / "alpha.nrrd", 0)
    _write_ct(d / "beta.nii.gz", 1)
    m = sitk.GetImageFromArray(mask)
    m.CopyInformation(sitk.ReadImage(str(d / "alpha.nrrd")))
    sitk.WriteImage(m, str(d / "alpha_mask.nrrd"))
    sitk.WriteImage(sitk.ReadImage(str(d / "alpha.nrrd")), str(d / "broken.mha"))
    data = (d / "broken.mha").read_bytes()
    (d / "broken.mha").write_bytes(data[:len(data) // 2])  # a corrupt (truncated) file
    return d, random_model(d).path


def _summary(out: Path):
    with open(out / "summary.csv", newline="") as f:
        return {r["case_id"]: r for r in csv.DictReader(f)}


def _inode(p: Path) -> int:
    return p.stat().st_ino  # outputs are written by rename: a rewritten file is a new inode


def test_a_broken_case_is_reported_and_skipped_the_others_finish_exit_3(cases, tmp_path):
    d, model = cases
    out = tmp_path / "out"
    r = ildseg("segment", d / "alpha.nrrd", d / "broken.mha", d / "beta.nii.gz", "--out-dir", out,
               "--model", model, "--device", "cpu", "--overlay", "overlay.png")
    assert r.returncode == EXIT_SOME_FAILED == 3, r.stderr
    failed = [line for line in r.stderr.splitlines() if "failed" in line]
    assert len(failed) == 1 and failed[0].startswith("ildseg: case broken failed: ") and "broken.mha" in failed[0]
    assert "3 cases: 2 done, 0 already done (skipped), 1 failed" in r.stdout
    # The good cases are complete, the broken one left no folder.
    assert sorted(p.name for p in out.iterdir()) == ["alpha", "beta", "summary.csv"]
    for case in ("alpha", "beta"):
        assert sorted(p.name for p in (out / case).iterdir()) == ["labels.seg.nrrd", "overlay.png", "report.json"]
    rows = _summary(out)
    assert list(rows) == ["alpha", "broken", "beta"]  # one row per case, in the order given
    assert rows["broken"]["status"] == "failed" and "broken.mha" in rows["broken"]["error"]
    assert rows["broken"]["lung_volume_ml"] == ""
    for case in ("alpha", "beta"):
        row, report = rows[case], json.loads((out / case / "report.json").read_text())
        assert row["status"] == "done" and row["error"] == ""
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / case / "labels.seg.nrrd")))
        assert float(row["lung_volume_ml"]) == pytest.approx(int((labels > 0).sum()) * VOXEL_ML, rel=1e-6)
        percents = [float(row[f"percent_{c.segment_id}"]) for c in CLASSES]
        assert percents == pytest.approx([100 * (labels == c.label).sum() / (labels > 0).sum() for c in CLASSES],
                                         abs=1e-3)
        assert row["model_sha256"] == report["model"]["sha256"] and float(row["seconds"]) > 0


def test_rerun_skips_complete_cases_and_overwrite_redoes_them(cases, tmp_path):
    d, model = cases
    out = tmp_path / "out"
    args = ["segment", d / "alpha.nrrd", d / "beta.nii.gz", "--out-dir", out, "--model", model, "--device", "cpu"]
    assert ildseg(*args).returncode == 0
    first = {c: _inode(out / c / "labels.seg.nrrd") for c in ("alpha", "beta")}

    # An interrupted case: its report (written last) is missing, so only it is redone.
    (out / "beta" / "report.json").unlink()
    r = ildseg(*args)
    assert r.returncode == 0, r.stderr
    assert "2 cases: 1 done, 1 already done (skipped), 0 failed" in r.stdout
    assert _inode(out / "alpha" / "labels.seg.nrrd") == first["alpha"]
    assert _inode(out / "beta" / "labels.seg.nrrd") != first["beta"]
    rows = _summary(out)
    assert rows["alpha"]["status"] == "skipped" and rows["beta"]["status"] == "done"
    # The skipped case's row carries its figures, from its report.
    assert float(rows["alpha"]["lung_volume_ml"]) > 0

    second = {c: _inode(out / c / "labels.seg.nrrd") for c in ("alpha", "beta")}
    r = ildseg(*args, "--overwrite")
    assert r.returncode == 0 and "2 cases: 2 done, 0 already done" in r.stdout
    assert all(_inode(out / c / "labels.seg.nrrd") != second[c] for c in ("alpha", "beta"))

    # Asking for an output the earlier run did not write makes the case incomplete.
    r = ildseg(*args, "--overlay", "overlay.png")
    assert r.returncode == 0 and "2 cases: 2 done" in r.stdout
    assert (out / "alpha" / "overlay.png").is_file()


def test_the_model_is_loaded_once_for_the_whole_batch(cases, tmp_path, monkeypatch):
    """Counts the real loader's calls (wrapped, not replaced) wherever the batch or the
    pipeline could call it."""
    from ILDSegmentationLib.analysis import pipeline
    from ILDSegmentationLib.commands import cli
    from ILDSegmentationLib.engine import modelfile
    d, model = cases
    calls = []
    real = modelfile.load_model

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(modelfile, "load_model", counting)
    monkeypatch.setattr(pipeline, "load_model", counting)
    out = tmp_path / "out"
    code = cli.main(["segment", str(d / "alpha.nrrd"), str(d / "beta.nii.gz"), str(d / "alpha.nrrd"),
                     "--out-dir", str(out), "--model", str(model), "--device", "cpu", "--quiet"])
    # alpha twice: the same id twice is refused before any work (nothing loaded).
    assert code == 2 and calls == [] and not out.exists()
    (tmp_path / "c").mkdir()
    shutil.copy(d / "alpha.nrrd", tmp_path / "c" / "gamma.nrrd")
    code = cli.main(["segment", str(d / "alpha.nrrd"), str(d / "beta.nii.gz"), str(tmp_path / "c" / "gamma.nrrd"),
                     "--out-dir", str(out), "--model", str(model), "--device", "cpu", "--quiet"])
    assert code == 0
    assert len(calls) == 1
    assert sorted(_summary(out)) == ["alpha", "beta", "gamma"]


def test_manifest_cases_with_their_own_masks_and_a_missing_ct(cases, tmp_path):
    d, model = cases
    shutil.copytree(d, tmp_path / "in")
    manifest = tmp_path / "cases.csv"
    # Paths relative to the manifest, or absolute.
    manifest.write_text("case_id,ct,lung_mask\n"
                        "with-mask,in/alpha.nrrd,in/alpha_mask.nrrd\n"
                        f"auto-mask,{tmp_path / 'in' / 'beta.nii.gz'},auto\n"
                        "missing,in/nope.nrrd,\n")
    out = tmp_path / "out"
    r = ildseg("segment", "--manifest", manifest, "--out-dir", out, "--model", model, "--device", "cpu")
    assert r.returncode == 3, r.stderr
    assert "ildseg: case missing failed: " in r.stderr and "nope.nrrd" in r.stderr
    rows = _summary(out)
    assert [rows[c]["status"] for c in ("with-mask", "auto-mask", "missing")] == ["done", "done", "failed"]
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "alpha_mask.nrrd")))
    # The given mask is the lung: its volume is the case's lung volume.
    assert float(rows["with-mask"]["lung_volume_ml"]) == pytest.approx(int(mask.sum()) * VOXEL_ML)
    assert rows["with-mask"]["lung_mask"].endswith("alpha_mask.nrrd") and rows["auto-mask"]["lung_mask"] == "auto"


@pytest.mark.parametrize("problem", ["several_without_out_dir", "mask_file_in_batch", "path_as_output_name",
                                     "same_id_twice", "empty_folder", "manifest_without_ct_column"])
def test_bad_batch_arguments_exit_2_in_one_line_before_any_work(cases, tmp_path, problem):
    d, model = cases
    out = tmp_path / "out"
    base = ["--model", model, "--device", "cpu"]
    if problem == "several_without_out_dir":
        args = [d / "alpha.nrrd", d / "beta.nii.gz", "-o", tmp_path / "x.nrrd"]
    elif problem == "mask_file_in_batch":
        args = [d / "alpha.nrrd", "--out-dir", out, "--lung-mask", d / "alpha_mask.nrrd"]
    elif problem == "path_as_output_name":
        args = [d / "alpha.nrrd", "--out-dir", out, "-o", tmp_path / "labels.nrrd"]
    elif problem == "same_id_twice":
        (tmp_path / "sub").mkdir()
        shutil.copy(d / "alpha.nrrd", tmp_path / "sub" / "alpha.nrrd")
        args = [d / "alpha.nrrd", tmp_path / "sub" / "alpha.nrrd", "--out-dir", out]
    elif problem == "empty_folder":
        (tmp_path / "nothing").mkdir()
        args = [tmp_path / "nothing", "--out-dir", out]
    else:
        (tmp_path / "m.csv").write_text("case_id,image\na,alpha.nrrd\n")
        args = ["--manifest", tmp_path / "m.csv", "--out-dir", out]
    r = ildseg("segment", *args, *base)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ildseg: error: "), r.stderr
    assert not out.exists() or list(out.iterdir()) == []
    assert not (tmp_path / "x.nrrd").exists() and not (tmp_path / "labels.nrrd").exists()


def test_one_ct_form_is_unchanged_and_needs_o(cases, tmp_path):
    d, model = cases
    r = ildseg("segment", d / "alpha.nrrd", "-o", tmp_path / "labels.nrrd", "--model", model, "--device", "cpu",
               "--quiet")
    assert r.returncode == 0 and (tmp_path / "labels.nrrd").is_file() and not (tmp_path / "summary.csv").exists()
    r = ildseg("segment", d / "alpha.nrrd", "--model", model)
    assert r.returncode == 2 and "-o OUT is required" in r.stderr


def test_a_folder_of_series_is_searched_for_cases(dicom_dir, tmp_path):
    """Each folder holding DICOM files is a case (named by its path), each image file another."""
    root = tmp_path / "study"
    series = root / "patient1" / "ct"
    series.mkdir(parents=True)
    for f in sorted(dicom_dir.glob("*.dcm"))[:3]:
        shutil.copy(f, series / f.name)
    (root / "patient2").mkdir()
    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkInt16), str(root / "patient2" / "scan.nii.gz"))
    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkUInt8), str(root / "patient2" / "old.seg.nrrd"))
    (root / "notes.txt").write_text("not a CT")
    found = cases_from_paths([root])
    assert [(c.case_id, c.ct) for c in found] == [("patient1_ct", series),
                                                   ("patient2_scan", root / "patient2" / "scan.nii.gz")]
    # A series folder given directly is one case, named by the folder.
    assert [(c.case_id, c.ct) for c in cases_from_paths([series])] == [("ct", series)]


def test_manifest_reads_a_training_manifest_too(tmp_path):
    (tmp_path / "cases.csv").write_text("case_id,ct,lung_mask,annotation\nc1,a/ct.nrrd,auto,a/ann.nrrd\n"
                                        "c2,/abs/ct2.nrrd,m2.nrrd,ann2.nrrd\n")
    got = read_batch_manifest(tmp_path / "cases.csv")
    assert [(c.case_id, c.ct, c.lung_mask) for c in got] == [
        ("c1", tmp_path / "a" / "ct.nrrd", None), ("c2", Path("/abs/ct2.nrrd"), tmp_path / "m2.nrrd")]


def test_summary_row_takes_descriptors_and_warnings_from_the_report():
    """The report of regional quantification (distribution, input_checks) lands in
    summary.csv as columns, whatever keys it holds."""
    report = {"lung_volume_ml": 4200.0,
              "classes": [{"label": c.label, "percent_of_lung": float(c.label)} for c in CLASSES],
              "input": {"note": "DICOM slices are unevenly spaced", "hu_check": {"warnings": ["air is -950 HU"]}},
              "input_checks": [{"check": "lung_coverage", "status": "warning", "detail": "lungs cut at the apex"},
                               {"check": "slice_thickness", "status": "ok", "detail": "1.25 mm"}],
              "distribution": {"upper_lower_ratio": 0.5, "peripheral": {"percent": 61.0}, "dominant": "basal"},
              "timings_s": {"total": 12.345}, "device": "cpu", "model": {"sha256": "ab" * 32}}
    row = summary_row(CaseOutcome(BatchCase("c", Path("c.nrrd")), "done", report=report))
    assert row["lung_volume_ml"] == 4200.0 and row["percent_honeycombing"] == 6.0
    assert row["distribution_upper_lower_ratio"] == 0.5 and row["distribution_peripheral_percent"] == 61.0
    assert row["distribution_dominant"] == "basal"
    assert row["input_warnings"] == ("DICOM slices are unevenly spaced | air is -950 HU | "
                                     "lung coverage: lungs cut at the apex")
    assert row["seconds"] == 12.35 and row["status"] == "done"


def test_real_cts_with_a_broken_series_the_others_finish_and_a_rerun_skips_them(dicom_dir, ricord_path, tmp_path):
    """The bundled model on two real CTs (the DICOM series, the RICORD NIfTI) and a
    copy of the series with a truncated slice: about a minute on 2 CPU cores."""
    broken = tmp_path / "broken-series"
    shutil.copytree(dicom_dir, broken)
    cut = sorted(broken.glob("*.dcm"))[12]
    cut.write_bytes(cut.read_bytes()[:4000])
    out = tmp_path / "out"
    args = ["segment", dicom_dir, broken, ricord_path, "--out-dir", out, "--device", "cpu"]
    r = ildseg(*args)
    assert r.returncode == 3, r.stderr
    failed = [line for line in r.stderr.splitlines() if "failed" in line]
    assert len(failed) == 1 and failed[0].startswith("ildseg: case broken-series failed: ") and cut.name in failed[0]
    rows = _summary(out)
    assert list(rows) == ["lung-pet-ct-dx-A0002", "broken-series", "ricord-000082-5mm"]
    assert [r["status"] for r in rows.values()] == ["done", "failed", "done"]
    for case in ("lung-pet-ct-dx-A0002", "ricord-000082-5mm"):
        row = rows[case]
        assert 500 < float(row["lung_volume_ml"]) < 8000  # an adult lung, or the part the scan covers
        assert sum(float(row[f"percent_{c.segment_id}"]) for c in CLASSES) == pytest.approx(100, abs=0.01)
        labels = sitk.ReadImage(str(out / case / "labels.seg.nrrd"))
        report = json.loads((out / case / "report.json").read_text())
        assert list(labels.GetSize()) == report["input"]["size_ijk"]
    assert not (out / "broken-series").exists()

    r = ildseg(*args)
    assert r.returncode == 3 and "3 cases: 0 done, 2 already done (skipped), 1 failed" in r.stdout, r.stderr
    assert [r["status"] for r in _summary(out).values()] == ["skipped", "failed", "skipped"]

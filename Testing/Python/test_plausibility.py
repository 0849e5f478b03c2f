"""Inputs that are not a CT in HU (a label map, a probability map, an MR series, raw
values whose DICOM rescale was lost, a CT windowed to 0..255) are refused with one
line naming what was seen; doubtful ones warn; real CTs, the phantom and the
synthetic test CTs pass without a word. Backs docs/guarantees.md, "Inputs that are
not a CT in HU". The bad inputs are made by transforming a synthetic CT and, where
../shared/data has it, the real DICOM series."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ILDSegmentationLib.commands import cli
from ILDSegmentationLib.imaging.io import read_ct
from ILDSegmentationLib.imaging.plausibility import NotCTInHUError, check_ct_in_hu

from conftest import DATA
from synthetic import random_model, two_lungs

REAL_CTS = ["lung-pet-ct-dx-A0002", "lidc-idri-0001/lidc-idri-0001.nrrd", "lidc-idri-0002/lidc-idri-0002.nrrd",
            "cptac-lscc-c3n-00247/cptac-lscc-c3n-00247.nrrd", "tcga-luad-tcga-17-z013/tcga-luad-tcga-17-z013.nrrd",
            "tcga-luad-tcga-17-z015/tcga-luad-tcga-17-z015.nrrd", "ricord-000082/ricord-000082-5mm.nii.gz"]


def _hu():
    hu, mask = two_lungs()
    return hu, mask


# name -> (array made from the synthetic CT, words the one-line error must hold)
def _bad_inputs():
    hu, mask = _hu()
    labels = np.where(mask > 0, 1 + (np.arange(hu.size).reshape(hu.shape) % 6), 0).astype(np.uint8)
    return {
        "label_map_0_1": (mask.astype(np.uint8), ["only the values 0 and 1", "a label map, not a CT in HU"]),
        "label_map_0_to_6": (labels, ["7 distinct values", "a label map"]),
        "probability_map": (np.clip((hu.astype(np.float32) + 1024) / 2048, 0, 1),
                            ["probability map", "not a CT in HU"]),
        "divided_by_1000": (hu.astype(np.float32) / 1000, ["normalized or rescaled image", "not a CT in HU"]),
        "windowed_0_255": (np.clip((hu.astype(np.float32) + 1000) / 1400 * 255, 0, 255).astype(np.uint8),
                           ["8-bit picture", "windowed", "not a CT in HU"]),
        "rescale_lost": ((hu.astype(np.int32) + 1024).astype(np.uint16),
                         ["no value below 0", "DICOM rescale", "was lost", "not a CT in HU"]),
    }


BAD = _bad_inputs()


def _write(path: Path, array: np.ndarray) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return random_model(tmp_path_factory.mktemp("model")).path


def _segment(capsys, ct: Path, out: Path, model: Path, *extra: str):
    rc = cli.main(["segment", str(ct), "-o", str(out), "--model", str(model), "--device", "cpu", "--quiet", *extra])
    return rc, capsys.readouterr().err


def _assert_refused(rc: int, err: str, words, out: Path) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("ildseg: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("kind", sorted(BAD))
def test_input_that_is_not_a_ct_in_hu_is_refused_with_one_line(kind, model_path, tmp_path, capsys):
    array, words = BAD[kind]
    ct = _write(tmp_path / "ct.nrrd", array)
    out = tmp_path / "labels.nrrd"
    rc, err = _segment(capsys, ct, out, model_path, "--report", str(tmp_path / "r.json"))
    _assert_refused(rc, err, words + ["ct.nrrd"], out)
    assert not (tmp_path / "r.json").exists()


def _patched_series(src: Path, dst: Path, old: bytes, new: bytes) -> Path:
    """The real DICOM series with one element's bytes replaced in every file (same length)."""
    assert len(old) == len(new)
    dst.mkdir()
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        assert old in data, f.name
        (dst / f.name).write_bytes(data.replace(old, new, 1))
    return dst


def test_mr_dicom_series_is_refused_by_its_modality(dicom_dir, model_path, tmp_path, capsys):
    series = _patched_series(dicom_dir, tmp_path / "mr", b"\x08\x00\x60\x00CS\x02\x00CT", b"\x08\x00\x60\x00CS\x02\x00MR")
    assert read_ct(series).modality == "MR"
    out = tmp_path / "labels.nrrd"
    rc, err = _segment(capsys, series, out, model_path)
    _assert_refused(rc, err, ["Modality MR", "magnetic resonance", "not CT"], out)


def test_real_dicom_series_whose_rescale_was_lost_is_refused(dicom_dir, model_path, tmp_path, capsys):
    """RescaleIntercept -1024 -> 0: the stored values 0..4095 come through as they are."""
    series = _patched_series(dicom_dir, tmp_path / "raw", b"\x28\x00\x52\x10DS\x06\x00-1024 ",
                             b"\x28\x00\x52\x10DS\x06\x000     ")
    assert read_ct(series).array.min() >= 0
    out = tmp_path / "labels.nrrd"
    rc, err = _segment(capsys, series, out, model_path)
    _assert_refused(rc, err, ["no value below 0", "air near", "RescaleIntercept", "was lost"], out)


@pytest.mark.parametrize("name", REAL_CTS)
def test_real_cts_pass_without_a_warning(name, caplog):
    path = DATA / name
    if not path.exists():
        pytest.skip(f"real CT not available at {path} (set ILDSEG_TEST_DATA to the shared data folder)")
    ct = read_ct(path)
    record = check_ct_in_hu(ct.array, path.name, ct.modality)
    assert record["warnings"] == []
    assert -1100 < record["air_peak_hu"] < -900 and -150 < record["soft_tissue_peak_hu"] < 100
    if path.is_dir():
        assert record["modality"] == "CT" and "DICOM Modality" in record["checks"]


def test_phantom_and_synthetic_test_cts_pass_without_a_warning():
    from ILDSegmentationLib.simulation.phantom import make_chest_phantom
    from training_data import make_case
    assert check_ct_in_hu(make_chest_phantom().hu, "phantom")["warnings"] == []
    for shape in [(5, 80, 112), (4, 64, 88), (3, 48, 64), (2, 200, 200)]:
        assert check_ct_in_hu(two_lungs(*shape)[0], "two_lungs")["warnings"] == []
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        hu, _, _ = make_case(Path(d) / "case", seed=0)
        assert check_ct_in_hu(hu, "training case")["warnings"] == []


def test_report_says_what_was_checked(model_path, tmp_path, capsys):
    hu, mask = _hu()
    ct, m = _write(tmp_path / "ct.nrrd", hu), _write(tmp_path / "mask.nrrd", mask)
    rc, err = _segment(capsys, ct, tmp_path / "labels.nrrd", model_path, "--lung-mask", str(m),
                       "--report", str(tmp_path / "r.json"))
    assert rc == 0 and "almost no" not in err, err
    check = json.loads((tmp_path / "r.json").read_text())["input"]["hu_check"]
    assert check["warnings"] == [] and check["modality"] is None
    assert check["checks"] == ["value range", "distinct values", "air/lung and soft-tissue peaks of the histogram"]
    assert check["value_range"] == [float(hu.min()), float(hu.max())]
    assert -900 < check["air_peak_hu"] < -700 and 0 < check["soft_tissue_peak_hu"] < 80


def test_doubtful_ct_is_segmented_with_a_warning(model_path, tmp_path):
    """A CT clipped to a soft-tissue window (-160..240 HU) has no air: segmented, but said
    (run as a user runs it, to see what the terminal shows)."""
    hu, mask = _hu()
    ct = _write(tmp_path / "ct.nrrd", np.clip(hu, -160, 240))
    m = _write(tmp_path / "mask.nrrd", mask)
    proc = subprocess.run([sys.executable, "-m", "ILDSegmentationLib", "segment", str(ct), "-o",
                           str(tmp_path / "labels.nrrd"), "--model", str(model_path), "--device", "cpu",
                           "--lung-mask", str(m), "--report", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ildseg: WARNING: the CT ct.nrrd has almost no air or lung" in proc.stderr
    check = json.loads((tmp_path / "r.json").read_text())["input"]["hu_check"]
    assert len(check["warnings"]) == 1 and "almost no air or lung" in check["warnings"][0]


def test_unknown_dicom_modality_warns_and_certain_ones_refuse():
    hu, _ = _hu()
    assert check_ct_in_hu(hu, "x", "CT")["warnings"] == []
    assert "Modality 'OT'" in check_ct_in_hu(hu, "x", "OT")["warnings"][0]
    for modality in ("MR", "PT", "SEG"):
        with pytest.raises(NotCTInHUError, match=f"Modality {modality}"):
            check_ct_in_hu(hu, "x", modality)


def test_training_and_evaluation_refuse_a_label_map_given_as_the_ct(model_path, tmp_path, capsys):
    from training_data import make_manifest
    manifest = make_manifest(tmp_path / "cases", 2, shape=(3, 48, 64))
    shutil.copy(tmp_path / "cases" / "case1" / "mask.nrrd", tmp_path / "cases" / "case1" / "ct.nrrd")
    rc = cli.main(["evaluate", "--manifest", str(manifest), "--model", str(model_path), "--device", "cpu",
                   "--quiet"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert "case 'case1' (manifest line 3)" in lines[0] and "a label map, not a CT in HU" in lines[0]
    rc = cli.main(["train", "--manifest", str(manifest), "--out", str(tmp_path / "run"), "--val-fraction", "0.5",
                   "--epochs", "1", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "case 'case1'" in err and "a label map" in err, err


def test_warnings_are_logged(caplog):
    hu, _ = _hu()
    from ILDSegmentationLib.imaging.io import Volume, check_ct_plausible
    from ILDSegmentationLib.imaging.geometry import Geometry
    image = sitk.GetImageFromArray(np.clip(hu, -160, 240))
    with caplog.at_level(logging.WARNING):
        record = check_ct_plausible(Volume(np.clip(hu, -160, 240), Geometry.from_sitk(image), image), "soft.nrrd")
    assert record["warnings"] and any("almost no air" in r.getMessage() for r in caplog.records)


def test_simulate_refuses_a_label_map_as_its_ct_and_writes_nothing(tmp_path, capsys):
    """Patterns inserted into something that is not a CT in HU would make training
    cases of nonsense: `ildseg simulate` refuses it like `segment` does."""
    array, words = BAD["label_map_0_1"]
    ct = _write(tmp_path / "mask_as_ct.nrrd", array)
    out = tmp_path / "cases"
    rc = cli.main(["simulate", "--ct", str(ct), "--out", str(out)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("ildseg: error: "), lines
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out.exists() or not any(out.iterdir())

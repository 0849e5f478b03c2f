"""Is this scan suitable? (ILDSegmentationLib.analysis.suitability): each input check on
synthetic chests with a known answer, the DICOM tags of a real series, and real CTs
of ../shared/data through the library and the ildseg command (skipped with the
reason when that folder is absent)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ILDSegmentationLib.imaging.geometry import Geometry
from ILDSegmentationLib.analysis.suitability import _contrast, input_checks, kernel_sharpness, warning_lines
from test_simulate import synthetic_chest

CHECKS = ["slice_thickness", "reconstruction_kernel", "contrast", "patient_position", "lung_coverage", "pixel_size",
          "noise"]


def check(checks, name):
    return next(c for c in checks if c["check"] == name)


@pytest.fixture(scope="module")
def chest():
    """HU, identity geometry (1.4 x 1.4 x 5 mm), lung mask (whole lungs inside the scan)."""
    return synthetic_chest(spacing=(1.4, 1.4, 5.0))


def test_every_check_once_in_order_and_a_clean_synthetic_scan(chest):
    hu, geometry, mask = chest
    thin = Geometry((1.4, 1.4, 1.5), geometry.origin)
    checks = input_checks(hu, mask, thin, model_pixel_range=(0.75, 1.5))
    assert [c["check"] for c in checks] == CHECKS
    assert all(set(c) == {"check", "status", "detail"} for c in checks)
    assert [c["check"] for c in checks if c["status"] == "warning"] == [], checks
    assert "no DICOM tags" in check(checks, "reconstruction_kernel")["detail"]
    assert "whole lung" in check(checks, "lung_coverage")["detail"]


def test_thick_slices_warn(chest):
    hu, geometry, mask = chest
    c = check(input_checks(hu, mask, geometry), "slice_thickness")
    assert c["status"] == "warning" and c["detail"].startswith("5 mm slices")
    c = check(input_checks(hu, mask, Geometry((1.4, 1.4, 3.0))), "slice_thickness")
    assert c["status"] == "ok"  # 3 mm: the limit itself is accepted


def test_lungs_cut_at_the_ends_warn(chest):
    hu, geometry, mask = chest
    middle = slice(6, -6)  # the lungs reach further than this
    c = check(input_checks(hu[middle], mask[middle], geometry), "lung_coverage")
    assert c["status"] == "warning" and "apex" in c["detail"] and "base" in c["detail"]


def test_noise_warns_above_the_limit(chest):
    hu, geometry, mask = chest
    noisy = hu + np.random.default_rng(1).normal(0, 200, hu.shape).astype(np.int16)
    assert check(input_checks(hu, mask, geometry), "noise")["status"] == "ok"
    c = check(input_checks(noisy, mask, geometry), "noise")
    assert c["status"] == "warning" and "HU noise" in c["detail"]


def test_pixel_size_against_the_model_range(chest):
    hu, geometry, mask = chest  # 1.4 mm pixels
    assert check(input_checks(hu, mask, geometry, model_pixel_range=(0.75, 1.5)), "pixel_size")["status"] == "ok"
    resampled = check(input_checks(hu, mask, geometry, model_pixel_range=(0.75, 1.0), network_pixel_mm=(1.0, 1.0)),
                      "pixel_size")
    assert resampled["status"] == "ok" and "resampled to 1 x 1 mm" in resampled["detail"]
    native = check(input_checks(hu, mask, geometry, model_pixel_range=(0.75, 1.0), network_pixel_mm=(1.4, 1.4)),
                   "pixel_size")
    assert native["status"] == "warning" and "native" in native["detail"]
    far = check(input_checks(hu, mask, geometry, model_pixel_range=(0.4, 0.6), network_pixel_mm=(0.6, 0.6)),
                "pixel_size")
    assert far["status"] == "warning"


def _with_gradient(hu, mask, posterior_denser: bool):
    """The lung 60 HU denser in its posterior (or anterior) half, as gravity makes it."""
    out = hu.astype(np.float32).copy()
    rows = np.arange(hu.shape[1])[None, :, None]
    middle = np.median(np.nonzero(mask)[1])
    back = np.broadcast_to(rows > middle if posterior_denser else rows < middle, hu.shape)  # J runs A -> P here
    out[(mask > 0) & back] += 60
    return out.astype(np.int16)


def test_position_from_the_lung_gravity_gradient_follows_the_geometry(chest):
    hu, geometry, mask = chest
    supine = _with_gradient(hu, mask, posterior_denser=True)
    c = check(input_checks(supine, mask, geometry), "patient_position")
    assert c["status"] == "ok" and "denser posteriorly" in c["detail"] and "supine" in c["detail"]
    prone_like = _with_gradient(hu, mask, posterior_denser=False)
    c = check(input_checks(prone_like, mask, geometry), "patient_position")
    assert c["status"] == "warning" and "prone" in c["detail"] and "denser anteriorly" in c["detail"]
    # The supine scan stored as a prone DICOM series stores it (I -> right, J -> anterior):
    # still posterior-denser, because anterior/posterior come from the direction.
    stored = supine[:, ::-1, ::-1]
    prone_geometry = Geometry(geometry.spacing, geometry.origin, (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    c = check(input_checks(stored, mask[:, ::-1, ::-1], prone_geometry), "patient_position")
    assert c["status"] == "ok" and "denser posteriorly" in c["detail"]
    # ... which a wrong (identity) direction would have read as anterior-denser.
    c = check(input_checks(stored, mask[:, ::-1, ::-1], geometry), "patient_position")
    assert "denser anteriorly" in c["detail"]


def test_kernel_table():
    assert kernel_sharpness("B70f") == "sharp" and kernel_sharpness("Br59d") == "sharp"
    assert kernel_sharpness("B40f") == "medium" and kernel_sharpness("B30f") == "smooth"
    assert kernel_sharpness("LUNG") == "sharp" and kernel_sharpness("BONEPLUS") == "sharp"
    assert kernel_sharpness("STANDARD") == "smooth" and kernel_sharpness("SOFT") == "smooth"
    assert kernel_sharpness("FC52") == "sharp" and kernel_sharpness("FC13") == "smooth"
    assert kernel_sharpness("YA") == "sharp" and kernel_sharpness("B") == "smooth"
    assert kernel_sharpness("B70f\\ORIGINAL") == "sharp"
    assert kernel_sharpness("MYSTERY") is None and kernel_sharpness("") is None


def test_contrast_from_tags():
    assert _contrast({})["status"] == "ok"
    assert _contrast({"contrast_agent": "OMNIPAQUE 350", "contrast_route": "IV"})["status"] == "warning"
    assert _contrast({"contrast_agent": "NONE"})["status"] == "ok"
    assert _contrast({"series_description": "Thorax C+ 1.0 B70f"})["status"] == "warning"
    assert _contrast({"series_description": "CHEST NON-CONTRAST HRCT"})["status"] == "ok"
    assert _contrast({"manufacturer": "GE"})["detail"] == "no contrast agent recorded"


def test_one_slice_is_checked_not_refused():
    hu, geometry, mask = synthetic_chest(height_mm=60.0)
    k = hu.shape[0] // 2
    checks = input_checks(hu[k], mask[k], Geometry((1.4, 1.4, 1.0)))
    assert [c["check"] for c in checks] == CHECKS
    assert check(checks, "slice_thickness")["detail"].startswith("one slice")


def test_warning_lines():
    report = {"input_checks": [{"check": "slice_thickness", "status": "warning", "detail": "8 mm slices"},
                               {"check": "noise", "status": "ok", "detail": "12 HU"}]}
    assert warning_lines(report) == ["slice thickness: 8 mm slices"]
    assert warning_lines({}) == []


# ---------------------------------------------------------------- real CTs


def test_real_dicom_series_tags(dicom_dir):
    """Lung-PET-CT-Dx A0002: 8 mm slices, Siemens B40f, HFS, base below the last slice."""
    from ILDSegmentationLib.imaging.io import read_ct
    from ILDSegmentationLib.imaging.lungmask import compute_lung_mask
    ct = read_ct(dicom_dir)
    checks = input_checks(ct.array, compute_lung_mask(ct.array, ct.geometry), ct.geometry,
                          dicom_files=ct.dicom_files, model_pixel_range=(0.75, 1.0), network_pixel_mm=(0.75, 0.75))
    thickness = check(checks, "slice_thickness")
    assert thickness["status"] == "warning" and "8 mm slices (DICOM SliceThickness)" in thickness["detail"]
    kernel = check(checks, "reconstruction_kernel")
    assert kernel["status"] == "warning" and "B40f" in kernel["detail"] and "medium" in kernel["detail"]
    position = check(checks, "patient_position")
    assert position["status"] == "ok" and "supine (HFS)" in position["detail"]
    assert "denser posteriorly" in position["detail"]  # the gravity gradient agrees with the tag
    assert check(checks, "contrast")["status"] == "ok"
    coverage = check(checks, "lung_coverage")
    assert coverage["status"] == "warning" and "base" in coverage["detail"]


def test_real_thin_slice_ct_has_no_thickness_warning():
    from conftest import DATA
    path = DATA / "lidc-idri-0001" / "lidc-idri-0001.nrrd"
    if not path.is_file():
        pytest.skip(f"real CT not available at {path} (set ILDSEG_TEST_DATA to the shared data folder)")
    from ILDSegmentationLib.imaging.io import read_ct
    ct = read_ct(path)
    hu = np.asarray(ct.array)
    rough_lung = (hu > -1000) & (hu < -500)  # enough for the checks of thickness and noise
    checks = input_checks(hu, rough_lung, ct.geometry)
    assert check(checks, "slice_thickness") == {
        "check": "slice_thickness", "status": "ok",
        "detail": "2.5 mm slices (the slice spacing; the file records no thickness); the paper's HRCT had 1-2 mm"}
    assert check(checks, "noise")["status"] == "ok"


def test_cli_on_a_real_5mm_ct_warns_and_still_segments(ricord_path, tmp_path):
    from synthetic import random_model
    model = random_model(tmp_path).path
    r = subprocess.run([sys.executable, "-m", "ILDSegmentationLib", "segment", str(ricord_path), "--model", str(model),
                        "--device", "cpu", "--pixel-spacing", "native", "-o", str(tmp_path / "labels.nrrd"),
                        "--report", str(tmp_path / "report.json")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "input check: slice thickness: 5 mm slices" in r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert check(report["input_checks"], "slice_thickness")["status"] == "warning"
    assert check(report["input_checks"], "lung_coverage")["status"] == "ok"
    assert "records no training range" in check(report["input_checks"], "pixel_size")["detail"]  # a test model
    for c in report["classes"]:  # the regions add up on the real CT's labels too
        assert sum(next(k["voxels"] for k in g["classes"] if k["label"] == c["label"])
                   for g in report["regions"]) == c["voxels"]

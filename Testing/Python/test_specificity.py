"""The specificity benchmark's bookkeeping (bench/specificity.py), on
the synthetic chest phantom: no model, no real CT."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ILDSegmentationLib.errors import InputError
from ILDSegmentationLib.imaging.geometry import canonical_view
from ILDSegmentationLib.simulation.phantom import make_chest_phantom
from conftest import load_bench_script

specificity = load_bench_script("specificity")
HILAR_MM, REGIONS, SUBPLEURAL_MM = specificity.HILAR_MM, specificity.REGIONS, specificity.SUBPLEURAL_MM
main, measure, regions = specificity.main, specificity.measure, specificity.regions


@pytest.fixture(scope="module")
def phantom():
    return make_chest_phantom(seed=3, size=128, n_slices=30, spacing=(2.8, 2.8, 10.0))


def _random_labels(lung: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.zeros(lung.shape, np.uint8)
    labels[lung] = rng.choice(np.arange(1, 7), size=int(lung.sum()), p=[0.7, 0.06, 0.06, 0.06, 0.06, 0.06])
    return labels


def test_region_shares_add_up_to_the_non_healthy_share_exactly(phantom):
    lung = phantom.lung_labels > 0
    labels = _random_labels(lung)
    f = measure(labels, phantom.lung_labels, phantom.geometry)
    assert f["measured_voxels"] == np.count_nonzero(lung)
    assert f["non_healthy_voxels"] == np.count_nonzero(labels[lung] != 1)
    assert sum(r["non_healthy_voxels"] for r in f["regions"].values()) == f["non_healthy_voxels"]
    assert sum(r["lung_voxels"] for r in f["regions"].values()) == f["measured_voxels"]
    assert sum(r["non_healthy_percent"] for r in f["regions"].values()) == pytest.approx(f["non_healthy_percent"], abs=1e-9)
    assert sum(c["voxels"] for c in f["classes"].values()) == f["measured_voxels"]
    assert sum(c["percent"] for c in f["classes"].values()) == pytest.approx(100.0, abs=1e-9)
    json.dumps(f)  # the figures go into the --json report as they are
    for name, r in f["regions"].items():  # per class within a region, too
        assert sum(r["by_class_voxels"].values()) == r["non_healthy_voxels"], name
        assert r["non_healthy_percent_of_region"] == pytest.approx(100.0 * r["non_healthy_voxels"] / r["lung_voxels"])
    # Every region is there on a whole chest, and none is most of the lung by itself
    # except "elsewhere".
    shares = {k: f["regions"][k]["lung_percent"] for k in REGIONS}
    assert all(v > 1.0 for v in shares.values()), shares


def test_regions_follow_their_definitions(phantom):
    lung = phantom.lung_labels > 0
    geometry = phantom.geometry
    region = regions(phantom.lung_labels, geometry)
    assert np.all((region >= 0) == lung)
    view = canonical_view(geometry)
    reg_c, lung_c = view.to_canonical(region), view.to_canonical(lung)
    slices = np.flatnonzero(lung_c.any(axis=(1, 2)))
    height = slices[-1] - slices[0] + 1
    basal_z = np.flatnonzero((reg_c == 0).any(axis=(1, 2)))
    # Basal subpleural only in the lowest third (canonical slices run head to feet),
    # hilar only above it.
    assert basal_z.min() >= slices[-1] + 1 - height / 3
    assert np.flatnonzero((reg_c == 1).any(axis=(1, 2))).max() < slices[-1] + 1 - height / 3
    _, row_mm, col_mm = view.canonical_spacing(geometry)
    from scipy import ndimage
    # The lungs' hull holds the lung, so a voxel within 10 mm of the hull's edge is
    # within 10 mm of the lung's edge: deep basal lung is not subpleural; and hilar
    # lung is within 20 mm of something that is not lung (the mediastinum).
    for z in slices:
        to_edge = ndimage.distance_transform_edt(lung_c[z], sampling=(row_mm, col_mm))
        assert np.all(to_edge[reg_c[z] == 0] <= SUBPLEURAL_MM + 1e-6)
        assert np.all(to_edge[reg_c[z] == 1] <= HILAR_MM + 1e-6)
    # Hilar voxels lie near the middle: closer to the midline than any lateral
    # voxel of elsewhere on the same slice, give or take the 20 mm band.
    mid = lung_c.shape[2] / 2
    for z in np.flatnonzero((reg_c == 1).any(axis=(1, 2))):
        hilar_off = np.abs(np.nonzero(reg_c[z] == 1)[1] - mid) * col_mm
        lung_off = np.abs(np.nonzero(lung_c[z])[1] - mid) * col_mm
        assert np.median(hilar_off) < np.median(lung_off)
    assert SUBPLEURAL_MM == 10.0 and HILAR_MM == 20.0  # the figures BENCHMARKS.md states


def test_tumour_voxels_are_left_out_of_every_figure(phantom):
    lung = phantom.lung_labels > 0
    labels = _random_labels(lung, seed=1)
    tumour = np.zeros(lung.shape, bool)
    z, y, x = (np.array(np.nonzero(lung)).mean(axis=1)).astype(int)
    tumour[z - 2:z + 3, y - 8:y + 8, x - 8:x + 8] = True
    in_lung = tumour & lung
    assert in_lung.any()
    labels[in_lung] = 4  # a tumour called consolidation
    f = measure(labels, lung, phantom.geometry, tumour)
    assert f["measured_voxels"] == np.count_nonzero(lung) - np.count_nonzero(in_lung)
    assert f["classes"]["Cons"]["voxels"] == np.count_nonzero(labels[lung & ~tumour] == 4)
    assert f["tumour_ml_left_out"] == pytest.approx(np.count_nonzero(in_lung) * phantom.geometry.voxel_volume_ml, abs=0.06)
    assert sum(r["non_healthy_voxels"] for r in f["regions"].values()) == f["non_healthy_voxels"]


def test_all_healthy_meets_the_goal_and_bad_input_is_refused(phantom):
    lung = phantom.lung_labels > 0
    f = measure(lung.astype(np.uint8), lung, phantom.geometry)
    assert f["non_healthy_voxels"] == 0 and f["classes"]["H"]["percent"] == 100.0
    assert all(f["meets_goal"].values())
    with pytest.raises(InputError, match="differ in shape"):
        measure(lung[:-1].astype(np.uint8), lung, phantom.geometry)
    with pytest.raises(InputError, match="no lung"):
        measure(np.zeros_like(lung, np.uint8), np.zeros_like(lung), phantom.geometry)


def test_region_montage_is_written(phantom, tmp_path):
    from PIL import Image
    render_regions = specificity.render_regions
    region = regions(phantom.lung_labels, phantom.geometry)
    out = render_regions(phantom.hu, region, phantom.geometry, tmp_path / "r.png", title="phantom")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 200


def test_command_line_errors_are_one_line(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("specificity: error: data folder") and "\n" not in err
    assert main(["--data", str(tmp_path), "--ct", "nothing-here"]) == 2
    err = capsys.readouterr().err.strip()
    assert "CT folder not found" in err and "\n" not in err
    (tmp_path / "empty-ct").mkdir()
    assert main(["--data", str(tmp_path), "--ct", "empty-ct", "--model", str(tmp_path / "none.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("specificity: error:") and "\n" not in err

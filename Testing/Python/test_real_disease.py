"""bench/real_disease.py and bench/pattern_stats.py: the JPEG -> HU mapping on a
made-up slice whose tissues are known, the metric bookkeeping, the MedSeg reader's
orientation, and (when ../shared/data is there) the real MedSeg slices."""
from __future__ import annotations


import numpy as np
import pytest
from conftest import DATA, load_bench_script

MEDSEG = DATA / "medseg-covid-slices"


rd = load_bench_script("real_disease")


def _made_up_slice(level=-450.0, width=1400.0, seed=0, soft_hu=40.0):
    """A chest-like slice in HU and its 8-bit display: fat ring, soft tissue, two
    lungs, a trachea, air outside; Gaussian noise of 12 HU."""
    rng = np.random.default_rng(seed)
    n = 360
    yy, xx = np.mgrid[:n, :n]
    hu = np.full((n, n), -1000.0)
    body = ((yy - 180) / 150) ** 2 + ((xx - 180) / 175) ** 2 < 1
    inner = ((yy - 180) / 128) ** 2 + ((xx - 180) / 153) ** 2 < 1
    hu[body] = -100.0  # subcutaneous fat
    hu[inner] = soft_hu  # muscle, mediastinum
    for cx in (110, 250):
        lung = ((yy - 185) / 95) ** 2 + ((xx - cx) / 55) ** 2 < 1
        hu[lung] = -850.0
    hu[(yy - 120) ** 2 + (xx - 180) ** 2 < 9 ** 2] = -1000.0  # trachea
    hu += rng.normal(0, 12, hu.shape)
    lo = level - width / 2
    grey = np.clip(np.round((hu - lo) / width * 255), 0, 255).astype(np.uint8)
    return hu, grey, (width / 255, lo)


def test_hu_mapping_recovers_known_tissues():
    _, grey, (slope, intercept) = _made_up_slice()
    m = rd.estimate_hu_mapping(grey)
    assert m.method == "air+fat+soft tissue", m.notes
    for hu in (-1000.0, -600.0, -100.0, 40.0):
        g = (hu - intercept) / slope
        assert abs(m.slope * g + m.intercept - hu) < 10, (hu, m)
    assert m.residual_hu is not None and m.residual_hu < 10
    assert abs(m.window[0] - (-450)) < 15 and abs(m.window[1] - 1400) < 40
    assert m.uncertainty_hu["-600"] > 0


def test_hu_mapping_other_window():
    _, grey, (slope, intercept) = _made_up_slice(level=-550, width=1600, seed=3)
    m = rd.estimate_hu_mapping(grey)
    assert m.method
    for hu in (-1000.0, -500.0, 40.0):
        g = (hu - intercept) / slope
        assert abs(m.slope * g + m.intercept - hu) < 12


def test_saturated_soft_tissue_takes_the_sets_slope():
    # Window L -600 W 1000 ends at -100 HU: fat and soft tissue both saturate.
    _, good, _ = _made_up_slice()
    _, saturated, (slope, intercept) = _made_up_slice(level=-600, width=1000, seed=1)
    maps = [rd.estimate_hu_mapping(good), rd.estimate_hu_mapping(saturated)]
    assert maps[0].method and not maps[1].method
    assert "saturated" in " ".join(maps[1].notes)
    summary = rd.complete_mappings(maps)
    assert maps[1].method == "air+set median slope"
    assert summary["methods"] == {"air+fat+soft tissue": 1, "air+set median slope": 1}
    # Air is right; the slope is the other slice's (1400 / 255 instead of 1000 / 255).
    assert abs(maps[1].slope * ((-1000 - intercept) / slope) + maps[1].intercept + 1000) < 10


def test_confusion_counts_bookkeeping():
    truth = np.array([[1, 1, 1, 2], [2, 0, 0, 0]])
    pred = np.array([[2, 2, 5, 4], [1, 1, 3, 0]])
    lung = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], bool)
    c = rd.ConfusionCounts()
    c.add(truth, pred, lung)
    assert c.correct_share(1) == pytest.approx(2 / 3)
    assert c.correct_share(2) == pytest.approx(1 / 2)
    shares = c.shares(2)
    assert shares["Consolidation"] == pytest.approx(0.5) and shares["Healthy"] == pytest.approx(0.5)
    assert sum(c.shares(1).values()) == pytest.approx(1)
    s = c.summary()
    assert s["GGO"]["pixels"] == 3 and s["Consolidation"]["pixels"] == 2
    assert s["unlabelled_lung"]["pixels"] == 2  # the pixel outside the lung is not counted
    assert s["unlabelled_lung"]["labels_given"]["Micronodules"] == pytest.approx(0.5)
    # A labelled pixel outside the lung mask still counts (the label is lung).
    c2 = rd.ConfusionCounts()
    c2.add(np.array([[1]]), np.array([[0]]), np.array([[False]]))
    assert c2.shares(1)["outside"] == 1.0


def test_reader_transposes_and_pairs(tmp_path):
    from PIL import Image
    folder = tmp_path / rd.SETS["TestingSet"]
    (folder / "Imgs").mkdir(parents=True)
    (folder / "GT").mkdir()
    img = np.zeros((30, 40), np.uint8)
    img[:, :5] = 255  # the file's left edge (anterior) ...
    gt = np.zeros((30, 40), np.uint8)
    gt[25:, 10:12] = 2
    Image.fromarray(img).save(folder / "Imgs" / "3.jpg", quality=100)
    Image.fromarray(gt).save(folder / "GT" / "3.png")
    Image.fromarray(img).save(folder / "Imgs" / "4.jpg")  # no label: skipped
    (s,) = rd.read_medseg_set(tmp_path, "TestingSet")
    assert s.grey.shape == (40, 30) and s.truth.shape == (40, 30)
    assert s.grey[:5].mean() > 200 and s.grey[10:].mean() < 20  # ... is the top row (anterior up)
    assert (s.truth == 2).sum() == 10 and s.truth[10:12, 25:].all()


def test_pattern_stats_on_a_made_up_region():
    ps = load_bench_script("pattern_stats")
    rng = np.random.default_rng(0)
    hu = np.full((80, 80), -850.0) + rng.normal(0, 20, (80, 80))
    region = np.zeros((80, 80), bool)
    region[20:60, 20:60] = True
    hu[region] = -600 + rng.normal(0, 20, region.sum())
    st = ps.RegionStats()
    st.add(hu, region, ~region, 0.7)
    s = st.summary()
    assert abs(s["p50"] + 600) < 5
    assert 15 < s["local_sd"] < 25
    assert abs(s["rms_diff_1"] - 20 * np.sqrt(2)) < 3  # independent pixels
    assert abs(s["edge_step"] - 250) < 10
    assert s["edge_width_mm"] < 1.0  # a one-pixel step: sharp
    # A blurred edge is wider.
    blurred = ps.RegionStats()
    from scipy import ndimage
    blurred.add(ndimage.gaussian_filter(hu, 2.0), region, ~region, 0.7)
    assert blurred.summary()["edge_width_mm"] > s["edge_width_mm"] + 1


# --------------------------------------------------------------------------- real data
@pytest.fixture
def medseg():
    if not (MEDSEG / rd.SETS["TestingSet"] / "Imgs").is_dir():
        pytest.skip(f"MedSeg slices not available at {MEDSEG} (set ILDSEG_TEST_DATA to the shared data folder)")
    return MEDSEG


def test_real_medseg_mapping_and_lung(medseg):
    slices = rd.read_medseg_set(medseg, "TestingSet")
    assert len(slices) == 48
    maps = [rd.estimate_hu_mapping(s.grey) for s in slices]
    summary = rd.complete_mappings(maps)
    assert summary["own_lines"] >= 24  # at least half the slices find air and soft tissue
    assert 1000 < summary["window_width_hu_median"] < 1800
    assert -600 < summary["window_level_hu_median"] < -300
    # Labelled GGO lies between aerated lung and soft tissue on the mapped scale.
    ggo = np.concatenate([m.to_hu(s.grey)[s.truth == 1] for s, m in zip(slices, maps)])
    assert -800 < np.median(ggo) < -400
    s, m = next((s, m) for s, m in zip(slices, maps) if s.name == "21")
    auto, why = rd.lung_mask_of_slice(m.to_hu(s.grey), rd.DEFAULT_SPACING_MM)
    assert auto is not None, why
    assert (auto & (s.truth == 1)).sum() > 0.8 * (s.truth == 1).sum()


def test_real_medseg_evaluation_runs(medseg, default_model):
    slices = rd.read_medseg_set(medseg, "TestingSet")[:2]
    maps = [rd.estimate_hu_mapping(s.grey) for s in slices]
    rd.complete_mappings(maps)
    res = rd.evaluate_medseg(default_model, slices, maps, rd.DEFAULT_SPACING_MM)
    assert res["GGO"]["pixels"] == sum(int((s.truth == 1).sum()) for s in slices)
    assert sum(res["GGO"]["labels_given"].values()) == pytest.approx(1, abs=1e-3)  # shares rounded to 4 places
    assert res["GGO"]["labels_given"]["outside"] == 0  # labelled pixels are always segmented
    assert len(res["per_slice"]) == 2

"""bench/medseg_finetune.py: the sparse painting that stands in for a radiologist's
brush, and the cases it writes from the MedSeg TrainingSet."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from conftest import load_bench_script

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "medseg-covid-slices"


mf = load_bench_script("medseg_finetune")


def test_painted_disks_lie_inside_the_region_and_apart():
    region = np.zeros((120, 160), bool)
    region[10:110, 10:150] = True
    region[40:80, 60:100] = False  # a hole the brush must avoid
    painted = mf.paint_regions(region, 3, 5.0, np.random.default_rng(0))
    assert painted.any() and not (painted & ~region).any()
    labels, n = ndimage.label(painted)
    assert n == 3
    centres = np.array(ndimage.center_of_mass(painted, labels, range(1, n + 1)))
    gaps = [np.hypot(*(a - b)) for i, a in enumerate(centres) for b in centres[i + 1:]]
    assert min(gaps) >= 4 * 5.0 - 1
    # A region thinner than the brush gets no paint rather than paint outside it.
    thin = np.zeros((50, 50), bool)
    thin[20:24, 5:45] = True
    assert not mf.paint_regions(thin, 3, 5.0, np.random.default_rng(0)).any()


def test_healthy_paint_keeps_away_from_the_radiologists_labels():
    truth = np.zeros((200, 200), np.uint8)
    truth[80:120, 80:120] = 1
    truth[20:40, 150:180] = 2
    lung = np.zeros_like(truth, bool)
    lung[10:190, 10:190] = True
    ann = mf.sparse_annotation(truth, lung, 0.7, 3, 3.5, 10.0, np.random.default_rng(1))
    assert set(np.unique(ann)) == {0, mf.HEALTHY, mf.GGO, mf.CONSOLIDATION}
    assert (truth[ann == mf.GGO] == 1).all() and (truth[ann == mf.CONSOLIDATION] == 2).all()
    distance_mm = ndimage.distance_transform_edt(truth == 0) * 0.7
    assert distance_mm[ann == mf.HEALTHY].min() >= 10.0
    assert (ann > 0).sum() < 0.2 * lung.sum()  # sparse


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/medseg-covid-slices (MedSeg research data)")
def test_prepare_writes_sparse_cases_the_training_cli_reads(tmp_path):
    from ILDSegmentationLib.engine.preprocessing import INTENSITY_PRESETS
    from ILDSegmentationLib.training.dataset import load_case_crops
    from ILDSegmentationLib.training.manifest import read_manifest
    summary = mf.prepare(DATA, tmp_path, 0.7, 3, 3.5, 10.0, seed=0)
    assert summary["cases"] >= 45  # of the 50 TrainingSet slices
    # A few regions per slice: a small share of what the radiologist outlined.
    assert 0 < summary["painted_share_of_radiologist_pixels"]["GGO"] < 0.05
    assert 0 < summary["painted_share_of_radiologist_pixels"]["Consolidation"] < 0.05
    cases = read_manifest(summary["manifest"])
    crops = load_case_crops(cases[0], INTENSITY_PRESETS["hu1000"])
    assert crops and all(c.pixel_spacing_mm == (0.7, 0.7) for c in crops)

"""ildseg simulate --followup (issue 27 item 2): a baseline and a follow-up with a known
answer, written for users, on real CC BY CT (tcga-luad-tcga-17-z015, six 5 mm slices
from its middle to keep the simulator fast). truth.json is checked against the label
maps written beside it, counted here voxel by voxel. Skips with the reason without the data."""
from __future__ import annotations

import json
import shlex

import numpy as np
import pytest

from conftest import DATA, _need

sitk = pytest.importorskip("SimpleITK")

from ILDSegmentationLib.classes import CLASSES  # noqa: E402
from ILDSegmentationLib.commands.cli import main  # noqa: E402

Z015 = DATA / "tcga-luad-tcga-17-z015" / "tcga-luad-tcga-17-z015.nrrd"
FILES = ["baseline.nrrd", "baseline_lung_mask.nrrd", "baseline_truth.nrrd", "followup.nrrd", "followup_lung_mask.nrrd",
         "followup_truth.nrrd", "followup_truth_on_baseline.nrrd", "truth.json"]


@pytest.fixture(scope="module")
def slab(tmp_path_factory):
    from ILDSegmentationLib.simulation.followup import moved_scan, shifted_grid
    full = sitk.ReadImage(str(_need(Z015)))
    first = (full.GetSize()[2] - 6) // 2 + 6  # six slices of the lower lung, where fibrosis goes
    ct = moved_scan(full, shifted_grid(full, 0.0, first, 6), sitk.Transform())[0]
    path = tmp_path_factory.mktemp("followup") / "slab.nrrd"
    sitk.WriteImage(ct, str(path), True)
    return path


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _percent(labels):
    """Percent of the lung (every non-zero voxel) per class 1..6, and Ret + HC."""
    counts = np.bincount(labels.ravel(), minlength=7)[1:7].astype(float)
    percent = 100.0 * counts / counts.sum()
    return percent, percent[4] + percent[5]


def _check_figures(figures, baseline, followup):
    """The figures of truth.json (fibrotic_extent, classes) against two label maps."""
    (b, fb), (f, ff) = _percent(baseline), _percent(followup)
    fe = figures["fibrotic_extent"]
    assert fe["baseline"] == pytest.approx(fb, abs=1e-3) and fe["followup"] == pytest.approx(ff, abs=1e-3)
    assert fe["change"] == pytest.approx(ff - fb, abs=2e-3)
    assert [c["label"] for c in figures["classes"]] == [c.label for c in CLASSES]
    for c, pb, pf in zip(figures["classes"], b, f):
        assert c["baseline_percent"] == pytest.approx(pb, abs=1e-3)
        assert c["followup_percent"] == pytest.approx(pf, abs=1e-3)
        assert c["change_percent_points"] == pytest.approx(pf - pb, abs=2e-3)


@pytest.fixture(scope="module")
def moved(slab):
    out = slab.parent / "moved"
    assert main(["simulate", "--ct", str(slab), "--out", str(out), "--followup", "moved", "--seed", "2",
                 "--motion-degrees", "1.5", "-1", "2", "--motion-shift", "2", "3", "-2", "--inspiration", "0.98",
                 "--slice-phase", "0.25", "--quiet"]) == 0
    return out


def test_moved_writes_the_pair_and_its_truth_is_no_change(moved):
    assert sorted(p.name for p in moved.iterdir()) == FILES  # nothing staged left
    truth = json.loads((moved / "truth.json").read_text())
    assert truth["kind"] == "moved" and truth["seed"] == 2
    base, follow = _read(moved / "baseline_truth.nrrd"), _read(moved / "followup_truth.nrrd")
    unmoved = _read(moved / "followup_truth_on_baseline.nrrd")
    assert np.array_equal(unmoved, base)  # the disease did not change
    assert truth["fibrotic_extent"]["baseline"] > 0  # simulated fibrosis to follow
    _check_figures(truth, base, unmoved)
    assert truth["fibrotic_extent"]["change"] == 0
    assert all(c["change_percent_points"] == 0 for c in truth["classes"])
    # As ildseg compare would measure the truth, each on its own grid: resampled, not equal.
    _check_figures(truth["on_each_grid"], base, follow)
    assert not np.array_equal(follow, base)


def test_the_follow_up_is_the_baseline_seen_through_the_recorded_motion(moved):
    """truth.json's motion is the one applied: the baseline's truth and lung mask, moved
    with it, are the follow-up's; the follow-up's grid is a quarter slice along K."""
    from ILDSegmentationLib.simulation.followup import motion, moved_labels, shifted_grid
    m = json.loads((moved / "truth.json").read_text())["motion"]
    assert (m["degrees"], m["shift_mm"], m["inspiration_scale"], m["slice_phase"]) == \
        ([1.5, -1.0, 2.0], [2.0, 3.0, -2.0], 0.98, 0.25)
    base_ct = sitk.ReadImage(str(moved / "baseline.nrrd"))
    follow_ct = sitk.ReadImage(str(moved / "followup.nrrd"))
    t = motion(base_ct, m["degrees"], m["shift_mm"], (m["inspiration_scale"],) * 3)
    grid = shifted_grid(base_ct, m["slice_phase"])
    assert np.allclose(follow_ct.GetOrigin(), grid.GetOrigin()) and follow_ct.GetSize() == base_ct.GetSize()
    assert np.allclose(np.subtract(follow_ct.GetOrigin(), base_ct.GetOrigin()),
                       [0, 0, 0.25 * base_ct.GetSpacing()[2]])
    for base_name, follow_name in (("baseline_truth", "followup_truth"), ("baseline_lung_mask", "followup_lung_mask")):
        again = moved_labels(_read(moved / f"{base_name}.nrrd"), base_ct, grid, t)
        assert np.array_equal(again, _read(moved / f"{follow_name}.nrrd")), follow_name
    # The CTs hold HU, the lung on the lung mask.
    hu = sitk.GetArrayFromImage(base_ct)
    lung = _read(moved / "baseline_lung_mask.nrrd")
    assert set(np.unique(lung).tolist()) == {0, 1, 2}
    assert np.median(hu[lung > 0]) < -500 < np.median(hu[lung == 0])
    assert np.array_equal(lung > 0, _read(moved / "baseline_truth.nrrd") > 0)


def test_progressed_adds_fibrosis_and_prints_the_compare_command(slab, capsys):
    out = slab.parent / "progressed"
    capsys.readouterr()
    assert main(["simulate", "--ct", str(slab), "--out", str(out), "--followup", "progressed"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert sorted(p.name for p in out.iterdir()) == FILES
    truth = json.loads((out / "truth.json").read_text())
    base, unmoved = _read(out / "baseline_truth.nrrd"), _read(out / "followup_truth_on_baseline.nrrd")
    _check_figures(truth, base, unmoved)
    _check_figures(truth["on_each_grid"], base, _read(out / "followup_truth.nrrd"))
    assert truth["fibrotic_extent"]["change"] > 0
    # Only fibrosis was added: where the truths differ, the follow-up is reticulation or honeycombing.
    differ = base != unmoved
    assert differ.any() and set(np.unique(unmoved[differ]).tolist()) <= {5, 6}
    assert (base > 0).sum() == (unmoved > 0).sum()  # the same lung
    # The defaults of the motion, and the command to run, printed last and recorded.
    assert truth["motion"]["degrees"] == [2.0, 1.0, 3.0] and truth["motion"]["slice_phase"] == 0.5
    command = shlex.split(printed[-1])
    assert printed[-1] == truth["compare_command"]
    assert command[:2] == ["ildseg", "compare"] and command[2:4] == [str(out / "baseline.nrrd"), str(out / "followup.nrrd")]
    assert command[4:] == ["--out", str(out / "compare")]


@pytest.mark.parametrize("options, message", [
    (["--followup", "moved", "--inspiration", "2"], "--inspiration must be a scale from 0.8 to 1.25"),
    (["--followup", "moved", "--slice-phase", "1"], "--slice-phase must be a fraction"),
    (["--followup", "progressed", "--motion-degrees", "40", "0", "0"], "--motion-degrees 40 is out of range"),
    (["--followup", "moved", "--motion-shift", "0", "nan", "0"], "--motion-shift nan is out of range"),
    (["--motion-shift", "1", "1", "1"], "add --followup moved|progressed"),
])
def test_bad_motion_options_are_one_line_and_write_nothing(tmp_path, capsys, options, message):
    ct = tmp_path / "ct.nrrd"
    sitk.WriteImage(sitk.Image([8, 8, 4], sitk.sitkInt16), str(ct))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["simulate", "--ct", str(ct), "--out", str(out), *options]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ildseg: error: ") and message in err[0], err
    assert not out.exists()

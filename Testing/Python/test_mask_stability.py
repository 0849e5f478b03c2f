"""bench/mask_stability.py (labels kept under a changed lung mask) and the crop box it
chose (cropping.crop_boxes_aerated, Inferer(crop_box="aerated")): the measurement's
bookkeeping on cases whose answer is known, and the box's independence of the mask's
drawn border on a synthetic slice whose lung border is known."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import load_bench_script
from synthetic import random_model, two_lungs

from ILDSegmentationLib.engine.cropping import (AERATED_REACH_PX, CROP_MARGIN, MASK_CONTEXT_PX, crop_boxes,
                                                crop_boxes_aerated)
from ILDSegmentationLib.imaging.lungsides import split_left_right


ms = load_bench_script("mask_stability")


# -- the measurement --------------------------------------------------------------
def test_perturb_is_in_plane_and_of_the_asked_size():
    mask = np.zeros((3, 41, 41), bool)
    mask[1, 20, 20] = True
    d = ms.perturb(mask, "dilate", 3)
    assert not d[0].any() and not d[2].any()  # in-plane only: no slice gains lung
    assert d[1].sum() == 29  # a disk of radius 3: 29 pixels
    assert d[1, 20, 23] and not d[1, 20, 24] and not d[1, 23, 23]
    square = np.zeros((1, 41, 41), bool)
    square[0, 10:31, 10:31] = True
    e = ms.perturb(square, "erode", 3)
    assert np.array_equal(np.argwhere(e[0]).min(0), [13, 13]) and np.array_equal(np.argwhere(e[0]).max(0), [27, 27])
    assert e.sum() == 15 * 15
    # A lung cut by the image's edge is not eroded from the edge.
    edge = np.zeros((1, 20, 20), bool)
    edge[0, :, :10] = True
    assert ms.perturb(edge, "erode", 2)[0, 0, :8].all()
    # Smoothing keeps a large disk (to a pixel) and removes a speck.
    yy, xx = np.mgrid[:81, :81]
    big = ((yy - 40) ** 2 + (xx - 40) ** 2 <= 30 ** 2)[None]
    speck = big.copy()
    speck[0, 2, 2] = True
    s = ms.perturb(speck, "smooth", 2.0)
    assert not s[0, 2, 2]
    assert (s != big).sum() < 0.02 * big.sum()
    with pytest.raises(ValueError):
        ms.perturb(big, "shift", 1)


def test_agreement_counts_kept_labels_per_reference_class():
    ref = np.zeros((1, 10, 10), np.uint8)
    ref[0, :, :5] = 1  # 50 healthy
    ref[0, :, 5:] = 2  # 50 ground glass
    region = ref > 0
    same = ms.agreement(ref, ref.copy(), region)
    assert same["percent"] == 100.0 and same["voxels"] == 100
    assert same["classes"]["H"]["percent"] == 100.0 and same["classes"]["GGO"]["percent"] == 100.0
    assert same["classes"]["HC"] == {"voxels": 0, "kept": 0, "percent": None}
    new = ref.copy()
    new[0, :2, 5:] = 5  # 10 of the 50 ground glass become reticulation
    a = ms.agreement(ref, new, region)
    assert a["percent"] == 90.0
    assert a["classes"]["GGO"]["percent"] == 80.0 and a["classes"]["H"]["percent"] == 100.0
    assert a["classes"]["Ret"]["voxels"] == 0  # per class of the reference, not of the new run
    # Outside the compared region nothing counts.
    assert ms.agreement(ref, new, region & (ref == 1))["percent"] == 100.0
    pooled = ms.pooled([a, same])
    assert pooled["voxels"] == 200 and pooled["percent"] == 95.0 and pooled["classes"]["GGO"]["percent"] == 90.0


def test_compared_region_is_where_both_masks_label():
    mask = np.zeros((1, 30, 30), bool)
    mask[0, 5:25, 5:25] = True
    dilated, eroded = ms.perturb(mask, "dilate", 3), ms.perturb(mask, "erode", 3)
    assert np.array_equal(ms.compared_region(mask, dilated), mask)
    assert np.array_equal(ms.compared_region(mask, eroded), eroded)


def test_goal_is_judged_on_classes_with_enough_voxels():
    def result(overall, classes):
        return {"percent": overall, "classes": {k: {"voxels": n, "kept": 0, "percent": p}
                                                for k, (p, n) in classes.items()}}
    ok = ms.meets_goal(result(99.2, {"H": (99.5, 10000), "GGO": (96.0, 800), "HC": (50.0, 100)}))
    assert ok["met"] and ok["classes_not_judged"] == ["HC"]
    low = ms.meets_goal(result(99.2, {"H": (99.5, 10000), "GGO": (94.9, 800)}))
    assert not low["met"] and low["classes_failing"] == ["GGO"]
    assert not ms.meets_goal(result(98.9, {"H": (99.5, 10000)}))["met"]


def test_pick_slices_spreads_over_the_lung_and_skips_its_ends():
    lung = np.zeros((40, 4, 4), bool)
    lung[10:31, 1:3, 1:3] = True
    picked = ms.pick_slices(lung, 5)
    assert picked[0] == 11 and picked[-1] == 29 and len(picked) == 5
    assert len(ms.pick_slices(lung, 100)) == 19  # never more slices than the lung has


# -- the aerated crop box -----------------------------------------------------------
def _slice(rows=200, cols=260, air=-850.0):
    """One slice in HU: soft tissue (+40) with two elliptic aerated lungs and an
    airway (a disk of air) 5 pixels medial of the right lung; returns (hu, lung)."""
    yy, xx = np.mgrid[:rows, :cols]
    lung = np.zeros((rows, cols), bool)
    for cx in (0.3 * cols, 0.7 * cols):
        lung |= ((yy - rows / 2) / (0.3 * rows)) ** 2 + ((xx - cx) / (0.15 * cols)) ** 2 < 1
    hu = np.full((rows, cols), 40.0)
    hu[lung] = air
    right_edge = int(np.flatnonzero(lung[:, : cols // 2].any(axis=0))[-1])
    hu[(yy - rows // 2) ** 2 + (xx - (right_edge + 5 + 8)) ** 2 <= 8 ** 2] = -1000.0  # airway lumen
    return hu, lung


def test_aerated_box_is_the_papers_box_for_a_mask_of_the_aerated_lung():
    hu, lung = _slice()
    sides = split_left_right(lung[None])[0]
    assert crop_boxes_aerated(sides, hu, 0) == crop_boxes(sides, 0)


@pytest.mark.parametrize("change", [("dilate", 1), ("dilate", 3), ("dilate", 6), ("erode", 1), ("erode", 3),
                                    ("erode", 6), ("smooth", 2.0)])
def test_aerated_box_does_not_move_with_the_masks_border(change):
    hu, lung = _slice()
    changed = ms.perturb(lung[None], *change)[0]
    sides, sides_changed = split_left_right(lung[None])[0], split_left_right(changed[None])[0]
    paper, paper_changed = crop_boxes(sides, 0), crop_boxes(sides_changed, 0)
    if change[0] != "smooth":
        assert paper != paper_changed  # the paper's box moves with the border ...
    assert crop_boxes_aerated(sides_changed, hu, 0) == crop_boxes_aerated(sides, hu, 0)  # ... this one does not
    # A 6-px dilation reaches across the airway's wall: the airway lies mostly outside
    # the mask, so it is not taken for lung.
    assert change != ("dilate", 6) or (changed & (hu == -1000)).any()


def test_aerated_box_holds_a_mask_reaching_far_beyond_the_aerated_lung():
    hu, lung = _slice(rows=300)
    mask = lung.copy()
    # Dense disease (not aerated) that the mask includes, 40 px above the right lung's top.
    top = int(np.flatnonzero(lung[:, :130].any(axis=1))[0])
    assert top - 40 - MASK_CONTEXT_PX > 0
    mask[top - 40: top + 5, 60:80] = True
    hu[top - 40: top, 60:80] = 20.0
    sides = split_left_right(mask[None])[0]
    right = [b for b in crop_boxes_aerated(sides, hu, 0) if b.side == 1][0]
    assert right.r0 == top - 40 - MASK_CONTEXT_PX  # the mask with some context, not the aerated box
    paper = [b for b in crop_boxes(sides, 0) if b.side == 1][0]
    assert (right.r1, right.c0, right.c1) == (paper.r1, paper.c0, paper.c1)
    # A mask whose lung holds no air at all on the slice gets the paper's box.
    assert crop_boxes_aerated(sides, np.full_like(hu, 40.0), 0) == crop_boxes(sides, 0)
    assert CROP_MARGIN > MASK_CONTEXT_PX and AERATED_REACH_PX >= 6


# -- the measurement end to end, with a model ------------------------------------------
def test_measurement_sees_the_papers_box_move_and_not_the_aerated_one(tmp_path):
    """On a synthetic CT (lungs in soft tissue, nothing at the image's edge), a changed
    mask border changes a random model's labels with the paper's box and leaves them
    all with the aerated box: the measurement can fail, and the fix holds."""
    from ILDSegmentationLib.engine.inference import Inferer
    from ILDSegmentationLib.imaging.geometry import Geometry
    hu, mask = two_lungs(n_slices=3, rows=220, cols=300)
    model = random_model(tmp_path)
    inferers = {p: [Inferer(model, device="cpu", crop_box=p)] for p in ("mask", "aerated")}
    # Identity direction: canonical slice index = K reversed; slice K=1 is canonical 1.
    out = ms.run_ct(hu, mask > 0, Geometry(spacing=(0.8, 0.8, 2.5)), [1], inferers)
    assert out["lung_voxels_measured"] == int((mask[1] > 0).sum())
    for name in ("dilate3", "erode3", "dilate6"):
        assert out["policies"]["aerated"]["perturbations"][name]["percent"] == 100.0, name
    assert out["policies"]["mask"]["perturbations"]["dilate3"]["percent"] < 100.0
    # On a mask of the aerated lung, both boxes are the same: the same labels.
    assert out["policies"]["aerated"]["vs_mask"]["percent"] == 100.0


def test_inferer_refuses_an_unknown_crop_box(tmp_path):
    from ILDSegmentationLib.engine.inference import Inferer
    with pytest.raises(ValueError, match="crop_box"):
        Inferer(random_model(tmp_path), device="cpu", crop_box="convex")


def test_segment_command_takes_the_crop_box_and_reports_it(tmp_path):
    """`ildseg segment --crop-box aerated` runs and says so in the report; an unknown
    choice is one line and exit 2, with no output written."""
    import json
    import subprocess

    import SimpleITK as sitk

    from ILDSegmentationLib.engine.cropping import CROP_BOX_CHOICES
    hu, mask = two_lungs(n_slices=3, rows=96, cols=128)
    for name, arr in (("ct.nrrd", hu), ("lung.nrrd", mask)):
        image = sitk.GetImageFromArray(arr)
        image.SetSpacing((0.8, 0.8, 2.5))
        sitk.WriteImage(image, str(tmp_path / name))
    model = random_model(tmp_path)

    def ildseg(*args):
        return subprocess.run([sys.executable, "-m", "ILDSegmentationLib", *map(str, args)], capture_output=True,
                              text=True, timeout=600)
    common = ("segment", tmp_path / "ct.nrrd", "--lung-mask", tmp_path / "lung.nrrd", "--model", model.path,
              "--device", "cpu", "--quiet")
    for choice in CROP_BOX_CHOICES:
        r = ildseg(*common, "-o", tmp_path / f"labels-{choice}.nrrd", "--report", tmp_path / f"{choice}.json",
                   "--crop-box", choice)
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path / f"{choice}.json").read_text())["crop_box"] == choice
    bad = ildseg(*common, "-o", tmp_path / "bad.nrrd", "--crop-box", "convex")
    assert bad.returncode == 2 and "--crop-box" in bad.stderr
    assert not (tmp_path / "bad.nrrd").exists()


def test_runs_of_one_ct_each_pool_voxel_by_voxel(tmp_path, capsys):
    """--from-json pools CTs measured in separate (short) runs, weighting by voxels."""
    import json

    def case(kept, n):
        ref = np.ones((1, 1, n), np.uint8)
        new = ref.copy()
        new[0, 0, kept:] = 2
        a = ms.agreement(ref, new, ref > 0)
        return {"policies": {"mask": {"seconds": 1.0, "vs_mask": ms.agreement(ref, ref, ref > 0),
                                      "perturbations": {name: a for name, _, _ in ms.PERTURBATIONS}}}}
    for name, kept, n in (("a", 99, 100), ("b", 280, 300)):
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"settings": {"policies": ["mask"]}, "model": {"sha256": "x"}, "cases": {name: case(kept, n)}}))
    out = tmp_path / "pooled.json"
    assert ms.main(["--from-json", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json", str(out)]) == 0
    pooled = json.loads(out.read_text())["summary"]["mask"]["perturbations"]["dilate3"]
    assert pooled["voxels"] == 400 and pooled["percent"] == pytest.approx(100 * 379 / 400)
    assert "| a |" in capsys.readouterr().out
    assert ms.main(["--from-json", str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 2  # a CT twice

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ILDSegmentationLib.classes import CLASSES
from ILDSegmentationLib.errors import InputError
from ILDSegmentationLib.engine.modelfile import load_model
from ILDSegmentationLib.engine.preprocessing import INTENSITY_PRESETS
from ILDSegmentationLib.training.annotations import read_annotation
from ILDSegmentationLib.training.dataset import Crop, crops_from_arrays, dihedral, load_case_crops
from ILDSegmentationLib.training.loss import class_weights, entropy_scale, ild_loss
from ILDSegmentationLib.training.manifest import read_manifest, write_manifest
from ILDSegmentationLib.training.metrics import confusion_matrix, summarize
from ILDSegmentationLib.training.split import distribution_entropy, hill_climb_split, mean_fold_entropy
from ILDSegmentationLib.training.trainer import TrainConfig, Trainer

from training_data import make_case, make_manifest


# -- loss ------------------------------------------------------------------------------

def test_class_weights_inverse_to_counts_and_average_one():
    w = class_weights(np.array([10, 30, 0, 60, 0, 0])).numpy()
    assert w[2] == w[4] == w[5] == 0
    np.testing.assert_allclose(w[[0, 1, 3]] * [10, 30, 60], w[0] * 10)
    assert w[[0, 1, 3]].mean() == pytest.approx(1.0)


def test_loss_matches_a_hand_computation():
    # Three pixels: annotated class 1, unannotated lung, outside the lung.
    logits = torch.tensor([[0.5, 2.0, -1.0, 0.0, 0.3, 0.1],
                           [1.0, 1.0, 1.0, 0.0, 0.0, -2.0],
                           [9.0, -9.0, 0.0, 0.0, 0.0, 0.0]]).T.reshape(1, 6, 1, 3)
    target = torch.tensor([[[1, -1, -1]]])
    lung = torch.tensor([[[True, True, False]]])
    weights = torch.tensor([1.0, 2.5, 1, 1, 1, 1])
    loss = ild_loss(logits, target, lung, weights, unsupervised_weight=0.1, alpha=0.5)

    def softmax(v):
        e = np.exp(np.asarray(v) - max(v))
        return e / e.sum()
    p0 = softmax([0.5, 2.0, -1.0, 0.0, 0.3, 0.1])
    p1 = softmax([1.0, 1.0, 1.0, 0.0, 0.0, -2.0])
    supervised = -2.5 * math.log(p0[1])
    entropy = -(p1 * np.log(p1)).sum()
    expected = (supervised + 0.5 * 0.1 * entropy) / 2  # two participating pixels
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_pixels_outside_the_lung_take_no_part():
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 4, 4)
    target = torch.full((1, 4, 4), -1)
    target[0, 0, 0] = 2
    lung = torch.zeros(1, 4, 4, dtype=torch.bool)
    lung[0, :2] = True
    w = torch.ones(6)
    before = ild_loss(logits, target, lung, w)
    logits2 = logits.clone()
    logits2[..., 2:, :] = torch.randn(1, 6, 2, 4) * 10
    assert float(ild_loss(logits2, target, lung, w)) == pytest.approx(float(before))
    # Purely supervised: the unannotated pixels stop mattering too.
    logits3 = logits.clone()
    logits3[0, 0, 1, 1] += 5
    assert float(ild_loss(logits3, target, lung, w, 0.0)) == pytest.approx(float(ild_loss(logits, target, lung, w, 0.0)))
    assert float(ild_loss(logits3, target, lung, w, 0.1)) != pytest.approx(float(ild_loss(logits, target, lung, w, 0.1)))


def test_entropy_scaling_options():
    assert entropy_scale(100, 400, "ratio") == 0.25
    assert entropy_scale(100, 400, "none") == 1.0
    with pytest.raises(ValueError):
        entropy_scale(1, 1, "other")


# -- augmentation and crops -------------------------------------------------------------

def test_eight_augmentations_are_distinct_and_shared_by_image_labels_mask():
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    outs = [dihedral(image, k) for k in range(8)]
    assert len({o.tobytes() + bytes(o.shape) for o in outs}) == 8
    target = image.astype(np.int64) * 7
    lung = (image.astype(np.int64) % 3) == 0
    for k in range(8):
        np.testing.assert_array_equal(dihedral(target, k), dihedral(image, k).astype(np.int64) * 7)
        np.testing.assert_array_equal(dihedral(lung, k), (dihedral(image, k).astype(np.int64) % 3) == 0)


def test_crops_only_from_annotated_slices_with_inference_cropping(tmp_path):
    hu, mask, ann = make_case(tmp_path, seed=1)
    ann[1] = 0  # slice 1 has no annotation
    from ILDSegmentationLib.imaging.geometry import Geometry
    crops = crops_from_arrays("c", hu, mask, ann, Geometry((0.8, 0.8, 2.5)), INTENSITY_PRESETS["hu"])
    # Canonical slices run head first: K index k is canonical slice (K - 1 - k).
    slices = {c.slice_index for c in crops}
    assert (hu.shape[0] - 1 - 1) not in slices and len(slices) == int(ann.reshape(4, -1).any(axis=1).sum())
    for c in crops:
        assert c.image.shape == c.target.shape == c.lung.shape
        assert ((c.target >= 0) <= c.lung).all(), "targets only inside the lung"
    # Each crop knows its pixel size, (row, column) of the canonical slice: J, I here.
    crops = crops_from_arrays("c", hu, mask, ann, Geometry((0.9, 0.7, 2.5)), INTENSITY_PRESETS["hu"])
    assert {c.pixel_spacing_mm for c in crops} == {(0.7, 0.9)}


# -- split ------------------------------------------------------------------------------

def test_split_raises_entropy_and_never_splits_a_scan():
    rng = np.random.default_rng(0)
    counts = {f"s{i}": rng.integers(0, 1000, 6) * (rng.random(6) < 0.5) for i in range(15)}
    folds = hill_climb_split(counts, 5, seed=0)
    flat = [c for f in folds for c in f]
    assert sorted(flat) == sorted(counts) and len(flat) == len(set(flat))
    assert all(len(f) == 3 for f in folds)
    start = list(np.random.default_rng(0).permutation(sorted(counts)))
    initial = [start[k::5] for k in range(5)]
    assert mean_fold_entropy(counts, folds) > mean_fold_entropy(counts, initial)
    # A local optimum: no single swap improves it.
    best = mean_fold_entropy(counts, folds)
    for a in range(5):
        for b in range(a + 1, 5):
            for i in range(3):
                for j in range(3):
                    trial = [list(f) for f in folds]
                    trial[a][i], trial[b][j] = trial[b][j], trial[a][i]
                    assert mean_fold_entropy(counts, trial) <= best + 1e-9
    assert distribution_entropy(np.array([1, 1])) == pytest.approx(math.log(2))


# -- metrics ----------------------------------------------------------------------------

def test_balanced_accuracy_and_dice():
    truth = np.array([1, 1, 1, 1, 2, 2, 0, 3])
    pred = np.array([1, 1, 1, 2, 2, 1, 5, 0])  # last: outside the lung mask
    cm = confusion_matrix(truth, pred)
    s = summarize(cm)
    assert s["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert s["per_class_accuracy"]["Micronodules"] is None
    assert s["dice"]["Healthy"] == pytest.approx(2 * 3 / (4 + 4))


# -- annotations and manifests ------------------------------------------------------------

def test_seg_nrrd_annotation_maps_segments_to_classes(tmp_path):
    from ILDSegmentationLib.imaging.segfile import write_segmentation
    hu, mask, ann = make_case(tmp_path, seed=2)
    ct = sitk.ReadImage(str(tmp_path / "ct.nrrd"))
    write_segmentation(ann, ct, tmp_path / "ann.seg.nrrd")
    from ILDSegmentationLib.imaging.geometry import Geometry
    back = read_annotation(tmp_path / "ann.seg.nrrd", Geometry.from_sitk(ct), hu.shape, "case 'x'")
    np.testing.assert_array_equal(back, ann)
    # A Segment Editor file with plain names (no terminology), in another order.
    image = sitk.GetImageFromArray(np.where(ann == 2, 1, np.where(ann == 4, 2, 0)).astype(np.uint8))
    image.CopyInformation(ct)
    for i, (name, value) in enumerate((("ground glass", 1), ("Consolidation", 2))):
        image.SetMetaData(f"Segment{i}_ID", f"Segment_{i}")
        image.SetMetaData(f"Segment{i}_Name", name)
        image.SetMetaData(f"Segment{i}_LabelValue", str(value))
        image.SetMetaData(f"Segment{i}_Layer", "0")
    sitk.WriteImage(image, str(tmp_path / "names.seg.nrrd"))
    back = read_annotation(tmp_path / "names.seg.nrrd", Geometry.from_sitk(ct), hu.shape, "case 'x'")
    np.testing.assert_array_equal(back, np.where(np.isin(ann, (2, 4)), ann, 0))
    # One layer and no Layer keys (other tools write such files): every segment is in it.
    for key in ("Segment0_Layer", "Segment1_Layer"):
        image.EraseMetaData(key)
    sitk.WriteImage(image, str(tmp_path / "nolayer.seg.nrrd"))
    back = read_annotation(tmp_path / "nolayer.seg.nrrd", Geometry.from_sitk(ct), hu.shape, "case 'x'")
    np.testing.assert_array_equal(back, np.where(np.isin(ann, (2, 4)), ann, 0))
    image.SetMetaData("Segment1_Name", "Emphysema")
    sitk.WriteImage(image, str(tmp_path / "bad.seg.nrrd"))
    with pytest.raises(InputError, match="'Emphysema' matches none"):
        read_annotation(tmp_path / "bad.seg.nrrd", Geometry.from_sitk(ct), hu.shape, "case 'x'")
    # A file from Slicer before shared labelmaps: one layer per segment, no Layer keys,
    # every segment's voxels 1 in its own layer (Slicer reads segment i from layer i).
    layers = np.stack([(ann == 2), (ann == 4), (ann == 1)], axis=-1).astype(np.uint8)
    old = sitk.GetImageFromArray(layers, isVector=True)
    old.CopyInformation(ct)
    for i, name in enumerate(("Ground glass opacity", "Consolidation", "Healthy")):
        old.SetMetaData(f"Segment{i}_ID", f"Segment_{i}")
        old.SetMetaData(f"Segment{i}_Name", name)
    sitk.WriteImage(old, str(tmp_path / "old.seg.nrrd"))
    back = read_annotation(tmp_path / "old.seg.nrrd", Geometry.from_sitk(ct), hu.shape, "case 'x'")
    np.testing.assert_array_equal(back, np.where(np.isin(ann, (1, 2, 4)), ann, 0))
    old.SetMetaData("Segment3_ID", "Segment_3")
    old.SetMetaData("Segment3_Name", "Reticulation")
    sitk.WriteImage(old, str(tmp_path / "short.seg.nrrd"))
    with pytest.raises(InputError, match="'Reticulation' is in layer 3, but the file has 3 layers"):
        read_annotation(tmp_path / "short.seg.nrrd", Geometry.from_sitk(ct), hu.shape, "case 'x'")


def test_manifest_saved_by_a_spreadsheet_reads_and_other_encodings_are_named(tmp_path):
    manifest = make_manifest(tmp_path, 2)
    text = manifest.read_text()
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())  # Excel's "CSV UTF-8"
    assert [c.case_id for c in read_manifest(tmp_path / "bom.csv")] == ["case0", "case1"]
    (tmp_path / "latin1.csv").write_bytes(text.replace("case1,", "caf\u00e91,", 1).encode("latin-1"))
    with pytest.raises(InputError, match="latin1.csv, line 3: not UTF-8"):
        read_manifest(tmp_path / "latin1.csv")


def test_bad_manifests_name_the_case_and_line(tmp_path):
    manifest = make_manifest(tmp_path, 2)
    (tmp_path / "bad.csv").write_text("id,image\n")
    with pytest.raises(InputError, match="first line"):
        read_manifest(tmp_path / "bad.csv")
    write_manifest(tmp_path / "missing.csv", [["case0", "case0/ct.nrrd", "auto", "case0/ann.nrrd"],
                                              ["gone", "nowhere/ct.nrrd", "auto", "x.nrrd"]])
    with pytest.raises(InputError, match=r"case 'gone' \(manifest line 3\): CT not found"):
        read_manifest(tmp_path / "missing.csv")
    # Annotation on another grid.
    ann = sitk.ReadImage(str(tmp_path / "case1" / "ann.nrrd"))
    ann.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(ann, str(tmp_path / "case1" / "shifted.nrrd"))
    write_manifest(tmp_path / "geo.csv", [["case1", "case1/ct.nrrd", "case1/mask.nrrd", "case1/shifted.nrrd"]])
    with pytest.raises(InputError, match=r"case 'case1' \(manifest line 2\): annotation geometry"):
        load_case_crops(read_manifest(tmp_path / "geo.csv")[0], INTENSITY_PRESETS["hu"])
    # Unknown label values and an annotation outside the lung.
    arr = sitk.GetArrayFromImage(ann)
    for name, values in (("nine.nrrd", np.where(arr > 0, 9, 0)), ("outside.nrrd", np.zeros_like(arr))):
        if name == "outside.nrrd":
            values[:, :2, :2] = 1  # corner: outside the lung mask
        img = sitk.GetImageFromArray(values.astype(np.uint8))
        img.CopyInformation(sitk.ReadImage(str(tmp_path / "case1" / "ct.nrrd")))
        sitk.WriteImage(img, str(tmp_path / "case1" / name))
    write_manifest(tmp_path / "nine.csv", [["case1", "case1/ct.nrrd", "case1/mask.nrrd", "case1/nine.nrrd"]])
    with pytest.raises(InputError, match=r"case 'case1'.*outside 0..6"):
        load_case_crops(read_manifest(tmp_path / "nine.csv")[0], INTENSITY_PRESETS["hu"])
    write_manifest(tmp_path / "out.csv", [["case1", "case1/ct.nrrd", "case1/mask.nrrd", "case1/outside.nrrd"]])
    with pytest.raises(InputError, match=r"case 'case1'.*no annotated"):
        load_case_crops(read_manifest(tmp_path / "out.csv")[0], INTENSITY_PRESETS["hu"])


# -- the loop ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cases = read_manifest(make_manifest(root, 3, shape=(3, 48, 64)))
    intensity = INTENSITY_PRESETS["hu1000"]
    train = load_case_crops(cases[0], intensity) + load_case_crops(cases[1], intensity)
    return train, load_case_crops(cases[2], intensity)


def _config(**kw):
    base = dict(epochs=4, lr=2e-3, intensity="hu1000", device="cpu", seed=3, batch_size=2)
    base.update(kw)
    return TrainConfig(**base)


def test_short_training_lowers_the_loss_and_beats_chance(crops, tmp_path):
    train, val = crops
    trainer = Trainer(_config(epochs=8), train, val, tmp_path / "run")
    summary = trainer.fit()
    losses = [r.train_loss for r in trainer.history]
    assert losses[-1] < losses[0]
    # Chance is 1/3 (three classes annotated). Measured on this case (seed 3, 2-core CPU):
    # 0.707 as it is (0.66-0.72 over seeds 0-3); 0.31 with labels misregistered with the
    # image (targets mirrored). The one-line breaks of the loss and the crops (entropy
    # term averaged, a swapped, all-ones class weights, training crops without margin)
    # score 0.66-0.69 here, within the seeds' spread, so no threshold on 8 epochs can
    # tell them apart: test_protocol.py pins each of them exactly instead.
    assert summary["validation"]["balanced_accuracy"] >= 0.60
    for name in ("model.safetensors", "checkpoint.safetensors", "log.csv", "summary.json"):
        assert (tmp_path / "run" / name).exists()
    model = load_model(tmp_path / "run" / "model.safetensors")
    assert model.info.trained and model.info.provenance["best_epoch"] == summary["best_epoch"]
    # One epoch numbering for users: counted from 1 in the log, the summary and the file.
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    improved = [int(r["epoch"]) for r in rows if r["best"] == "True"]
    assert summary["best_epoch"] == improved[-1]


@pytest.mark.parametrize("augmentation", ["none", "scanner"])
def test_resume_ends_with_the_same_weights(crops, tmp_path, augmentation):
    train, val = crops
    straight = Trainer(_config(intensity_augmentation=augmentation), train, val, tmp_path / "a")
    straight.fit()
    # "interrupted" after epoch 2
    Trainer(_config(epochs=2, intensity_augmentation=augmentation), train, val, tmp_path / "b").fit()
    resumed = Trainer(_config(intensity_augmentation=augmentation), train, val, tmp_path / "b")
    assert resumed.resume() and resumed.start_epoch == 2
    resumed.fit()
    for k, v in straight.network.state_dict().items():
        assert torch.equal(v, resumed.network.state_dict()[k]), k
    assert [r.val_bacc for r in resumed.history] == [r.val_bacc for r in straight.history]
    with pytest.raises(InputError, match="other settings"):
        Trainer(_config(lr=1e-3, intensity_augmentation=augmentation), train, val, tmp_path / "b").resume()


def test_every_table_ii_preset_trains_one_step(crops, tmp_path):
    from ILDSegmentationLib.engine.network import PRESETS
    train, val = crops
    for preset in PRESETS:
        t = Trainer(_config(preset=preset, epochs=1), train[:2], val[:1], tmp_path / preset)
        start = {k: v.clone() for k, v in t.network.state_dict().items()}
        t.fit()
        assert np.isfinite(t.history[0].train_loss), preset
        # The step moved the weights, and the model file describes the preset's network.
        assert any(not torch.equal(start[k], v) for k, v in t.network.state_dict().items()), preset
        assert load_model(tmp_path / preset / "model.safetensors").info.network == PRESETS[preset], preset
    assert TrainConfig(preset="purely-supervised").unsupervised_weight == 0.0


def test_distributed_training_with_gloo_two_processes(tmp_path):
    """The torchrun + DistributedDataParallel path, on the CPU (gloo backend)."""
    import subprocess
    import sys
    manifest = make_manifest(tmp_path, 2, shape=(2, 48, 64))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "ILDSegmentationLib", "train", "--manifest", str(manifest), "--out", str(tmp_path / "run"),
           "--folds", "2", "--epochs", "2", "--device", "cpu", "--intensity", "hu1000", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                             "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    model = load_model(tmp_path / "run" / "model.safetensors")
    assert model.info.trained and model.info.provenance["epochs_run"] == 2


# -- the optional scanner augmentation ---------------------------------------------------

def test_scanner_variation_adds_the_drawn_noise_and_keeps_the_attenuation():
    from ILDSegmentationLib.training.augment import scanner_variation
    intensity = INTENSITY_PRESETS["hu1000"]
    flat = intensity.apply(np.full((128, 128), -800.0))
    seen, means = set(), []
    for seed in range(30):
        out, p = scanner_variation(flat, intensity, np.random.default_rng(seed))
        seen.add(p["kernel"])
        assert out.dtype == np.float32 and out.shape == flat.shape
        hu = out / intensity.scale
        # A kernel leaves a flat region flat: what remains is exactly the drawn noise.
        assert hu.std() == pytest.approx(p["noise_sd_hu"], rel=1e-3, abs=1e-3), p
        means.append(float(hu.mean()))
    # The mean attenuation (what tells GGO from healthy lung) stays: a crop's mean moves
    # only by its noise's sample mean (standard error under 1 HU here), and not on average.
    assert max(abs(m + 800) for m in means) < 4.0
    assert abs(np.mean(means) + 800) < 0.5
    again, _ = scanner_variation(flat, intensity, np.random.default_rng(29))
    assert np.array_equal(out, again)  # seeded
    assert seen == {"smooth", "sharpen", "as is"}
    assert np.all(flat == np.float32(-0.8))  # the input is never modified


def test_scanner_variation_draws_from_the_documented_ranges():
    """Blur sigma 0.3-0.8 px, sharpening 0.2-0.8, noise 0-25 HU, grain 0.5-1.5 px (the
    module docstring), each range covered."""
    from ILDSegmentationLib.training.augment import scanner_variation
    intensity = INTENSITY_PRESETS["hu1000"]
    flat = np.zeros((16, 16), np.float32)
    drawn = {}
    for seed in range(120):
        _, p = scanner_variation(flat, intensity, np.random.default_rng(seed))
        for key in ("sigma_px", "amount", "noise_sd_hu", "grain_px"):
            if key in p:
                drawn.setdefault(key, []).append(p[key])
    for key, (lo, hi) in (("sigma_px", (0.3, 0.8)), ("amount", (0.2, 0.8)), ("noise_sd_hu", (0.0, 25.0)),
                          ("grain_px", (0.5, 1.5))):
        values = np.array(drawn[key])
        assert lo <= values.min() < lo + 0.1 * (hi - lo) and hi - 0.1 * (hi - lo) < values.max() <= hi, key


def test_scanner_variation_kernels_smooth_and_sharpen_and_stay_in_range():
    from ILDSegmentationLib.training.augment import scanner_variation
    intensity = INTENSITY_PRESETS["hu"]
    texture = np.random.default_rng(0).normal(-700, 100, (96, 96)).astype(np.float32)
    texture[:, :4] = -1024  # at the clip limit: sharpening overshoots must be clipped back
    contrast = {}
    for seed in range(40):
        out, p = scanner_variation(texture, intensity, np.random.default_rng(seed))
        assert out.min() >= -1024 and out.max() <= 3071
        if p["noise_sd_hu"] < 5:  # judge the kernel where little noise was added
            contrast.setdefault(p["kernel"], []).append(float(np.abs(np.diff(out[:, 8:], axis=1)).mean()))
    base = float(np.abs(np.diff(texture[:, 8:], axis=1)).mean())
    assert max(contrast["smooth"]) < base < min(contrast["sharpen"])
    # The clip is in the network's units: with hu1000, -1024 HU is -1.024.
    scaled = INTENSITY_PRESETS["hu1000"]
    edge = scaled.apply(texture)
    for seed in range(10):
        out, _ = scanner_variation(edge, scaled, np.random.default_rng(seed))
        assert out.min() >= np.float32(-1.024) and out.max() <= np.float32(3.071)
        assert (out[:, :4] == np.float32(-1.024)).mean() > 0.2  # noise pushed below the floor is clipped to it


def test_scanner_augmentation_varies_training_crops_per_epoch_not_labels(crops, tmp_path):
    train, val = crops
    with pytest.raises(InputError, match="unknown intensity augmentation 'gamma'"):
        _config(intensity_augmentation="gamma")
    plain = Trainer(_config(), train, val, tmp_path / "plain")
    assert plain._training_crop(0, 1) is train[1]
    assert all(a.image is b.image for a, b in zip(plain.val, val))
    aug = Trainer(_config(intensity_augmentation="scanner"), train, val, tmp_path / "aug")
    e0, e1 = aug._training_crop(0, 1), aug._training_crop(1, 1)
    assert not np.array_equal(e0.image, train[1].image) and not np.array_equal(e0.image, e1.image)
    assert np.array_equal(e0.image, aug._training_crop(0, 1).image)  # seeded: resumable
    assert e0.target is train[1].target and e0.lung is train[1].lung
    # Validation crops carry one fixed variation, the same for every epoch and run.
    again = Trainer(_config(intensity_augmentation="scanner"), train, val, tmp_path / "aug2")
    assert all(np.array_equal(a.image, b.image) for a, b in zip(aug.val, again.val))
    assert not all(np.array_equal(a.image, b.image) for a, b in zip(aug.val, val))
    summary = aug.fit()
    assert np.isfinite(aug.history[-1].train_loss)
    assert load_model(tmp_path / "aug" / "model.safetensors").info.provenance["training"][
        "intensity_augmentation"] == "scanner"
    assert summary["epochs_run"] == 4

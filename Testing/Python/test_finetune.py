"""ildseg finetune: a trained model taught from a few sparse annotations (issue 16)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ILDSegmentationLib.commands.cli import main
from ILDSegmentationLib.engine.modelfile import default_model_path, load_model
from ILDSegmentationLib.engine.preprocessing import INTENSITY_PRESETS
from ILDSegmentationLib.training.dataset import load_case_crops
from ILDSegmentationLib.errors import InputError
from ILDSegmentationLib.training.finetune import (ONE_SCAN_NOTE, REJECTED_MODEL_NAME, StartModelPull,
                                                   distillation_term, hold_out, l2sp_term)
from ILDSegmentationLib.training.manifest import read_manifest
from ILDSegmentationLib.training.trainer import TrainConfig, Trainer
from ILDSegmentationLib.training.validation import validation_metrics

from training_data import make_manifest


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("cases"), 2, shape=(4, 48, 64))


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    from synthetic import random_model
    return random_model(tmp_path_factory.mktemp("start"))  # intensity hu1000


def _crops(manifest):
    cases = read_manifest(manifest)
    return cases, {c.case_id: load_case_crops(c, INTENSITY_PRESETS["hu1000"]) for c in cases}


def test_two_scans_are_held_out_by_whole_scans(manifest):
    """Two scans are enough for a hold-out that says something about the next
    patient: one whole scan is held out, none of its slices trains."""
    cases, crops = _crops(manifest)
    train, val, held = hold_out(cases, crops, 0.25, seed=3)
    assert held.unit == "scans" and len(held.items) == 1 and held.estimates_next_patient
    assert {c.case_id for c in val} == set(held.items)
    assert not {c.case_id for c in train} & set(held.items)
    assert len(train) + len(val) == sum(len(v) for v in crops.values())


def test_four_scans_or_more_are_held_out_by_whole_scans(tmp_path):
    many = make_manifest(tmp_path, 4, shape=(2, 40, 56))
    cases, crops = _crops(many)
    train, val, held = hold_out(cases, crops, 0.25)
    assert held.unit == "scans" and len(held.items) == 1
    assert {c.case_id for c in val} == set(held.items)
    assert not {c.case_id for c in train} & set(held.items)


@pytest.fixture(scope="module")
def one_scan(tmp_path_factory):
    """One case of 24 annotated slices 2.5 mm apart (57.5 mm from first to last)."""
    return make_manifest(tmp_path_factory.mktemp("one"), 1, shape=(24, 40, 56))


@pytest.mark.parametrize("gap_mm", [20.0, 40.0])
def test_one_scan_is_held_out_as_a_slab_with_a_gap(one_scan, gap_mm):
    cases, crops = _crops(one_scan)
    train, val, held = hold_out(cases, crops, 0.25, seed=1, gap_mm=gap_mm)
    assert held.unit == "slab" and held.gap_mm == gap_mm and not held.estimates_next_patient
    z = lambda c: c.slice_index * c.slice_spacing_mm  # noqa: E731
    assert {c.slice_spacing_mm for c in train + val} == {2.5}
    held_z, train_z = {z(c) for c in val}, {z(c) for c in train}
    assert held_z and train_z
    # No held-out slice lies within the gap of a training slice.
    assert min(abs(a - b) for a in held_z for b in train_z) >= gap_mm
    # The slab is a contiguous block of annotated slices at one end of the scan.
    all_slices = sorted({c.slice_index for v in crops.values() for c in v})
    held_slices = sorted({c.slice_index for c in val})
    assert held_slices in (all_slices[:len(held_slices)], all_slices[-len(held_slices):])
    # The slices in the gap are used by neither side, and are named as such.
    unused = set(all_slices) - {c.slice_index for c in train + val}
    assert held.unused == [f"case0:{k}" for k in sorted(unused)]
    assert all(min(abs(k * 2.5 - h) for h in held_z) < gap_mm for k in unused)
    assert held.items == [f"case0:{k}" for k in held_slices]


def test_one_scan_too_thin_for_the_gap_is_refused(one_scan):
    cases, crops = _crops(one_scan)
    with pytest.raises(InputError, match="too little to hold out a slab 60 mm"):
        hold_out(cases, crops, 0.25, gap_mm=60.0)


def test_cases_of_one_scan_are_one_scan(tmp_path):
    """Two cases simulated in one CT share a scan: they are held out as one scan's
    slab, never one case against the other (the same patient on both sides)."""
    from ILDSegmentationLib.training.manifest import write_manifest
    from training_data import make_case
    for n in range(2):
        make_case(tmp_path / f"c{n}", seed=n, shape=(24, 40, 56))
    write_manifest(tmp_path / "m.csv", [[f"c{n}", f"c{n}/ct.nrrd", f"c{n}/mask.nrrd", f"c{n}/ann.nrrd", "ct1"]
                                        for n in range(2)])
    cases, crops = _crops(tmp_path / "m.csv")
    train, val, held = hold_out(cases, crops, 0.25, gap_mm=20.0)
    assert held.unit == "slab"
    assert {c.case_id for c in val} == {c.case_id for c in train} == {"c0", "c1"}
    assert not {c.slice_index for c in val} & {c.slice_index for c in train}


@pytest.mark.parametrize("trainable, learning", [("head", ("head.", "classifier.")),
                                                 ("last", ("head.1.", "classifier."))])
def test_head_training_keeps_the_features_and_validates_as_the_full_network(manifest, start, tmp_path, trainable,
                                                                            learning):
    """trainable "head"/"last": only those layers move, and the validation on cached
    inputs gives what running the whole network gives."""
    cases, crops = _crops(manifest)
    train, val, _ = hold_out(cases, crops, 0.25)
    config = TrainConfig(epochs=2, lr=1e-3, intensity="hu1000", device="cpu", augment=False, trainable=trainable)
    trainer = Trainer(config, train, val, tmp_path / "run")
    trainer.initialize_from(start)
    trainer.fit()
    tuned, before = trainer.network.state_dict(), start.network.state_dict()
    moved = {k for k in before if not torch.equal(tuned[k].cpu(), before[k])}
    assert moved and all(k.startswith(learning) for k in moved), moved
    assert any(k.startswith("classifier.") for k in moved)
    cached = trainer._validate()["confusion_matrix"]
    full = validation_metrics(trainer.network, val, torch.device("cpu"))["confusion_matrix"]
    # Features are cached in float16: a few pixels near a tie may change label.
    diff = np.abs(np.asarray(cached) - np.asarray(full)).sum()
    assert diff <= 0.002 * np.asarray(full).sum(), (cached, full)


def test_head_training_refuses_per_epoch_augmentation():
    with pytest.raises(Exception, match="augmentation off"):
        TrainConfig(intensity="hu1000", trainable="head", augment=True)


def test_finetune_reports_before_and_after_on_held_out_annotations(manifest, start, tmp_path, capsys):
    run = tmp_path / "run"
    # A learning rate this small leaves the weights where they started: "after" must
    # then equal "before", which shows both are measured the same way (--min-gain -1:
    # offered although no better).
    assert main(["finetune", "--manifest", str(manifest), "--out", str(run), "--model", str(start.path),
                 "--epochs", "1", "--lr", "1e-12", "--device", "cpu", "--min-gain", "-1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("finetune: 1 epochs at most")
    assert "no examples of Micronodules, Reticulation, Honeycombing" in out
    assert "WARNING" not in out  # two scans: a held-out scan, no one-scan warning
    report = json.loads((run / "finetune.json").read_text())
    assert report["held_out"]["unit"] == "scans" and report["held_out"]["estimates_next_patient"]
    assert report["kept_start_model"] is False and report["model"] == str(run / "model.safetensors")
    assert report["classes_without_examples"] == ["Micronodules", "Reticulation", "Honeycombing"]
    assert report["annotated_pixels"]["training"]["Consolidation"] > 0
    b, a = report["before"], report["after"]
    assert b["annotated_pixels"] == a["annotated_pixels"] > 0
    assert a["balanced_accuracy"] == pytest.approx(b["balanced_accuracy"], abs=0.01)
    tuned = load_model(run / "model.safetensors")
    assert tuned.info.provenance["initialized_from"]["sha256"] == start.sha256
    assert tuned.info.provenance["finetune"]["train_layers"] == "last"
    assert tuned.info.intensity.name == "hu1000"  # the start model's, without being told


def test_finetune_learns_from_the_annotations(manifest, start, tmp_path):
    run = tmp_path / "run"
    assert main(["finetune", "--manifest", str(manifest), "--out", str(run), "--model", str(start.path),
                 "--epochs", "6", "--lr", "3e-3", "--device", "cpu", "--quiet"]) == 0
    report = json.loads((run / "finetune.json").read_text())
    # A random start labels ~1/3 of three classes right; the classes here differ by
    # 250-800 HU, which the head learns from the random features in a few epochs.
    assert report["after"]["balanced_accuracy"] > report["before"]["balanced_accuracy"] + 0.15, report


@pytest.fixture(scope="module")
def unchanged_run(one_scan, start, tmp_path_factory):
    """A one-scan run that cannot beat its start model: a learning rate of 1e-12 leaves
    the weights (and so the held-out figure) where they started."""
    import contextlib
    import io
    run = tmp_path_factory.mktemp("unchanged") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["finetune", "--manifest", str(one_scan), "--out", str(run), "--model", str(start.path),
                       "--epochs", "1", "--lr", "1e-12", "--device", "cpu", "--slab-gap", "20"])
    return status, run, out.getvalue()


def test_a_run_that_does_not_beat_the_start_model_keeps_it(unchanged_run):
    from ILDSegmentationLib.slicer.trainingset import describe_finetune, list_models
    status, run, out = unchanged_run
    assert status == 4
    report = json.loads((run / "finetune.json").read_text())
    assert report["kept_start_model"] is True and report["model"] is None
    assert report["after"]["balanced_accuracy"] - report["before"]["balanced_accuracy"] < report["min_gain"] == 0.01
    # No model is offered: the panel's list finds none in the run's folder.
    assert not (run / "model.safetensors").exists() and (run / REJECTED_MODEL_NAME).is_file()
    assert list_models(run.parent) == []
    assert "keep using the start model" in out.splitlines()[-2]
    assert describe_finetune(report)[0].startswith("Not better than the start model")


def test_a_one_scan_run_says_its_figure_does_not_estimate_the_next_patient(unchanged_run):
    from ILDSegmentationLib.slicer.trainingset import describe_finetune
    _, run, out = unchanged_run
    assert out.count("WARNING: " + ONE_SCAN_NOTE) == 2  # before training and with the result
    held = json.loads((run / "finetune.json").read_text())["held_out"]
    assert held["unit"] == "slab" and held["estimates_next_patient"] is False and held["note"] == ONE_SCAN_NOTE
    assert "Warning: " + ONE_SCAN_NOTE in describe_finetune({"held_out": held})


def test_distillation_term_is_kl_from_the_start_model_on_the_unpainted_lung():
    rng = np.random.default_rng(0)
    n, c, h, w = 2, 6, 5, 7
    student, teacher = rng.normal(size=(2, n, c, h, w)).astype(np.float32)
    target = np.where(rng.random((n, h, w)) < 0.3, rng.integers(0, c, (n, h, w)), -1)
    lung = rng.random((n, h, w)) < 0.8
    valid = np.ones((n, 1, h, w), np.float32)
    valid[1, :, :, 5:] = 0  # the second crop is padded
    got = distillation_term(*map(torch.from_numpy, (student, teacher, target, lung, valid)))

    def log_softmax(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    logp, logq = log_softmax(student.astype(np.float64)), log_softmax(teacher.astype(np.float64))
    expected = []
    for i in range(n):
        inside = lung[i] & (valid[i, 0] > 0)
        kl = (np.exp(logq[i]) * (logq[i] - logp[i])).sum(axis=0)
        expected.append(kl[inside & (target[i] < 0)].sum() / inside.sum())
    assert float(got) == pytest.approx(np.mean(expected), rel=1e-5)
    # Zero when the model predicts what the start model predicted.
    assert float(distillation_term(*map(torch.from_numpy, (teacher, teacher, target, lung, valid)))) == \
        pytest.approx(0.0, abs=1e-6)


def test_l2sp_term_sums_squared_moves_of_the_learning_weights_only(start):
    import copy
    network = copy.deepcopy(start.network)
    start_weights = {k: v.detach().clone() for k, v in network.named_parameters()}
    for name, p in network.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.01 * torch.randn_like(p))
    expected = sum(((p.detach().numpy().astype(np.float64) - start_weights[n].numpy()) ** 2).sum()
                   for n, p in network.named_parameters() if n.startswith("classifier."))
    assert float(l2sp_term(network, start_weights).detach()) == pytest.approx(expected, rel=1e-5)


def test_start_model_pull_adds_both_terms_with_their_weights(start):
    """StartModelPull = distill_weight * alpha * distillation + l2sp_weight * L2-SP,
    the teacher being the start model run on the same input."""
    import copy
    from ILDSegmentationLib.training.trainer import RegularizerBatch
    student = copy.deepcopy(start.network)
    with torch.no_grad():
        for p in student.classifier.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pull = StartModelPull(start.network, distill_weight=0.7, l2sp_weight=0.3, alpha=0.5)
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(1, 1, 24, 32)).astype(np.float32))
    target = torch.from_numpy(np.where(rng.random((1, 24, 32)) < 0.2, 1, -1))
    lung = torch.ones((1, 24, 32), dtype=torch.bool)
    student.eval()
    logits = student(x)
    got = pull(RegularizerBatch(student, x, None, logits, target, lung, None))
    with torch.no_grad():
        teacher = start.network.eval()(x)
    expected = 0.7 * 0.5 * float(distillation_term(logits, teacher, target, lung).detach()) + \
        0.3 * float(l2sp_term(student, dict(start.network.named_parameters())).detach())
    got = float(got.detach())
    assert got > 0 and got == pytest.approx(expected, rel=1e-5)


def test_trainer_adds_the_regularizer_to_the_loss(manifest, start, tmp_path):
    """The hook adds the term to every step's loss (here a constant: the logged loss
    moves by exactly that much)."""
    cases, crops = _crops(manifest)
    train, val, _ = hold_out(cases, crops, 0.25)
    losses = []
    for extra in (None, lambda batch: torch.tensor(5.0)):
        config = TrainConfig(epochs=1, lr=1e-12, intensity="hu1000", device="cpu", augment=False, trainable="last")
        trainer = Trainer(config, train, val, tmp_path / f"run{len(losses)}", regularizer=extra)
        trainer.initialize_from(start)
        trainer.fit()
        losses.append(trainer.history[0].train_loss)
    assert losses[1] == pytest.approx(losses[0] + 5.0, abs=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--intensity-augmentation", "scanner"], "--train-layers all"),
    (["--distill-weight", "-1"], "--distill-weight"),
    (["--l2sp-weight", "nan"], "--l2sp-weight"),
    (["--min-gain", "inf"], "--min-gain"),
])
def test_finetune_refuses_bad_settings_in_one_line(manifest, start, tmp_path, capsys, args, message):
    assert main(["finetune", "--manifest", str(manifest), "--out", str(tmp_path / "run"),
                 "--model", str(start.path), "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_finetune_never_writes_into_the_bundled_models_folder_or_over_a_run(manifest, start, tmp_path, capsys):
    assert main(["finetune", "--manifest", str(manifest), "--out", str(default_model_path().parent),
                 "--model", str(start.path), "--device", "cpu"]) == 2
    assert "bundled" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "finetune.json").write_text("{}")
    assert main(["finetune", "--manifest", str(manifest), "--out", str(run), "--model", str(start.path),
                 "--device", "cpu"]) == 2
    assert "earlier run" in capsys.readouterr().err
    assert (run / "finetune.json").read_text() == "{}"


def test_one_annotated_slice_cannot_be_split(tmp_path, start, capsys):
    import SimpleITK as sitk
    from training_data import make_case
    from ILDSegmentationLib.training.manifest import write_manifest
    make_case(tmp_path / "c", seed=1, shape=(3, 48, 64))
    ann = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "c" / "ann.nrrd")))
    ann[[0, 2]] = 0  # annotations on the middle slice only
    image = sitk.GetImageFromArray(ann)
    image.CopyInformation(sitk.ReadImage(str(tmp_path / "c" / "ct.nrrd")))
    sitk.WriteImage(image, str(tmp_path / "c" / "ann.nrrd"))
    write_manifest(tmp_path / "one.csv", [["c", "c/ct.nrrd", "c/mask.nrrd", "c/ann.nrrd"]])
    assert main(["finetune", "--manifest", str(tmp_path / "one.csv"), "--out", str(tmp_path / "run"),
                 "--model", str(start.path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "at least two slices" in err and len(err.strip().splitlines()) == 1

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
from ILDSegmentationLib.training.finetune import hold_out
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


def test_few_scans_are_held_out_by_whole_slices_of_every_scan(manifest):
    cases, crops = _crops(manifest)
    train, val, held = hold_out(cases, crops, 0.25, seed=3)
    assert held.unit == "slices"
    key = lambda c: (c.case_id, c.slice_index)  # noqa: E731
    # Every crop on exactly one side; both lungs of a slice on the same side.
    assert sorted(map(key, train + val)) == sorted(key(c) for v in crops.values() for c in v)
    assert not {key(c) for c in train} & {key(c) for c in val}
    # Every scan gives some slices to each side.
    assert {c.case_id for c in train} == {c.case_id for c in val} == {"case0", "case1"}
    assert sorted(held.items) == sorted({f"{c.case_id}:{c.slice_index}" for c in val})


def test_four_scans_or_more_are_held_out_by_whole_scans(tmp_path):
    many = make_manifest(tmp_path, 4, shape=(2, 40, 56))
    cases, crops = _crops(many)
    train, val, held = hold_out(cases, crops, 0.25)
    assert held.unit == "scans" and len(held.items) == 1
    assert {c.case_id for c in val} == set(held.items)
    assert not {c.case_id for c in train} & set(held.items)


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
    # then equal "before", which shows both are measured the same way.
    assert main(["finetune", "--manifest", str(manifest), "--out", str(run), "--model", str(start.path),
                 "--epochs", "1", "--lr", "1e-12", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("finetune: 1 epochs at most")
    assert "no examples of Micronodules, Reticulation, Honeycombing" in out
    report = json.loads((run / "finetune.json").read_text())
    assert report["held_out"]["unit"] == "slices"
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


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--intensity-augmentation", "scanner"], "--train-layers all"),
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

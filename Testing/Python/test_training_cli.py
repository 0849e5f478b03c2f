"""ildseg split | train | evaluate | simulate, end to end as a user runs them."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from ILDSegmentationLib.commands.cli import main
from ILDSegmentationLib.engine.modelfile import load_model

from permissions import assert_normal_modes, files_in, umask
from training_data import make_manifest


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("cases"), 4, shape=(3, 48, 64))


def test_split_writes_folds_and_prints_the_class_distribution(manifest, tmp_path, capsys):
    with umask(0o027):
        assert main(["split", "--manifest", str(manifest), "--folds", "2", "--out", str(tmp_path / "folds.json")]) == 0
    assert_normal_modes([tmp_path / "folds.json"], 0o640)
    folds = json.loads((tmp_path / "folds.json").read_text())["folds"]
    assert sorted(c for f in folds for c in f["cases"]) == ["case0", "case1", "case2", "case3"]
    assert "fold 0" in capsys.readouterr().out
    assert main(["split", "--manifest", str(manifest), "--folds", "9", "--out", str(tmp_path / "f.json")]) == 2


def test_split_keeps_a_scan_together_and_train_uses_the_same_folds(manifest, tmp_path, capsys):
    """Cases of one scan (e.g. simulated in one CT) never sit on both sides; 'split' and
    'train' with the same --folds and --seed make the same folds, and 'train --split'
    takes them from the file."""
    rows = list(csv.reader(open(manifest)))
    grouped = tmp_path / "grouped.csv"
    with open(grouped, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(rows[0] + ["scan"])
        for r, scan in zip(rows[1:], ("A", "A", "B", "C")):
            w.writerow([r[0], *(str(manifest.parent / v) for v in r[1:]), scan])
    for seed in range(4):
        assert main(["split", "--manifest", str(grouped), "--folds", "2", "--seed", str(seed),
                     "--out", str(tmp_path / "folds.json"), "--quiet"]) == 0
        folds = [f["cases"] for f in json.loads((tmp_path / "folds.json").read_text())["folds"]]
        assert any({"case0", "case1"} <= set(f) for f in folds), folds
        run = tmp_path / f"run{seed}"
        assert main(["train", "--manifest", str(grouped), "--out", str(run), "--folds", "2", "--fold", "1",
                     "--seed", str(seed), "--epochs", "1", "--intensity", "hu1000", "--device", "cpu", "--quiet"]) == 0
        assert load_model(run / "model.safetensors").info.provenance["validation_cases"] == folds[1]
    assert main(["split", "--manifest", str(grouped), "--folds", "4", "--out", str(tmp_path / "f4.json")]) == 2
    assert "3 scans cannot make 4 folds" in capsys.readouterr().err
    # --split: the file's folds, checked against the manifest
    run = tmp_path / "from_file"
    assert main(["train", "--manifest", str(grouped), "--out", str(run), "--split", str(tmp_path / "folds.json"),
                 "--fold", "0", "--epochs", "1", "--intensity", "hu1000", "--device", "cpu", "--quiet"]) == 0
    prov = load_model(run / "model.safetensors").info.provenance
    assert prov["validation_cases"] == folds[0] and prov["split_file"] == "folds.json"
    for folds_in_file, message in (([["case0", "case1"], ["case2"]], "exactly the manifest's cases (e.g. 'case3')"),
                                   ([["case0", "case1"], ["case1", "case2", "case3"]], "'case1' more than once"),
                                   ([["case0", "case2"], ["case1", "case3"]], "scan 'A' (case0, case1) in different")):
        other = tmp_path / "other.json"
        other.write_text(json.dumps({"folds": [{"cases": f} for f in folds_in_file]}))
        capsys.readouterr()
        assert main(["train", "--manifest", str(grouped), "--out", str(tmp_path / "x"), "--split", str(other),
                     "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(["train", "--manifest", str(grouped), "--out", str(tmp_path / "x"), "--split", str(other),
                 "--folds", "3", "--quiet"]) == 2
    assert "leave out --folds" in capsys.readouterr().err
    assert not (tmp_path / "x").exists(), "an early error leaves no run folder"
    # A case without a scan is its own scan, even if another case's scan bears its name.
    from ILDSegmentationLib.training.manifest import read_manifest
    from ILDSegmentationLib.training.split import split_scans
    named = tmp_path / "named.csv"
    named.write_text(grouped.read_text().replace(",A\n", ",case2\n").replace(",B\n", ",\n", 1))
    cases = read_manifest(named)
    counts = {c.case_id: np.ones(6, np.int64) for c in cases}
    assert len(split_scans(cases, counts, 3, seed=0)) == 3, "scans: 'case2' (case0, case1), case2, case3"


def test_train_then_segment_and_evaluate_with_the_trained_model(manifest, tmp_path):
    with umask(0o027):
        _train_segment_evaluate(manifest, tmp_path)
    # Every output of the three commands has the mode of a normal file (not mkstemp's 0o600).
    assert sorted(p.name for p in files_in(tmp_path)) == sorted([
        "model.safetensors", "checkpoint.safetensors", "log.csv", "summary.json", "learning_curves.png",
        "confusion.png", "out.nrrd", "eval.json", "cm.png"])
    assert_normal_modes(files_in(tmp_path), 0o640)


def _train_segment_evaluate(manifest, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--manifest", str(manifest), "--out", str(run), "--folds", "2", "--epochs", "2",
                 "--lr", "2e-3", "--intensity", "hu1000", "--device", "cpu", "--batch-size", "2", "--quiet"]) == 0
    for name in ("model.safetensors", "checkpoint.safetensors", "log.csv", "learning_curves.png", "confusion.png"):
        assert (run / name).exists(), name
    with open(run / "log.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    model = load_model(run / "model.safetensors")
    prov = model.info.provenance
    assert len(prov["manifest_sha256"]) == 64 and "train" in prov["command"]
    assert "validation_balanced_accuracy" in prov
    assert model.info.pixel_spacing_mm == (0.8, 0.8)  # the training cases' pixels, for inference

    case = manifest.parent / "case0"
    assert main(["segment", str(case / "ct.nrrd"), "--lung-mask", str(case / "mask.nrrd"), "--model",
                 str(run / "model.safetensors"), "--device", "cpu", "-o", str(tmp_path / "out.nrrd"), "--quiet"]) == 0
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out.nrrd")))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "mask.nrrd")))
    assert ((labels > 0) == (mask > 0)).all()

    assert main(["evaluate", "--manifest", str(manifest), "--model", str(run / "model.safetensors"),
                 "--device", "cpu", "--report", str(tmp_path / "eval.json"),
                 "--confusion", str(tmp_path / "cm.png"), "--quiet"]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    cm = np.array(report["confusion_matrix"])
    assert cm.shape == (6, 6)
    # Rows count the annotated lung voxels of every case, class by class (read here from the files).
    annotated = np.zeros(6, np.int64)
    for row in list(csv.reader(open(manifest)))[1:]:
        ann = sitk.GetArrayFromImage(sitk.ReadImage(str(manifest.parent / row[3])))
        lung = sitk.GetArrayFromImage(sitk.ReadImage(str(manifest.parent / row[2]))) > 0
        annotated += np.bincount(ann[(ann > 0) & lung] - 1, minlength=6)
    np.testing.assert_array_equal(cm.sum(axis=1), annotated)
    assert list(np.flatnonzero(annotated)) == [0, 1, 3]
    # BACC = the mean over those classes of correct / annotated (paper Eq. 2).
    assert report["balanced_accuracy"] == pytest.approx(np.mean([cm[i, i] / annotated[i] for i in (0, 1, 3)]))
    assert set(report["per_class_accuracy"]) == set(report["dice"])
    assert (tmp_path / "cm.png").exists()


def test_simulate_writes_a_case_and_a_one_row_manifest(tmp_path):
    from ILDSegmentationLib.simulation.phantom import make_chest_phantom
    ph = make_chest_phantom(size=128, spacing=(2.8, 2.8, 10.0), n_slices=28)
    img = sitk.GetImageFromArray(ph.hu)
    img.SetSpacing(ph.geometry.spacing)
    img.SetOrigin(ph.geometry.origin)
    sitk.WriteImage(img, str(tmp_path / "ct.nrrd"))
    with umask(0o027):
        assert main(["simulate", "--ct", str(tmp_path / "ct.nrrd"), "--out", str(tmp_path / "case"), "--seed", "3",
                     "--quiet"]) == 0
    assert_normal_modes(files_in(tmp_path / "case"), 0o640)
    with open(tmp_path / "case" / "manifest.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["case_id", "ct", "lung_mask", "annotation", "scan"] and len(rows) == 2
    assert rows[1][4] == "ct", "the scan is the CT it was simulated in"
    ann = sitk.ReadImage(str(tmp_path / "case" / rows[1][3]))
    assert ann.GetSize() == img.GetSize()
    assert sitk.GetArrayFromImage(ann).max() > 1, "patterns are annotated"


def test_simulate_never_writes_over_its_input_and_leaves_nothing_half_done(tmp_path, capsys):
    from ILDSegmentationLib.simulation.phantom import make_chest_phantom
    ph = make_chest_phantom(size=64, spacing=(5.6, 5.6, 20.0), n_slices=14)
    img = sitk.GetImageFromArray(ph.hu)
    img.SetSpacing(ph.geometry.spacing)
    ct = tmp_path / "in" / "ct.nrrd"
    ct.parent.mkdir()
    sitk.WriteImage(img, str(ct))
    before = ct.read_bytes()
    # Into the CT's own folder: its ct.nrrd would be replaced by the simulated one.
    assert main(["simulate", "--ct", str(ct), "--out", str(ct.parent), "--quiet"]) == 2
    assert "overwrite the input" in capsys.readouterr().err and ct.read_bytes() == before
    assert sorted(p.name for p in ct.parent.iterdir()) == ["ct.nrrd"]
    # A second CT that cannot be read: the first one's cases are removed again.
    (tmp_path / "broken.nrrd").write_bytes(b"NRRD0004\ntype: short\n")
    out = tmp_path / "cases"
    assert main(["simulate", "--ct", str(ct), str(tmp_path / "broken.nrrd"), "--out", str(out), "--quiet"]) == 2
    assert not out.exists()
    # A failed rerun into the folder of an earlier run leaves that run's cases as they were.
    assert main(["simulate", "--ct", str(ct), "--out", str(out), "--quiet"]) == 0
    before_run = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["simulate", "--ct", str(ct), str(tmp_path / "broken.nrrd"), "--out", str(out), "--seed", "7",
                 "--quiet"]) == 2
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before_run
    for bad, what in (([str(ct), "--out", str(ct)], "is a file"), ([str(ct), "--out", str(out), "--cases-per-ct", "0"],
                                                                   "at least 1")):
        capsys.readouterr()
        assert main(["simulate", "--ct", *bad, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert what in err and len(err.strip().splitlines()) == 1, err


def test_train_init_starts_from_a_model_and_checks_it_fits(manifest, tmp_path, capsys):
    from synthetic import random_model
    start = random_model(tmp_path)  # intensity hu1000
    run = tmp_path / "finetune"
    # A learning rate this small leaves the weights where --init put them.
    assert main(["train", "--manifest", str(manifest), "--out", str(run), "--folds", "2", "--epochs", "1",
                 "--lr", "1e-12", "--intensity", "hu1000", "--device", "cpu", "--init", str(start.path),
                 "--quiet"]) == 0
    tuned = load_model(run / "model.safetensors")
    assert tuned.info.provenance["initialized_from"]["sha256"] == start.sha256
    assert tuned.info.pixel_spacing_mm == (0.8, 0.8)  # the start model records none: the new data's
    for name, value in start.network.state_dict().items():
        np.testing.assert_allclose(tuned.network.state_dict()[name].numpy(), value.numpy(), atol=1e-6, err_msg=name)

    # Resuming must name the same starting model: the checkpoint records it.
    assert main(["train", "--manifest", str(manifest), "--out", str(run), "--folds", "2", "--epochs", "2",
                 "--lr", "1e-12", "--intensity", "hu1000", "--device", "cpu", "--resume", "--quiet"]) == 2
    assert "other settings" in capsys.readouterr().err

    # A model that reads its input otherwise is refused, in one line, before training.
    capsys.readouterr()
    assert main(["train", "--manifest", str(manifest), "--out", str(tmp_path / "bad"), "--folds", "2",
                 "--epochs", "1", "--intensity", "hu", "--device", "cpu", "--init", str(start.path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--init" in err and "hu1000" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_evaluate_checks_its_outputs_first_and_writes_strict_json(manifest, tmp_path, capsys):
    args = ["evaluate", "--manifest", str(manifest), "--device", "cpu", "--quiet"]
    assert main(args + ["--report", str(tmp_path / "r.json"), "--confusion", str(tmp_path / "no" / "c.png")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "r.json").exists()
    # Annotations that miss the lung entirely: an error, not a report of NaN.
    rows = list(csv.reader(open(manifest)))
    case = manifest.parent / rows[1][0]
    ann = sitk.ReadImage(str(manifest.parent / rows[1][3]))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(manifest.parent / rows[1][2])))
    outside = sitk.GetImageFromArray(np.where(mask == 0, 1, 0).astype(np.uint8))
    outside.CopyInformation(ann)
    sitk.WriteImage(outside, str(case / "outside.nrrd"))
    one = tmp_path / "one.csv"
    one.write_text(f"case_id,ct,lung_mask,annotation\nx,{case / 'ct.nrrd'},{case / 'mask.nrrd'},{case / 'outside.nrrd'}\n")
    assert main(["evaluate", "--manifest", str(one), "--device", "cpu", "--report", str(tmp_path / "r.json"),
                 "--quiet"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err and not (tmp_path / "r.json").exists()


def test_a_run_folder_is_continued_only_with_its_own_data_and_split(manifest, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "--manifest", str(manifest), "--out", str(run), "--epochs", "1", "--intensity", "hu1000",
            "--device", "cpu", "--quiet"]
    assert main(base + ["--folds", "2", "--fold", "0"]) == 0
    before = (run / "checkpoint.safetensors").read_bytes()
    for extra, message in ((["--folds", "2", "--fold", "1", "--resume"], "another split (validation_cases, fold"),
                           (["--folds", "2", "--fold", "0"], "add --resume")):
        capsys.readouterr()
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert (run / "checkpoint.safetensors").read_bytes() == before
    (run / "checkpoint.safetensors").write_bytes(before[:100])
    assert main(base + ["--folds", "2", "--fold", "0", "--resume"]) == 2
    assert "damaged" in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("--lr", "nan"), ("--lr", "inf"), ("--unsupervised-weight", "-1"),
                                           ("--min-rel-improvement", "nan"), ("--crops-per-epoch", "-3"),
                                           ("--folds", "1"), ("--folds", "0")])
def test_bad_training_options_name_themselves(manifest, tmp_path, capsys, option, value):
    assert main(["train", "--manifest", str(manifest), "--out", str(tmp_path / "x"), f"{option}={value}",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert option in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x" / "checkpoint.safetensors").exists()


def test_fine_tuning_keeps_the_pixel_sizes_the_start_model_knew(manifest, tmp_path):
    from ILDSegmentationLib.engine.modelfile import save_model
    from synthetic import random_model
    start = random_model(tmp_path)
    start.info.pixel_spacing_mm = (1.0, 1.4)
    path = save_model(tmp_path / "start.safetensors", start.network, start.info)
    run = tmp_path / "tuned"
    assert main(["train", "--manifest", str(manifest), "--out", str(run), "--folds", "2", "--epochs", "1",
                 "--intensity", "hu1000", "--device", "cpu", "--init", str(path), "--quiet"]) == 0
    assert load_model(run / "model.safetensors").info.pixel_spacing_mm == (0.8, 1.4)


def test_train_records_what_was_asked_val_fraction_and_intensity_augmentation(manifest, tmp_path, capsys):
    run = tmp_path / "vf"
    assert main(["train", "--manifest", str(manifest), "--out", str(run), "--val-fraction", "0.5", "--epochs", "1",
                 "--intensity", "hu1000", "--intensity-augmentation", "scanner", "--device", "cpu", "--quiet"]) == 0
    prov = load_model(run / "model.safetensors").info.provenance
    assert prov["val_fraction"] == 0.5 and prov["folds"] == 2 and prov["fold"] == 0
    assert prov["training"]["intensity_augmentation"] == "scanner"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", "--manifest", str(manifest), "--out", str(tmp_path / "x"), "--intensity-augmentation", "gamma"])
    assert e.value.code == 2 and "gamma" in capsys.readouterr().err

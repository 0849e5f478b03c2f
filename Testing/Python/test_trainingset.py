"""The Slicer panel's "Teach it your site's disease" (issue 16), outside Slicer: the
annotation segmentation, the training folder and the model folder on Slicer's real
MRML core (slicer-core), and the fine-tuning in a real separate process
(``python -m ILDSegmentationLib finetune``). No fake slicer, Qt or torch.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from ILDSegmentationLib.slicer import background, trainingset
from ILDSegmentationLib.slicer.background import CANCELLED, FAILED, SUCCEEDED, FinetuneJob
from ILDSegmentationLib.training.finetune import ONE_SCAN_NOTE


# ----------------------------------------------------------------------------------
# Progress and the remaining time from the command's own lines: plain Python
# ----------------------------------------------------------------------------------
def test_finetune_lines_give_progress_and_an_upper_bound_of_the_remaining_time(monkeypatch, tmp_path):
    clock = [100.0]
    monkeypatch.setattr(background.time, "monotonic", lambda: clock[0])
    job = FinetuneJob(str(tmp_path / "manifest.csv"), str(tmp_path / "run"), epochs=40)
    job.started_at = 100.0
    for seconds, line in ((5, "finetune: 10 epochs at most, from default.safetensors; 12 training crops, 4 held-out "
                               "crops (slices: a)"),
                          (1, "annotated pixels for training: Healthy 10"),
                          (4, "before: held-out balanced accuracy 0.5000"),
                          (30, "epoch 1: loss 0.9000, validation BACC 0.5500 (best)"),
                          (20, "epoch 2: loss 0.8000, validation BACC 0.6000 (best)")):
        clock[0] += seconds
        job.handle_line(line)
    assert job.max_epochs == 10
    assert job.epoch_results == [(1, 0.55), (2, 0.6)]
    assert job.fraction == pytest.approx(0.2)
    assert "Epoch 2 of at most 10" in job.message and "0.600" in job.message
    assert job.remaining_s == pytest.approx(25.0 * 8)  # mean of 30 s and 20 s, 8 epochs left at most


# ----------------------------------------------------------------------------------
# MRML and real child processes
# ----------------------------------------------------------------------------------
slicer = pytest.importorskip("slicer", reason="Slicer's MRML core is not importable (pip install slicer-core, "
                             "Python >= 3.10); inside Slicer the module's self-test runs the same code")
from ILDSegmentationLib.slicer import mrml, nodes  # noqa: E402
from ILDSegmentationLib.classes import CLASSES  # noqa: E402
from ILDSegmentationLib.errors import InputError  # noqa: E402
from ILDSegmentationLib.terminology import terminology_entry  # noqa: E402
from test_mrml import CT_GEOMETRY, CT_SHAPE, add_ct, add_volume, lps_points, lungs_at, node_ids  # noqa: E402


@pytest.fixture
def env():
    return mrml.HeadlessMRML()


def _painted(points_labels: np.ndarray, slices=(1, 2, 3, 4)) -> np.ndarray:
    """A radiologist's sparse examples: on a few axial slices (index I is axial
    here), healthy lung in the left lung's centre, consolidation in the right lung's
    dense patch; everything else unlabelled."""
    p = lps_points(CT_GEOMETRY, CT_SHAPE)
    x, y = p[..., 0], p[..., 1]
    lung = points_labels > 0
    painted = np.zeros(CT_SHAPE, np.uint8)
    on = np.zeros(CT_SHAPE, bool)
    on[:, :, list(slices)] = True
    painted[on & lung & ((x - 60) ** 2 + y ** 2 < 25 ** 2)] = 1
    painted[on & lung & ((x + 60) ** 2 + (y - 20) ** 2 < 15 ** 2)] = 4
    return painted


def _case(env, slices=(1, 2, 3, 4)):
    scene = env.scene
    ct = add_ct(scene)
    lungs = lungs_at(lps_points(CT_GEOMETRY, CT_SHAPE))
    mask = add_volume(scene, lungs, CT_GEOMETRY, "lungs", "vtkMRMLLabelMapVolumeNode")
    annotation = trainingset.create_annotation_segmentation(scene, ct)
    painted = _painted(lungs, slices)
    mrml.write_labels_to_segmentation(painted, ct, annotation)  # what painting leaves in the segments
    return scene, ct, mask, annotation, painted


def test_annotation_segmentation_has_the_six_empty_class_segments(env):
    scene = env.scene
    ct = add_ct(scene)
    node = trainingset.create_annotation_segmentation(scene, ct)
    assert node.GetScene() is scene and node.GetName() == "CT ILD annotations"
    assert mrml.segment_ids_of(node) == [c.segment_id for c in CLASSES]
    segmentation = node.GetSegmentation()
    for c in CLASSES:
        segment = segmentation.GetSegment(c.segment_id)
        assert segment.GetName() == c.name
        np.testing.assert_allclose(segment.GetColor(), c.color, atol=1e-6)
        assert mrml.segment_tag(segment, slicer.vtkSegment.GetTerminologyEntryTagName()) == terminology_entry(c)
    assert not trainingset.annotation_labels(node, ct).any()  # nothing painted: all unlabelled
    assert trainingset.annotated_volume(node) is ct
    second = trainingset.create_annotation_segmentation(scene, ct)
    assert second.GetName() != node.GetName()
    with pytest.raises(InputError, match="select the CT"):
        trainingset.create_annotation_segmentation(scene, None)


def test_segments_painted_by_hand_are_matched_by_name(env):
    """A segmentation made in the Segment Editor, with its own segment IDs, names the
    classes: it is read as ildseg train reads a .seg.nrrd."""
    scene = env.scene
    ct = add_ct(scene)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "by hand")
    node.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    labels = np.zeros(CT_SHAPE, np.uint8)
    labels[30:34, 20:24, 2] = 1
    labels[40:44, 20:24, 3] = 2
    image = mrml._labelmap_node_like(labels, nodes.ijk_to_ras_matrix(ct))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(image, node)
    segmentation = node.GetSegmentation()
    ids = mrml.segment_ids_of(node)
    segmentation.GetSegment(ids[0]).SetName("ground glass")
    segmentation.GetSegment(ids[1]).SetName("Honeycombing")
    got = trainingset.annotation_labels(node, ct)
    assert set(np.unique(got[labels == 1])) == {2} and set(np.unique(got[labels == 2])) == {6}
    assert (got > 0).sum() == (labels > 0).sum()


def test_add_case_writes_a_case_the_training_cli_reads(env, tmp_path):
    from ILDSegmentationLib.imaging.io import read_ct
    from ILDSegmentationLib.training.annotations import read_annotation
    from ILDSegmentationLib.training.manifest import read_manifest

    scene, ct, mask, annotation, painted = _case(env)
    ids = node_ids(scene)
    folder = tmp_path / "site training set"
    added = trainingset.add_case(folder, ct, annotation, mask)
    assert node_ids(scene) == ids  # the scene is only read
    (case,) = read_manifest(folder / "manifest.csv")
    assert case.case_id == added.case_id == "CT"
    read = read_ct(case.ct)
    hu, geometry = nodes.volume_array_and_geometry(ct)
    assert np.array_equal(read.array, hu)
    np.testing.assert_allclose(read.geometry.direction, geometry.direction, atol=1e-6)
    labels = read_annotation(case.annotation, read.geometry, read.array.shape, case.where())
    assert np.array_equal(labels, painted)
    assert np.array_equal(read_ct(case.lung_mask).array > 0, lungs_at(lps_points(CT_GEOMETRY, CT_SHAPE)) > 0)
    assert added.pixels["Healthy"] == int((painted == 1).sum()) > 0
    assert added.pixels["Consolidation"] == int((painted == 4).sum()) > 0
    assert added.pixels["Honeycombing"] == 0
    assert [p.name for p in (folder / "cases").iterdir()] == ["CT"]  # no temporary folder left

    # without a lung mask node: the manifest says auto
    again = trainingset.add_case(folder, ct, annotation, None)
    rows = list(csv.DictReader(open(folder / "manifest.csv", encoding="utf-8")))
    assert [r["case_id"] for r in rows] == ["CT", again.case_id] and again.case_id != "CT"
    assert rows[1]["lung_mask"] == "auto"
    assert rows[0]["scan"] == rows[1]["scan"]  # one CT: one scan, on one side of the held-out split


def test_cases_never_overwrite_each_other(env, tmp_path):
    scene, ct, mask, annotation, _ = _case(env)
    folder = tmp_path / "set"
    first = trainingset.add_case(folder, ct, annotation, mask)
    squatter = folder / "cases" / "CT-2"
    squatter.mkdir()
    (squatter / "notes.txt").write_text("someone else's")
    second = trainingset.add_case(folder, ct, annotation, mask)
    assert second.case_id == "CT-3"
    assert (squatter / "notes.txt").read_text() == "someone else's"
    assert sorted(p.name for p in (folder / "cases").iterdir()) == ["CT", "CT-2", "CT-3"]
    assert first.folder.is_dir()


def test_annotations_of_another_ct_are_refused(env, tmp_path):
    scene, ct, mask, annotation, _ = _case(env)
    other = add_ct(scene, name="other CT")
    assert trainingset.annotation_fits_input(annotation, ct)
    assert not trainingset.annotation_fits_input(annotation, other)
    assert trainingset.annotation_fits_input(annotation, None)
    folder = tmp_path / "set"
    with pytest.raises(InputError, match="holds annotations of the CT 'CT', not of 'other CT'"):
        trainingset.add_case(folder, other, annotation, mask)
    assert not (folder / "manifest.csv").exists()


def test_nothing_painted_is_refused_and_nothing_written(env, tmp_path):
    scene = env.scene
    ct = add_ct(scene)
    empty = trainingset.create_annotation_segmentation(scene, ct)
    folder = tmp_path / "set"
    with pytest.raises(InputError, match="nothing is painted"):
        trainingset.add_case(folder, ct, empty, None)
    assert not folder.exists()
    with pytest.raises(InputError, match="choose a training folder"):
        trainingset.add_case("", ct, empty, None)


def test_a_manifest_the_training_cli_cannot_read_is_not_appended_to(env, tmp_path):
    scene, ct, mask, annotation, _ = _case(env)
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "manifest.csv").write_text("case,image\nx,y\n")
    before = (folder / "manifest.csv").read_text()
    with pytest.raises(InputError):
        trainingset.add_case(folder, ct, annotation, mask)
    assert (folder / "manifest.csv").read_text() == before
    assert not (folder / "cases").exists() or not any((folder / "cases").iterdir())


def test_summary_counts_the_set_and_names_classes_without_examples(env, tmp_path):
    scene, ct, mask, annotation, painted = _case(env)
    folder = tmp_path / "set"
    assert trainingset.summarize(folder).message() == "The training set is empty."
    trainingset.add_case(folder, ct, annotation, mask)
    trainingset.add_case(folder, ct, annotation, None)
    summary = trainingset.summarize(folder)
    assert summary.cases == 2
    assert summary.pixels["Healthy"] == 2 * int((painted == 1).sum())
    assert summary.pixels["Consolidation"] == 2 * int((painted == 4).sum())
    assert summary.lacking == ["Ground glass opacity", "Micronodules", "Reticulation", "Honeycombing"]
    message = summary.message()
    assert "2 cases" in message and f"Healthy {2 * int((painted == 1).sum()):,}" in message
    assert "No examples yet of Ground glass opacity, Micronodules, Reticulation, Honeycombing" in message


def test_model_folder_lists_models_with_their_provenance_only(tmp_path):
    from ILDSegmentationLib.engine.modelfile import load_model, save_model

    bundled = load_model()
    folder = tmp_path / "my models"
    run = folder / "finetune-1"
    run.mkdir(parents=True)
    info = bundled.info
    info.provenance = {**(info.provenance or {}), "trained_on": "manifest site.csv", "initialized_from": {"sha256": "x"}}
    save_model(run / "model.safetensors", bundled.network, info)
    (run / "finetune.json").write_text(json.dumps({"before": {"balanced_accuracy": 0.5},
                                                   "after": {"balanced_accuracy": 0.75}}))
    save_model(run / "checkpoint.safetensors", bundled.network, info)  # not a model to choose
    (folder / "junk.safetensors").write_bytes(b"not a model")
    (folder / "old.pt").write_bytes(b"\x80\x04pickle")  # never opened
    save_model(folder / "plain.safetensors", bundled.network, bundled.info)
    entries = trainingset.list_models(folder)
    assert sorted(e.path.name for e in entries) == ["model.safetensors", "plain.safetensors"]
    tuned = next(e for e in entries if e.path.name == "model.safetensors")
    assert tuned.provenance["trained_on"] == "manifest site.csv"
    assert tuned.label().startswith("finetune-1: ") and "0.500 -> 0.750" in tuned.label()
    assert trainingset.list_models(tmp_path / "missing") == [] and trainingset.list_models("") == []


def test_new_run_folders_are_new_and_never_the_bundled_models_folder(tmp_path):
    from ILDSegmentationLib.engine.modelfile import default_model_path

    first = trainingset.new_run_folder(tmp_path / "models")
    first.mkdir()
    second = trainingset.new_run_folder(tmp_path / "models")
    assert second != first and not second.exists()
    with pytest.raises(InputError, match="never replaces the bundled one"):
        trainingset.new_run_folder(default_model_path().parent)


# ----------------------------------------------------------------------------------
# Fine-tuning in a separate process
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def training_folder(tmp_path_factory):
    env = mrml.HeadlessMRML()
    _, ct, mask, annotation, _ = _case(env)
    folder = tmp_path_factory.mktemp("training set")
    trainingset.add_case(folder, ct, annotation, mask)
    return folder


def _bundled_sha() -> str:
    from ILDSegmentationLib.engine.modelfile import default_model_path, sha256_of
    return sha256_of(default_model_path())


def test_finetune_in_the_background_gives_a_selectable_model(training_folder, tmp_path):
    bundled = _bundled_sha()
    models = tmp_path / "models"
    run = trainingset.new_run_folder(models)
    # The case's four painted slices lie closer than the default slab gap; --min-gain -1:
    # the model is offered whatever two epochs make of it (kept-start: the next test).
    job = FinetuneJob(str(training_folder / "manifest.csv"), str(run), epochs=2, device="cpu",
                      extra_args=["--slab-gap", "0", "--min-gain", "-1"], temp_root=str(tmp_path)).start()
    assert job.wait(600) == SUCCEEDED, job.error
    assert job.max_epochs == 2 and [n for n, _ in job.epoch_results] in ([1], [1, 2])
    assert job.remaining_s is not None
    report = job.finish()
    assert Path(report["model"]) == run / "model.safetensors"
    for key in ("before", "after"):
        assert 0.0 <= report[key]["balanced_accuracy"] <= 1.0
        assert set(report[key]["per_class_accuracy"]) == {c.name for c in CLASSES}
    lines = trainingset.describe_finetune(report)
    assert lines[0].startswith("Held-out balanced accuracy: ") and " before, " in lines[0]
    assert f"Warning: {ONE_SCAN_NOTE}" in lines  # one scan: its figure is no next-patient estimate
    assert any(line.startswith("Healthy: ") and " -> " in line for line in lines)
    assert lines[-1] == f"Model: {run / 'model.safetensors'}"
    (entry,) = trainingset.list_models(models)
    assert entry.path == run / "model.safetensors" and entry.finetune["after"] == report["after"]
    assert entry.provenance["initialized_from"]["sha256"] == bundled
    assert _bundled_sha() == bundled  # the bundled model is never replaced
    assert [p for p in tmp_path.iterdir() if p.name.startswith("ildseg-")] == []


def test_finetune_that_does_not_beat_the_start_model_offers_no_model(training_folder, tmp_path):
    """Exit status 4 is a finished run whose model is no better than the start: the job
    succeeds, its report says the start model stays, and no model is listed."""
    models = tmp_path / "models"
    run = trainingset.new_run_folder(models)
    job = FinetuneJob(str(training_folder / "manifest.csv"), str(run), epochs=1, device="cpu",
                      extra_args=["--slab-gap", "0", "--lr", "1e-12"], temp_root=str(tmp_path)).start()
    assert job.wait(600) == SUCCEEDED, job.error
    assert job.child.returncode == 4
    report = job.finish()
    assert report["kept_start_model"] is True and report["model"] is None
    lines = trainingset.describe_finetune(report)
    assert lines[0].startswith("Not better than the start model") and "start model stays selected" in lines[0]
    assert not any(line.startswith("Model: ") for line in lines)
    assert trainingset.list_models(models) == []


@pytest.mark.skipif(os.name == "nt", reason="signals are POSIX here")
def test_cancelled_finetune_leaves_no_model_behind(training_folder, tmp_path):
    models = tmp_path / "models"
    run = trainingset.new_run_folder(models)
    job = FinetuneJob(str(training_folder / "manifest.csv"), str(run), epochs=40, device="cpu",
                      extra_args=["--slab-gap", "0"], temp_root=str(tmp_path)).start()
    import time
    deadline = time.monotonic() + 300
    while job.poll() not in (SUCCEEDED, FAILED, CANCELLED) and job.max_epochs is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert job.max_epochs == 40, (job.state, job.error)
    job.cancel()
    assert job.wait(60) == CANCELLED
    assert not run.exists()
    assert trainingset.list_models(models) == []


def test_finetune_with_too_few_annotations_fails_in_one_line(tmp_path):
    env = mrml.HeadlessMRML()
    _, ct, mask, annotation, _ = _case(env, slices=(2,))  # one painted slice: nothing to hold out
    folder = tmp_path / "set"
    trainingset.add_case(folder, ct, annotation, mask)
    run = trainingset.new_run_folder(tmp_path / "models")
    job = FinetuneJob(str(folder / "manifest.csv"), str(run), epochs=2, device="cpu", temp_root=str(tmp_path)).start()
    assert job.wait(600) == FAILED
    assert job.error and "\n" not in job.error and "annotat" in job.error.lower()
    assert not run.exists()


def test_finetune_refuses_missing_inputs_before_starting(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(InputError, match="no manifest yet"):
        FinetuneJob(str(tmp_path / "manifest.csv"), str(run)).start()
    (tmp_path / "manifest.csv").write_text("case_id,ct,lung_mask,annotation\n")
    run.mkdir()
    with pytest.raises(InputError, match="exists already"):
        FinetuneJob(str(tmp_path / "manifest.csv"), str(run)).start()


# ----------------------------------------------------------------------------------
# Issue 29, item 4: no unfinished fine-tuning run among the user's models
# ----------------------------------------------------------------------------------
def test_a_run_folder_model_without_its_report_is_not_offered(tmp_path):
    """A run killed outright (SIGKILL, power loss) after the trainer wrote
    model.safetensors but before finetune.json: not a finished run."""
    from ILDSegmentationLib.engine.modelfile import load_model, save_model

    bundled = load_model()
    killed, finished = tmp_path / "finetune-killed", tmp_path / "finetune-done"
    for run in (killed, finished):
        run.mkdir()
        save_model(run / "model.safetensors", bundled.network, bundled.info)
    (finished / "finetune.json").write_text(json.dumps({"before": {}, "after": {}}))
    damaged = tmp_path / "finetune-damaged"
    damaged.mkdir()
    save_model(damaged / "model.safetensors", bundled.network, bundled.info)
    (damaged / "finetune.json").write_text("{ half written")
    assert [e.path for e in trainingset.list_models(tmp_path)] == [finished / "model.safetensors"]


def _finetune_until_first_epoch(training_folder, run, tmp_path):
    import time
    # The case's painted slices lie closer than the default slab gap (issue 25's one-scan hold-out).
    job = FinetuneJob(str(training_folder / "manifest.csv"), str(run), epochs=40, device="cpu",
                      extra_args=["--slab-gap", "0"], temp_root=str(tmp_path)).start()
    deadline = time.monotonic() + 300
    while job.poll() not in (SUCCEEDED, FAILED, CANCELLED) and not job.epoch_results:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert job.epoch_results, (job.state, job.error)
    assert (run / "checkpoint.safetensors").is_file()  # the run has written into its folder
    return job


@pytest.mark.skipif(os.name == "nt", reason="signals are POSIX here")
def test_finetune_command_removes_its_run_folder_on_sigterm(training_folder, tmp_path):
    """The command's own clean-up (the panel removes the folder too, but a run
    started from a terminal or a script must not leave a half run either)."""
    import sys
    run = tmp_path / "models" / "run"
    child = background.ChildProcess(
        [sys.executable, "-m", "ILDSegmentationLib", "finetune", "--manifest", str(training_folder / "manifest.csv"),
         "--out", str(run), "--epochs", "40", "--device", "cpu", "--slab-gap", "0"],
        env_updates=background.child_environment(), kill_after_s=120.0).start()  # SIGKILL would prove nothing
    import time
    deadline = time.monotonic() + 300
    while not any(line.startswith("epoch 1:") for line in child.lines):
        child.poll()
        assert child.state == background.RUNNING and time.monotonic() < deadline, list(child.lines)[-5:]
        time.sleep(0.05)
    assert (run / "checkpoint.safetensors").is_file()
    child.cancel()  # SIGTERM
    assert child.wait(120) == CANCELLED
    assert any("the unfinished run's outputs were removed" in line for line in child.lines), list(child.lines)[-3:]
    assert not run.exists() and (tmp_path / "models").is_dir()


@pytest.mark.skipif(os.name == "nt", reason="process groups are POSIX here")
def test_cleanup_on_quit_or_reload_stops_finetuning_and_removes_its_run_folder(training_folder, tmp_path):
    """Slicer quitting or reloading the module calls the job's cleanup(), and no poll
    follows: the child is stopped and the run folder removed before it returns."""
    models = tmp_path / "models"
    run = trainingset.new_run_folder(models)
    job = _finetune_until_first_epoch(training_folder, run, tmp_path)
    pid = job.child.pid
    job.cleanup()
    assert not background.group_alive(pid)
    assert not run.exists() and trainingset.list_models(models) == []
    assert [p for p in tmp_path.iterdir() if p.name.startswith("ildseg-")] == []


# ----------------------------------------------------------------------------------
# Issue 29, item 8: the summary does not read every annotation again on each call
# ----------------------------------------------------------------------------------
def test_summary_reads_an_annotation_again_only_when_it_changed(training_folder, tmp_path, monkeypatch):
    import shutil

    import SimpleITK as sitk

    folder = tmp_path / "set"
    shutil.copytree(training_folder, folder)
    reads = []
    real_read = sitk.ReadImage

    def counting_read(path, *args, **kwargs):
        reads.append(Path(str(path)).name)
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(sitk, "ReadImage", counting_read)
    first = trainingset.summarize(folder)
    assert reads == ["annotation.nrrd"]
    again = trainingset.summarize(folder)
    assert reads == ["annotation.nrrd"] and again.pixels == first.pixels  # not read again
    (case_folder,) = (folder / "cases").iterdir()
    path = case_folder / "annotation.nrrd"
    image = real_read(str(path))
    array = sitk.GetArrayFromImage(image)
    array[array == 1] = 2  # the healthy examples relabelled ground glass
    changed = sitk.GetImageFromArray(array)
    changed.CopyInformation(image)
    sitk.WriteImage(changed, str(path), True)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10 ** 9))
    after = trainingset.summarize(folder)
    assert reads == ["annotation.nrrd", "annotation.nrrd"]
    assert after.pixels["Healthy"] == 0
    assert after.pixels["Ground glass opacity"] == first.pixels["Healthy"] + first.pixels["Ground glass opacity"]

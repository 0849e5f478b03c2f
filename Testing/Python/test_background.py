"""The Slicer panel's run in a separate process (issue 14), end to end: Slicer's real
MRML core (slicer-core) and a real child process running ``python -m
ILDSegmentationLib segment``. No fake slicer, Qt or torch.

What is checked: a run writes the same segmentation as the in-process run into the
same output nodes; Cancel stops the child and everything it started (also under a
launcher, as PythonSlicer is) and leaves the scene as it was; a child that fails
gives its own one-line message; a child killed from outside is reported as such;
the temporary folder is gone in every case.
"""
from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ILDSegmentationLib.slicer import background
from ILDSegmentationLib.commands.progress import ProgressLines, parse_progress_line
from ILDSegmentationLib.slicer.background import CANCELLED, FAILED, SUCCEEDED, ChildProcess, SegmentationJob

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------
# Progress lines: plain Python
# ----------------------------------------------------------------------------------
def test_progress_lines_round_trip_and_throttle():
    out = io.StringIO()
    lines = ProgressLines(out, min_interval_s=60.0)
    lines(0.0, "Reading\nthe CT")
    lines(0.5, "slice 3 of 6")  # within the interval: dropped
    lines(1.0, "done")  # the last one always
    printed = out.getvalue().splitlines()
    assert printed == ["ildseg-progress 0.0000 Reading the CT", "ildseg-progress 1.0000 done"]
    assert [parse_progress_line(line) for line in printed] == [(0.0, "Reading the CT"), (1.0, "done")]
    for other in ("ildseg: error: x", "ildseg-progress", "ildseg-progress abc x", "ildseg-progress 1.5 x", ""):
        assert parse_progress_line(other) is None


def test_the_cli_prints_progress_lines(tmp_path):
    """``ildseg segment --progress-lines`` prints parseable lines (not a tqdm bar,
    which writes carriage returns to stderr and only on a terminal)."""
    import subprocess

    sitk = pytest.importorskip("SimpleITK")
    k, j, i = np.meshgrid(np.arange(6), np.arange(64), np.arange(64), indexing="ij")
    x, y = (i - 31.5) * 5.0, (j - 31.5) * 5.0
    lungs = ((((x + 60) / 45) ** 2 + (y / 75) ** 2) < 1) | ((((x - 60) / 45) ** 2 + (y / 75) ** 2) < 1)
    hu = np.where((x / 130) ** 2 + (y / 110) ** 2 < 1, 40.0, -1000.0)
    hu[lungs] = -850.0
    hu += np.random.default_rng(0).normal(0, 20, hu.shape)
    for array, name in ((hu.astype(np.int16), "ct.nrrd"), (lungs.astype(np.uint8), "lungs.nrrd")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((5.0, 5.0, 5.0))
        sitk.WriteImage(image, str(tmp_path / name))
    run = subprocess.run([sys.executable, "-m", "ILDSegmentationLib", "segment", str(tmp_path / "ct.nrrd"), "-o",
                          str(tmp_path / "labels.nrrd"), "--lung-mask", str(tmp_path / "lungs.nrrd"),
                          "--device", "cpu", "--progress-lines"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    parsed = [parse_progress_line(line) for line in run.stdout.splitlines()]
    fractions = [p[0] for p in parsed if p is not None]
    assert len(fractions) >= 2 and fractions[-1] == 1.0
    assert fractions == sorted(fractions)
    assert "\r" not in run.stderr


# ----------------------------------------------------------------------------------
# The child process alone
# ----------------------------------------------------------------------------------
def test_child_failure_is_its_one_line_error():
    child = ChildProcess([sys.executable, "-c", "import sys; print('working'); "
                          "print('ildseg: error: the lung mask is empty', file=sys.stderr); sys.exit(2)"],
                         what="the test process").start()
    assert child.wait(60) == FAILED
    assert child.returncode == 2
    assert child.error == "the lung mask is empty"


def test_child_crash_without_message_names_exit_code_and_last_line():
    child = ChildProcess([sys.executable, "-c", "import sys; print('ildseg-progress 0.5 x'); "
                          "print('Segmentation fault in libfoo'); sys.exit(3)"], what="the test process").start()
    assert child.wait(60) == FAILED
    assert child.error == "the test process ended with exit code 3: Segmentation fault in libfoo"


# ----------------------------------------------------------------------------------
# MRML + the real child
# ----------------------------------------------------------------------------------
slicer = pytest.importorskip("slicer", reason="Slicer's MRML core is not importable (pip install slicer-core, "
                             "Python >= 3.10); inside Slicer the module's self-test runs the same path")
from ILDSegmentationLib.slicer import mrml  # noqa: E402
from ILDSegmentationLib.classes import CLASSES  # noqa: E402
from ILDSegmentationLib.errors import InputError  # noqa: E402
from test_mrml import (CT_GEOMETRY, CT_SHAPE, OBLIQUE_DIRECTION, add_ct, add_volume, assert_unchanged,  # noqa: E402
                       centred_geometry, export_labels, lps_points, lungs_at, node_ids, snapshot)

posix_only = pytest.mark.skipif(os.name == "nt", reason="process groups and signals are POSIX here")


@pytest.fixture
def env():
    return mrml.HeadlessMRML()


@pytest.fixture(scope="module")
def model():
    from ILDSegmentationLib.engine.modelfile import load_model
    return load_model(device="cpu")


def _chest(env, slices: int = CT_SHAPE[2]):
    """The oblique synthetic chest of test_mrml (index I runs superior: ``slices``
    axial slices); more slices make a run long enough to be cancelled mid-way."""
    scene = env.scene
    shape = CT_SHAPE[:2] + (slices,)
    geometry = CT_GEOMETRY if slices == CT_SHAPE[2] else centred_geometry(OBLIQUE_DIRECTION, (5.0, 5.0, 5.0), shape)
    ct = add_ct(scene, geometry, shape)
    mask = add_volume(scene, lungs_at(lps_points(geometry, shape)), geometry, "lungs", "vtkMRMLLabelMapVolumeNode")
    return scene, ct, mask


def _until_progress(job: SegmentationJob, timeout: float = 300.0) -> None:
    """Poll until the child reports its first progress (it is inside the run)."""
    deadline = time.monotonic() + timeout
    while job.poll() not in (SUCCEEDED, FAILED, CANCELLED):
        if any(parse_progress_line(line) for line in job.child.lines):
            return
        assert time.monotonic() < deadline, "no progress from the child"
        time.sleep(0.02)
    pytest.fail(f"the child ended before reporting progress: {job.state} {job.error}")


def _group_gone(pid: int, timeout: float = 1.0) -> bool:
    """No process of the child's group runs any more (zombies waiting for init to
    reap them do not count: see background.group_alive)."""
    def alive() -> bool:
        proc = Path("/proc")
        if not (proc / "self" / "stat").is_file():
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return False
            return True
        for stat in proc.glob("[0-9]*/stat"):
            try:
                state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue
            if pgrp == str(pid) and state not in ("Z", "X"):
                return True
        return False

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return True
        time.sleep(0.05)
    return False


def test_background_run_writes_what_the_in_process_run_writes(env, model, tmp_path):
    scene, ct, mask = _chest(env)
    before = snapshot(ct)
    job = SegmentationJob(scene, ct, mask, None, device="cpu", temp_root=str(tmp_path)).start()
    folder = job.folder
    assert (folder / "ct.nrrd").is_file() and (folder / "lung_mask.nrrd").is_file()
    nodes_before = node_ids(scene)
    assert job.wait(600) == SUCCEEDED, job.error
    assert node_ids(scene) == nodes_before  # nothing written before finish()
    result = job.finish()
    assert not folder.exists()
    seg = result.segmentation_node
    assert mrml.segment_ids_of(seg) == [c.segment_id for c in CLASSES]
    assert seg.GetAttribute(mrml.ATTRIBUTE_PREFIX + "Device").startswith("cpu")
    assert mrml.results_input_volume(seg) is ct
    assert_unchanged(before, ct)

    in_process = mrml.process(scene, ct, mask, None, model=model, device="cpu")
    background_labels = export_labels(env, seg, ct)
    in_process_labels = export_labels(env, in_process.segmentation_node, ct)
    assert (background_labels > 0).sum() > 1000
    assert np.array_equal(background_labels, in_process_labels)
    rows = mrml.results_from_table(result.table_node)
    assert rows[-1][mrml.COL_VOXELS] == int((background_labels > 0).sum())

    # issue 15 in the panel: the regions table and the input checks, the same from both runs
    from ILDSegmentationLib.analysis.regions import TABLE_COLUMNS
    regions = mrml.results_from_table(result.regions_table_node)
    assert seg.GetNodeReference(mrml.REGIONS_TABLE_ROLE) is result.regions_table_node
    assert list(regions[0]) == list(TABLE_COLUMNS)
    assert {r["region"] for r in regions} >= {"lung", "right lung", "left lung"}
    assert len(regions) == len(mrml.results_from_table(in_process.regions_table_node)) > len(CLASSES)
    whole = [r for r in regions if r["region"] == "lung"]
    assert [r["voxels"] for r in whole] == [row[mrml.COL_VOXELS] for row in rows[:-1]]
    assert any(w.startswith("slice thickness") for w in result.warnings)  # 5 mm slices
    assert result.warnings == in_process.warnings and result.distribution == in_process.distribution

    # again into the same output: the same nodes, updated
    count = scene.GetNumberOfNodes()
    again = SegmentationJob(scene, ct, mask, seg, device="cpu", probabilities=True, temp_root=str(tmp_path)).start()
    assert again.wait(600) == SUCCEEDED, again.error
    second = again.finish()
    assert second.segmentation_node is seg and second.table_node is result.table_node
    assert second.regions_table_node is result.regions_table_node
    assert scene.GetNumberOfNodes() == count + len(CLASSES) * 2  # six probability maps and their display nodes
    probs = slicer.util.arrayFromVolume(second.probability_nodes[0])
    assert probs.shape == CT_SHAPE and 0.0 <= probs.min() and probs.max() <= 1.0
    assert list(tmp_path.iterdir()) == []


def test_automatic_lung_mask_and_segmentation_mask_in_the_background(env, tmp_path):
    scene, ct, _ = _chest(env)
    job = SegmentationJob(scene, ct, None, None, device="cpu", temp_root=str(tmp_path)).start()
    assert job.wait(600) == SUCCEEDED, job.error
    result = job.finish()
    assert result.lung_mask_source == "computed automatically"
    assert export_labels(env, result.segmentation_node, ct).any()


def _launcher(tmp_path: Path) -> str:
    """A stand-in for PythonSlicer, which is a launcher: it starts the real
    interpreter as its child instead of becoming it (no exec)."""
    script = tmp_path / "PythonLauncher"
    script.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\nexit $?\n')
    script.chmod(0o755)
    return str(script)


@posix_only
@pytest.mark.parametrize("under_launcher", [False, True], ids=["python", "launcher"])
def test_cancel_stops_the_child_and_leaves_the_scene_as_it_was(env, tmp_path, under_launcher):
    scene, ct, mask = _chest(env, slices=80)
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "earlier output")
    mrml.ensure_class_segments(output)
    ids, ct_state, output_state = node_ids(scene), snapshot(ct), snapshot(output)
    temp = tmp_path / "temp"
    temp.mkdir()
    python = _launcher(tmp_path) if under_launcher else None
    job = SegmentationJob(scene, ct, mask, output, device="cpu", temp_root=str(temp), python=python).start()
    _until_progress(job)
    # A short grace period: the run (80 slices) lasts longer, so a process left
    # running by the cancel would still be found below.
    job.child.kill_after_s = 0.5
    job.cancel()
    assert job.wait(60) == CANCELLED
    assert _group_gone(job.child.pid), "a process of the cancelled run is still alive"
    assert node_ids(scene) == ids
    assert_unchanged(ct_state, ct)
    assert_unchanged(output_state, output)
    assert list(temp.iterdir()) == []
    with pytest.raises(Exception, match="has not succeeded"):
        job.finish()


@posix_only
def test_a_child_that_ignores_sigterm_is_killed(tmp_path):
    child = ChildProcess([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "print('ready', flush=True); time.sleep(600)"], kill_after_s=1.0).start()
    while not child.lines:
        child.poll()
        time.sleep(0.02)
    child.cancel()
    assert child.wait(30) == CANCELLED
    assert _group_gone(child.pid)


def test_a_failing_child_gives_its_one_line_message(env, tmp_path):
    """A model file that is not one: the child refuses it with its own message."""
    scene, ct, mask = _chest(env)
    ids = node_ids(scene)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"this is not a model file at all")
    temp = tmp_path / "temp"
    temp.mkdir()
    job = SegmentationJob(scene, ct, mask, None, device="cpu", model=str(bad), temp_root=str(temp)).start()
    assert job.wait(600) == FAILED
    assert job.error and "\n" not in job.error
    assert "broken.safetensors" in job.error and not job.error.startswith("ildseg:")
    assert job.child.returncode == 2
    assert node_ids(scene) == ids
    assert list(temp.iterdir()) == []


def test_a_ct_the_child_refuses(env, tmp_path):
    """A label map loaded as a scalar volume passes the node checks but is not a CT in
    HU: the child says so (ildseg's plausibility check) and nothing is written."""
    scene = env.scene
    labels = lungs_at(lps_points(CT_GEOMETRY, CT_SHAPE)).astype(np.int16)
    not_ct = add_volume(scene, labels, CT_GEOMETRY, "labels as a volume")
    ids = node_ids(scene)
    job = SegmentationJob(scene, not_ct, None, None, device="cpu", temp_root=str(tmp_path)).start()
    assert job.wait(600) == FAILED
    assert "CT" in job.error and "\n" not in job.error
    assert node_ids(scene) == ids


@posix_only
def test_a_killed_child_is_reported(env, tmp_path):
    """Killed from outside (the out-of-memory killer, a user's kill -9)."""
    scene, ct, mask = _chest(env, slices=40)
    ids = node_ids(scene)
    job = SegmentationJob(scene, ct, mask, None, device="cpu", temp_root=str(tmp_path)).start()
    _until_progress(job)
    os.kill(job.child.pid, signal.SIGKILL)
    assert job.wait(60) == FAILED
    assert job.error == "the segmentation process was stopped by SIGKILL (the system may have run out of memory)"
    assert node_ids(scene) == ids
    assert list(tmp_path.iterdir()) == []


def test_bad_nodes_are_refused_before_anything_starts(env, tmp_path):
    scene, ct, mask = _chest(env)
    for kwargs, message in (({"ct_node": mask, "lung_mask_node": None}, "label map"),
                            ({"lung_mask_node": ct}, "cannot be the CT"),
                            ({"model": str(tmp_path / "missing.safetensors")}, "does not exist")):
        args = {"ct_node": ct, "lung_mask_node": mask, **kwargs}
        job = SegmentationJob(scene, args.pop("ct_node"), args.pop("lung_mask_node"), None, device="cpu",
                              temp_root=str(tmp_path), **args)
        with pytest.raises(InputError, match=message):
            job.start()
        assert job.child is None
    assert list(tmp_path.iterdir()) == []


def test_an_output_deleted_during_the_run_is_not_written(env, tmp_path):
    scene, ct, mask = _chest(env)
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "output")
    job = SegmentationJob(scene, ct, mask, output, device="cpu", temp_root=str(tmp_path)).start()
    assert job.wait(600) == SUCCEEDED, job.error
    scene.RemoveNode(output)
    ids = node_ids(scene)
    with pytest.raises(InputError, match="removed from the scene"):
        job.finish()
    assert node_ids(scene) == ids
    assert list(tmp_path.iterdir()) == []


def test_the_child_finds_the_package_from_any_folder(tmp_path):
    """The child runs in the temporary folder with only the package's folder added
    to PYTHONPATH (inside Slicer nothing else puts it on the child's path)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    updates = background.child_environment(env, str(REPO))
    child = ChildProcess([sys.executable, "-c", "import ILDSegmentationLib, os; "
                          "print(os.path.dirname(os.path.dirname(ILDSegmentationLib.__file__)))"],
                         env=env, env_updates=updates, cwd=str(tmp_path)).start()
    assert child.wait(60) == SUCCEEDED
    assert Path(child.lines[-1]).resolve() == REPO

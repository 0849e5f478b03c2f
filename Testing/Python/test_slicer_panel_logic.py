"""The Slicer panel's logic on Slicer's real MRML core (slicer-core), issue 29:
changing the CT forgets the other CT's output and annotation (item 2), annotations
must be under the CT's transform (item 3), the crop box option reaches the engine and
the command (the panel's Advanced section), a background run stopped for good leaves
nothing running and nothing behind (item 4). No fake slicer, Qt or torch: the
module's own function is run from its source (Slicer's Qt is not here).
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="Slicer's MRML core is not importable (pip install slicer-core, "
                             "Python >= 3.10); inside Slicer the module's self-test runs the same code")
import vtk  # noqa: E402

from ILDSegmentationLib.slicer import mrml, nodes, trainingset  # noqa: E402
from ILDSegmentationLib.slicer.background import CANCELLED, SegmentationJob, group_alive  # noqa: E402
from ILDSegmentationLib.errors import InputError  # noqa: E402
from test_mrml import CT_GEOMETRY, CT_SHAPE, add_ct, add_volume, lps_points, lungs_at, node_ids  # noqa: E402

MODULE_PY = Path(__file__).resolve().parents[2] / "ILDSegmentation" / "ILDSegmentation.py"


@pytest.fixture
def env():
    return mrml.HeadlessMRML()


def _module_function(name: str):
    """A top-level function of the Slicer module, run here from its source."""
    tree = ast.parse(MODULE_PY.read_text(encoding="utf-8"))
    (function,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    namespace: dict = {}
    exec(compile(ast.Module([function], []), str(MODULE_PY), "exec"), namespace)
    return namespace[name]


class PanelChoices:
    """The parameter node's attributes the function reads and writes (Slicer's
    parameterNodeWrapper needs Qt, absent here); the nodes in it are real."""

    def __init__(self, **values):
        self.__dict__.update(values)


def _shifted(scene, ct, name="registration"):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 12.0)
    m.SetElement(2, 3, -7.0)
    transform.SetMatrixTransformToParent(m)
    ct.SetAndObserveTransformNodeID(transform.GetID())
    return transform


def _paint(annotation, ct, labels):  # ct: made by add_ct, on CT_GEOMETRY
    """Paint ``labels`` (on the CT's voxels) into the annotation's class segments, in
    the annotation's own frame, as the Segment Editor does over the shown CT."""
    from ILDSegmentationLib.classes import CLASSES

    scene = annotation.GetScene()
    image = add_volume(scene, labels, CT_GEOMETRY, "brush strokes", "vtkMRMLLabelMapVolumeNode")  # the CT's own grid
    image.SetAndObserveTransformNodeID(annotation.GetTransformNodeID())  # painted over the shown CT
    ids = vtk.vtkStringArray()
    for c in CLASSES:
        ids.InsertNextValue(c.segment_id)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(image, annotation, ids)
    scene.RemoveNode(image)


def _painted_labels():
    lungs = lungs_at(lps_points(CT_GEOMETRY, CT_SHAPE))
    painted = np.zeros(CT_SHAPE, np.uint8)
    painted[..., 2][lungs[..., 2] == 1] = 1
    painted[..., 3][lungs[..., 3] == 2] = 4
    return lungs, painted


# ----------------------------------------------------------------------------------
# Item 2: a new CT forgets the other CT's output and its annotation, both at once
# ----------------------------------------------------------------------------------
def test_changing_the_ct_unselects_the_other_cts_output_and_annotation(env):
    scene = env.scene
    first, second = add_ct(scene, name="first"), add_ct(scene, name="second")
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "first results")
    output.SetNodeReferenceID(mrml.INPUT_VOLUME_ROLE, first.GetID())
    annotation = trainingset.create_annotation_segmentation(scene, first)
    forget = _module_function("forgetOtherInputsNodes")

    p = PanelChoices(inputVolume=second, outputSegmentation=output, annotationSegmentation=annotation)
    assert forget(p) is True
    # the early return after the output's reset had left the annotation selected
    assert p.outputSegmentation is None and p.annotationSegmentation is None
    assert output.GetScene() is scene and annotation.GetScene() is scene  # the nodes themselves stay

    own = trainingset.create_annotation_segmentation(scene, second)
    p = PanelChoices(inputVolume=second, outputSegmentation=None, annotationSegmentation=own)
    assert forget(p) is False and p.annotationSegmentation is own
    # only the annotation belongs to another CT: it alone goes
    p = PanelChoices(inputVolume=second, outputSegmentation=None, annotationSegmentation=annotation)
    assert forget(p) is True and p.annotationSegmentation is None


# ----------------------------------------------------------------------------------
# Item 3: annotations under another transform than the CT's are refused
# ----------------------------------------------------------------------------------
def test_annotation_under_another_transform_than_the_ct_is_refused(env, tmp_path):
    scene = env.scene
    ct = add_ct(scene)
    lungs, painted = _painted_labels()
    mask = add_volume(scene, lungs, CT_GEOMETRY, "lungs", "vtkMRMLLabelMapVolumeNode")
    by_hand = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "by hand")  # made elsewhere, no transform
    by_hand.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    mrml.ensure_class_segments(by_hand)
    _paint(by_hand, ct, painted)
    assert np.array_equal(trainingset.annotation_labels(by_hand, ct), painted)  # same (no) transform: read

    _shifted(scene, ct)  # the CT is moved, the annotation is not
    mask.SetAndObserveTransformNodeID(ct.GetTransformNodeID())
    with pytest.raises(InputError, match="under different transforms; harden the transforms first") as raised:
        trainingset.annotation_labels(by_hand, ct)
    assert "\n" not in str(raised.value) and "by hand" in str(raised.value)
    nodes = node_ids(scene)
    with pytest.raises(InputError, match="different transforms"):
        trainingset.add_case(tmp_path / "set", ct, by_hand, mask)
    assert not (tmp_path / "set" / "manifest.csv").exists() and node_ids(scene) == nodes


def test_annotation_made_by_the_panel_follows_a_transformed_ct(env, tmp_path):
    """The panel's annotation segmentation is created under the CT's transform, so
    a transformed CT can be annotated, and the case holds labels on the CT's voxels."""
    from ILDSegmentationLib.imaging.io import read_ct
    from ILDSegmentationLib.training.annotations import read_annotation

    scene = env.scene
    ct = add_ct(scene)
    transform = _shifted(scene, ct)
    lungs, painted = _painted_labels()
    mask = add_volume(scene, lungs, CT_GEOMETRY, "lungs", "vtkMRMLLabelMapVolumeNode")
    mask.SetAndObserveTransformNodeID(transform.GetID())
    annotation = trainingset.create_annotation_segmentation(scene, ct)
    assert annotation.GetTransformNodeID() == transform.GetID()
    _paint(annotation, ct, painted)
    assert np.array_equal(trainingset.annotation_labels(annotation, ct), painted)
    added = trainingset.add_case(tmp_path / "set", ct, annotation, mask)
    folder = tmp_path / "set" / "cases" / added.case_id
    written = read_ct(folder / "ct.nrrd")
    _, world = nodes.volume_array_and_geometry(ct)
    np.testing.assert_allclose(written.geometry.origin, world.origin, atol=1e-4)  # the CT where it is shown
    labels = read_annotation(folder / "annotation.nrrd", written.geometry, written.array.shape, "case")
    assert np.array_equal(labels, painted)  # ...and the labels on its voxels, not shifted


# ----------------------------------------------------------------------------------
# Item 8: the CT of a case is written without gzip (GUI thread), labels with it
# ----------------------------------------------------------------------------------
def _nrrd_encoding(path: Path) -> str:
    with open(path, "rb") as f:
        header = f.read(2000).split(b"\n\n")[0].decode("ascii", "replace")
    return next(line.split(":", 1)[1].strip() for line in header.splitlines() if line.startswith("encoding:"))


def test_added_case_writes_the_ct_uncompressed_and_the_labels_gzipped(env, tmp_path):
    scene = env.scene
    ct = add_ct(scene)
    lungs, painted = _painted_labels()
    mask = add_volume(scene, lungs, CT_GEOMETRY, "lungs", "vtkMRMLLabelMapVolumeNode")
    annotation = trainingset.create_annotation_segmentation(scene, ct)
    _paint(annotation, ct, painted)
    added = trainingset.add_case(tmp_path / "set", ct, annotation, mask)
    folder = tmp_path / "set" / "cases" / added.case_id
    assert _nrrd_encoding(folder / "ct.nrrd") == "raw"
    assert _nrrd_encoding(folder / "annotation.nrrd") == "gzip"
    assert _nrrd_encoding(folder / "lung_mask.nrrd") == "gzip"


# ----------------------------------------------------------------------------------
# The crop box (panel, Advanced): passed to the engine and to the command
# ----------------------------------------------------------------------------------
def test_crop_box_reaches_the_engine_and_the_command(env, tmp_path):
    from ILDSegmentationLib.engine.modelfile import load_model

    scene = env.scene
    ct = add_ct(scene)
    mask = add_volume(scene, lungs_at(lps_points(CT_GEOMETRY, CT_SHAPE)), CT_GEOMETRY, "lungs",
                      "vtkMRMLLabelMapVolumeNode")
    nodes = node_ids(scene)
    with pytest.raises(ValueError, match="crop_box must be one of"):  # the Inferer got it
        mrml.process(scene, ct, mask, None, model=load_model(device="cpu"), device="cpu", crop_box="box")
    assert node_ids(scene) == nodes
    with pytest.raises(InputError, match="crop box must be one of mask, aerated"):
        SegmentationJob(scene, ct, mask, None, device="cpu", crop_box="box", temp_root=str(tmp_path)).start()
    assert list(tmp_path.iterdir()) == []
    job = SegmentationJob(scene, ct, mask, None, device="cpu", crop_box="aerated", temp_root=str(tmp_path)).start()
    try:
        argv = job.child.argv
        assert argv[argv.index("--crop-box") + 1] == "aerated"
    finally:
        job.cancel()
        assert job.wait(120) == CANCELLED
    assert node_ids(scene) == nodes


# ----------------------------------------------------------------------------------
# Item 4 (the segmentation side): cleanup() of a job still running stops it first
# ----------------------------------------------------------------------------------
@pytest.mark.skipif(os.name == "nt", reason="process groups are POSIX here")
def test_cleanup_of_a_running_job_stops_it_and_removes_its_folder(env, tmp_path):
    """Slicer quitting or reloading the module calls the widget's cleanup(), which
    calls the job's cleanup() with no poll after it: the child must not go on
    writing into a removed folder."""
    scene = env.scene
    ct = add_ct(scene)
    job = SegmentationJob(scene, ct, None, None, device="cpu", temp_root=str(tmp_path)).start()
    pid, folder = job.child.pid, job.folder
    assert folder.is_dir()
    job.cleanup()
    assert not group_alive(pid)
    assert not folder.exists() and list(tmp_path.iterdir()) == []

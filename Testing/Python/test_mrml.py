"""ILDSegmentationLib.slicer.mrml against Slicer's real MRML core (the slicer-core wheel).

No fake slicer, qt or MRML: every node, logic, import/export and storage node here
is Slicer's own C++ code. The whole file is skipped where slicer-core is not
installed (it needs Python >= 3.10; Slicer 5.8 itself runs the same code on 3.9).

The synthetic chest is defined in physical (LPS) space, so the CT and the lung
masks can be sampled on any grid (oblique, sagittally stored, other spacing) and
still describe the same anatomy.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

try:
    import slicer
    import vtk
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip("Slicer's MRML core is not importable (pip install slicer-core, Python >= 3.10); "
                "the same code is exercised inside Slicer by the module's self-test", allow_module_level=True)

from ILDSegmentationLib.slicer import mrml, nodes
from ILDSegmentationLib.classes import CLASSES
from ILDSegmentationLib.errors import Cancelled, DeviceError, InputError, LungMaskError, ModelFileError
from ILDSegmentationLib.imaging.geometry import Geometry, canonical_view
from ILDSegmentationLib.engine.inference import Inferer
from ILDSegmentationLib.terminology import TERMINOLOGY_CONTEXT, parse_terminology_entry, terminology_entry

vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)

REPO = Path(__file__).resolve().parents[2]
TERM_FILE = REPO / "ILDSegmentation" / "Resources" / "ILDSegmentation.term.json"


# ----------------------------------------------------------------------------------
# Synthetic chest in physical space
# ----------------------------------------------------------------------------------
def _rotation(axis: Tuple[float, float, float], degrees: float) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def centred_geometry(direction: np.ndarray, spacing: Tuple[float, float, float], shape_kji: Tuple[int, int, int],
                     centre=(0.0, 0.0, 0.0)) -> Geometry:
    """Grid whose centre voxel sits at ``centre`` (LPS mm)."""
    n_ijk = np.array(shape_kji[::-1], float)
    origin = np.asarray(centre) - direction @ (np.asarray(spacing) * (n_ijk - 1) / 2)
    return Geometry(tuple(spacing), tuple(origin), tuple(direction.ravel()))


def lps_points(geometry: Geometry, shape_kji) -> np.ndarray:
    """LPS coordinates (..., 3) of every voxel centre of a K, J, I grid."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape_kji], indexing="ij")
    ijk = np.stack([i, j, k], -1).astype(float) * np.asarray(geometry.spacing)
    return ijk @ geometry.direction_matrix.T + np.asarray(geometry.origin)


def lungs_at(p: np.ndarray) -> np.ndarray:
    """0 outside, 1 right lung (patient right = -x in LPS), 2 left lung."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    out = np.zeros(p.shape[:-1], np.uint8)
    out[((x + 60) / 45) ** 2 + (y / 75) ** 2 + (z / 200) ** 2 < 1] = 1
    out[((x - 60) / 45) ** 2 + (y / 75) ** 2 + (z / 200) ** 2 < 1] = 2
    return out


def chest_at(p: np.ndarray, seed: int = 0) -> np.ndarray:
    x, y = p[..., 0], p[..., 1]
    hu = np.full(p.shape[:-1], -1000.0)
    hu[(x / 130) ** 2 + (y / 110) ** 2 < 1] = 40.0
    lung = lungs_at(p) > 0
    hu[lung] = -850.0
    rng = np.random.default_rng(seed)
    hu += rng.normal(0, 20, hu.shape)
    # a denser patch inside the right lung so that classes vary a little
    hu[lung & ((x + 60) ** 2 + (y - 20) ** 2 < 20 ** 2)] = -300.0
    return hu.astype(np.int16)


#: The CT of most tests: stored sagittally-ish and oblique. Index axis I runs
#: (nearly) superior, J anterior->posterior, K right->left; rotated 12 degrees, so
#: the direction matrix is oblique and the axial axis is not K.
OBLIQUE_DIRECTION = _rotation((1.0, 0.4, 0.2), 12.0) @ np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
CT_SHAPE = (64, 64, 6)  # K, J, I: 64 columns right->left, 64 rows, 6 axial positions
CT_GEOMETRY = centred_geometry(OBLIQUE_DIRECTION, (5.0, 5.0, 5.0), CT_SHAPE)


# ----------------------------------------------------------------------------------
# Fixtures and helpers
# ----------------------------------------------------------------------------------
@pytest.fixture
def env():
    return mrml.HeadlessMRML()


@pytest.fixture(scope="module")
def model():
    from ILDSegmentationLib.engine.modelfile import load_model
    return load_model(device="cpu")


def add_volume(scene, array: np.ndarray, geometry: Geometry, name: str, cls: str = "vtkMRMLScalarVolumeNode"):
    node = scene.AddNewNodeByClass(cls, name)
    slicer.util.updateVolumeFromArray(node, array)
    nodes.set_volume_geometry(node, geometry)
    node.CreateDefaultDisplayNodes()
    return node


def add_ct(scene, geometry: Geometry = CT_GEOMETRY, shape=CT_SHAPE, name: str = "CT"):
    return add_volume(scene, chest_at(lps_points(geometry, shape)), geometry, name)


def node_ids(scene) -> List[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def snapshot(node) -> Dict[str, object]:
    """What must not change on an input node."""
    m = vtk.vtkMatrix4x4()
    state = {"mtime": node.GetMTime(), "name": node.GetName(), "transform": node.GetTransformNodeID()}
    if node.IsA("vtkMRMLVolumeNode"):
        node.GetIJKToRASMatrix(m)
        state["ijk_to_ras"] = [m.GetElement(r, c) for r in range(4) for c in range(4)]
        state["array"] = slicer.util.arrayFromVolume(node).copy()
        state["image_mtime"] = node.GetImageData().GetMTime()
    if node.IsA("vtkMRMLSegmentationNode"):
        seg = node.GetSegmentation()
        state["segmentation_mtime"] = seg.GetMTime()
        state["segments"] = mrml.segment_ids_of(node)
    return state


def assert_unchanged(before: Dict[str, object], node) -> None:
    after = snapshot(node)
    assert set(before) == set(after)
    for key, value in before.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(value, after[key]), key
        else:
            assert value == after[key], key


def export_labels(env, segmentation_node, reference_node) -> np.ndarray:
    """The segmentation as a K, J, I label map on the reference grid, label value =
    class label (segments exported in class order by Slicer's own export)."""
    return nodes.segments_to_array(segmentation_node, [c.segment_id for c in CLASSES], reference_node)


def expected_labels(model, ct_node, mask: np.ndarray) -> np.ndarray:
    hu, geometry = nodes.volume_array_and_geometry(ct_node)
    # process() runs the model's whole-lung decision rule by default, as the panel does.
    return Inferer(model, device="cpu", decision="auto").segment(hu, mask, geometry).labels


# ----------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------
def test_oblique_ct_geometry_ras_to_lps_and_axial_axis(env):
    ct = add_ct(env.scene)
    hu, geometry = nodes.volume_array_and_geometry(ct)
    assert hu.shape == CT_SHAPE
    np.testing.assert_allclose(geometry.spacing, CT_GEOMETRY.spacing, atol=1e-9)
    np.testing.assert_allclose(geometry.origin, CT_GEOMETRY.origin, atol=1e-6)
    np.testing.assert_allclose(geometry.direction, CT_GEOMETRY.direction, atol=1e-9)
    # MRML holds RAS: x and y of origin and directions are negated
    m = vtk.vtkMatrix4x4()
    ct.GetIJKToRASMatrix(m)
    assert m.GetElement(0, 3) == pytest.approx(-CT_GEOMETRY.origin[0])
    assert m.GetElement(1, 3) == pytest.approx(-CT_GEOMETRY.origin[1])
    assert m.GetElement(2, 3) == pytest.approx(CT_GEOMETRY.origin[2])
    # the axial axis is I (numpy axis 2), not K
    assert canonical_view(geometry).axes[0] == 2
    # the array is a copy: writing it leaves the node alone
    hu[:] = 0
    assert slicer.util.arrayFromVolume(ct).any()


def test_geometry_matches_simpleitk_reading_of_the_saved_volume(env, tmp_path):
    """An independent check of the RAS -> LPS conversion: Slicer writes the node,
    SimpleITK (LPS) reads it back, both geometries must agree."""
    from ILDSegmentationLib.imaging.io import read_ct

    ct = add_ct(env.scene)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(tmp_path / "ct.nrrd"))
    assert storage.WriteData(ct)
    read = read_ct(tmp_path / "ct.nrrd")
    hu, geometry = nodes.volume_array_and_geometry(ct)
    assert np.array_equal(read.array, hu)
    np.testing.assert_allclose(read.geometry.spacing, geometry.spacing, atol=1e-5)
    np.testing.assert_allclose(read.geometry.origin, geometry.origin, atol=1e-4)
    np.testing.assert_allclose(read.geometry.direction, geometry.direction, atol=1e-5)


def test_linear_parent_transform_is_applied(env):
    ct = add_ct(env.scene)
    transform = env.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 10.0)  # 10 mm towards R = -10 mm in LPS x
    transform.SetMatrixTransformToParent(m)
    ct.SetAndObserveTransformNodeID(transform.GetID())
    _, geometry = nodes.volume_array_and_geometry(ct)
    assert geometry.origin[0] == pytest.approx(CT_GEOMETRY.origin[0] - 10.0)


def test_transformed_ct_is_segmented_where_it_is_shown(env, model):
    """A CT under a linear transform (e.g. after registration): the lung mask is
    matched in world space and the output lies over the CT as displayed."""
    scene = env.scene
    ct = add_ct(scene)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 12.0)
    m.SetElement(2, 3, -7.0)
    transform.SetMatrixTransformToParent(m)
    ct.SetAndObserveTransformNodeID(transform.GetID())
    _, world = nodes.volume_array_and_geometry(ct)
    lungs = lungs_at(lps_points(CT_GEOMETRY, CT_SHAPE))  # the lungs of the CT's own voxels...
    mask_node = add_volume(scene, lungs, world, "lungs in world space", "vtkMRMLLabelMapVolumeNode")  # ...placed
    assert np.array_equal(nodes.lung_mask_from_node(mask_node, ct), (lungs > 0).astype(np.uint8))
    result = mrml.process(scene, ct, mask_node, None, model=model, device="cpu")
    labels = export_labels(env, result.segmentation_node, mask_node)  # mask_node has the world grid
    assert np.array_equal(labels > 0, lungs > 0)


# ----------------------------------------------------------------------------------
# Lung masks
# ----------------------------------------------------------------------------------
def test_label_map_mask_on_another_grid_is_resampled(env):
    ct = add_ct(env.scene)
    expected = (lungs_at(lps_points(CT_GEOMETRY, CT_SHAPE)) > 0)
    # mask on an axis-aligned, finer, differently sized grid, shifted by half a voxel
    mask_shape = (20, 90, 90)
    mask_geometry = centred_geometry(np.eye(3), (3.7, 3.7, 2.5), mask_shape, centre=(1.8, -1.2, 0.9))
    mask_node = add_volume(env.scene, lungs_at(lps_points(mask_geometry, mask_shape)), mask_geometry,
                           "lungs", "vtkMRMLLabelMapVolumeNode")
    before = snapshot(mask_node)
    mask = nodes.lung_mask_from_node(mask_node, ct)
    assert mask.shape == CT_SHAPE and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    disagree = (mask > 0) != expected
    # nearest neighbour from a ~4 mm grid: only boundary voxels may differ
    assert disagree.sum() < 0.08 * expected.sum()
    assert_unchanged(before, mask_node)


def test_label_map_mask_on_the_same_grid_is_taken_as_is(env):
    ct = add_ct(env.scene)
    lungs = lungs_at(lps_points(CT_GEOMETRY, CT_SHAPE))
    mask_node = add_volume(env.scene, lungs, CT_GEOMETRY, "lungs", "vtkMRMLLabelMapVolumeNode")
    assert np.array_equal(nodes.lung_mask_from_node(mask_node, ct), (lungs > 0).astype(np.uint8))


def test_label_map_mask_that_misses_the_ct_is_refused(env):
    ct = add_ct(env.scene)
    far = centred_geometry(np.eye(3), (5.0, 5.0, 5.0), (10, 64, 64), centre=(0.0, 0.0, 2000.0))
    mask_node = add_volume(env.scene, np.ones((10, 64, 64), np.uint8), far, "far", "vtkMRMLLabelMapVolumeNode")
    with pytest.raises(LungMaskError, match="does not overlap"):
        nodes.lung_mask_from_node(mask_node, ct)
    empty = add_volume(env.scene, np.zeros(CT_SHAPE, np.uint8), CT_GEOMETRY, "empty", "vtkMRMLLabelMapVolumeNode")
    with pytest.raises(LungMaskError, match="empty"):
        nodes.lung_mask_from_node(empty, ct)


def _lung_segmentation(env, ct, name: str = "lung segmentation"):
    """Segments right, left and an 'airway' blob that is not lung."""
    labels = lungs_at(lps_points(CT_GEOMETRY, CT_SHAPE))
    airway = np.zeros(CT_SHAPE, bool)
    airway[30:34, 10:14, :] = True
    labels[airway & (labels == 0)] = 3
    seg = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    for sid in ("right", "left", "airway"):
        assert seg.GetSegmentation().AddEmptySegment(sid, sid) == sid
    temporary = slicer.vtkMRMLLabelMapVolumeNode()
    temporary.CopyOrientation(ct)
    slicer.util.updateVolumeFromArray(temporary, labels)
    ids = vtk.vtkStringArray()
    for sid in ("right", "left", "airway"):
        ids.InsertNextValue(sid)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(temporary, seg, ids)
    return seg, labels


def test_segmentation_mask_with_chosen_segments(env):
    ct = add_ct(env.scene)
    seg, labels = _lung_segmentation(env, ct)
    before, scene_before = snapshot(seg), node_ids(env.scene)
    mask = nodes.lung_mask_from_node(seg, ct, ["right", "left"])
    assert np.array_equal(mask > 0, (labels == 1) | (labels == 2))
    everything = nodes.lung_mask_from_node(seg, ct)  # default: all segments
    assert np.array_equal(everything > 0, labels > 0)
    with pytest.raises(InputError, match="not found"):
        nodes.lung_mask_from_node(seg, ct, ["right", "nonsense"])
    with pytest.raises(InputError, match="no lung segment"):
        nodes.lung_mask_from_node(seg, ct, [])
    # neither the segmentation nor the scene changed (the export used a private scene)
    assert_unchanged(before, seg)
    assert node_ids(env.scene) == scene_before


# ----------------------------------------------------------------------------------
# The whole job
# ----------------------------------------------------------------------------------
def test_process_with_label_map_on_another_grid(env, model):
    scene = env.scene
    ct = add_ct(scene)
    mask_shape = (20, 90, 90)
    mask_geometry = centred_geometry(np.eye(3), (3.7, 3.7, 2.5), mask_shape)
    mask_node = add_volume(scene, lungs_at(lps_points(mask_geometry, mask_shape)), mask_geometry, "lungs",
                           "vtkMRMLLabelMapVolumeNode")
    ct_before, mask_before = snapshot(ct), snapshot(mask_node)
    messages = []
    result = mrml.process(scene, ct, mask_node, None, model=model, device="cpu",
                          progress=lambda f, m: messages.append((f, m)))
    seg = result.segmentation_node
    # the labels in the scene are exactly the engine's on the resampled mask
    want = expected_labels(model, ct, nodes.lung_mask_from_node(mask_node, ct))
    assert np.array_equal(export_labels(env, seg, ct), want)
    # six segments, fixed IDs, class names and colors, terminology, reference geometry
    assert mrml.segment_ids_of(seg) == [c.segment_id for c in CLASSES]
    for c in CLASSES:
        segment = seg.GetSegmentation().GetSegment(c.segment_id)
        assert segment.GetName() == c.name
        np.testing.assert_allclose(segment.GetColor(), c.color, atol=1e-6)
        assert mrml.segment_tag(segment, slicer.vtkSegment.GetTerminologyEntryTagName()) == terminology_entry(c)
    assert seg.GetNodeReference(mrml.RESULTS_TABLE_ROLE) is result.table_node
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()) is ct  # Segment Editor source
    assert seg.GetAttribute("ILDSegmentation.Model") == model.info.name
    assert "lungs" in result.lung_mask_source
    # progress is monotonic and reaches 1
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("slice" in m for _, m in messages)
    assert_unchanged(ct_before, ct)
    assert_unchanged(mask_before, mask_node)


def test_process_with_segmentation_mask_keeps_inputs(env, model):
    ct = add_ct(env.scene)
    seg_in, labels = _lung_segmentation(env, ct)
    ct_before, seg_before = snapshot(ct), snapshot(seg_in)
    result = mrml.process(env.scene, ct, seg_in, None, model=model, device="cpu", segment_ids=["right", "left"])
    lung = (labels == 1) | (labels == 2)
    out = export_labels(env, result.segmentation_node, ct)
    assert np.array_equal(out > 0, lung)
    assert "right, left" in result.lung_mask_source
    assert_unchanged(ct_before, ct)
    assert_unchanged(seg_before, seg_in)
    with pytest.raises(InputError, match="cannot be the lung mask"):
        mrml.process(env.scene, ct, seg_in, seg_in, model=model, device="cpu")


def test_results_table_is_voxel_count_times_voxel_volume(env, model):
    ct = add_ct(env.scene)
    mask_node = add_volume(env.scene, lungs_at(lps_points(CT_GEOMETRY, CT_SHAPE)), CT_GEOMETRY, "lungs",
                           "vtkMRMLLabelMapVolumeNode")
    result = mrml.process(env.scene, ct, mask_node, None, model=model, device="cpu")
    labels = export_labels(env, result.segmentation_node, ct)
    voxel_ml = float(np.prod(CT_GEOMETRY.spacing)) / 1000.0
    rows = mrml.results_from_table(result.table_node)
    assert [r[mrml.COL_SEGMENT] for r in rows] == [c.name for c in CLASSES] + [mrml.TOTAL_ROW_NAME]
    lung_voxels = int((labels > 0).sum())
    assert lung_voxels == int((nodes.lung_mask_from_node(mask_node, ct) > 0).sum())
    for c, row in zip(CLASSES, rows):
        n = int((labels == c.label).sum())
        assert row[mrml.COL_VOXELS] == n
        assert row[mrml.COL_VOLUME] == pytest.approx(n * voxel_ml, rel=1e-12)
        assert row[mrml.COL_PERCENT] == pytest.approx(100.0 * n / lung_voxels, rel=1e-12)
    total = rows[-1]
    assert total[mrml.COL_VOXELS] == lung_voxels
    assert total[mrml.COL_VOLUME] == pytest.approx(lung_voxels * voxel_ml, rel=1e-12)
    assert sum(r[mrml.COL_PERCENT] for r in rows[:-1]) == pytest.approx(100.0)
    assert result.table_node.GetColumnUnitLabel(mrml.COL_VOLUME) == "mL"


def test_segments_survive_seg_nrrd_save_and_reload(env, model, tmp_path):
    import copy
    import torch
    # Reticulation and honeycombing made impossible, so two segments are surely empty.
    never = copy.deepcopy(model)
    with torch.no_grad():
        never.network.classifier.bias[4:] = -1e4
    ct = add_ct(env.scene)
    mask_node = add_volume(env.scene, lungs_at(lps_points(CT_GEOMETRY, CT_SHAPE)), CT_GEOMETRY, "lungs",
                           "vtkMRMLLabelMapVolumeNode")
    result = mrml.process(env.scene, ct, mask_node, None, model=never, device="cpu")
    seg = result.segmentation_node
    labels = export_labels(env, seg, ct)
    present = set(np.unique(labels)) - {0}
    assert present and present.isdisjoint({5, 6}), "two classes left empty"
    path = str(tmp_path / "ild.seg.nrrd")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(path)
    assert storage.WriteData(seg)
    reloaded = env.segmentations_logic.LoadSegmentationFromFile(path, False, "reloaded")
    assert reloaded is not None
    segmentation = reloaded.GetSegmentation()
    assert mrml.segment_ids_of(reloaded) == [c.segment_id for c in CLASSES]  # empty classes kept
    for c in CLASSES:
        segment = segmentation.GetSegment(c.segment_id)
        assert segment.GetName() == c.name
        np.testing.assert_allclose(segment.GetColor(), c.color, atol=1e-4)
        assert segment.GetLabelValue() == c.label
        entry = mrml.segment_tag(segment, slicer.vtkSegment.GetTerminologyEntryTagName())
        codes = parse_terminology_entry(entry)
        assert codes["context"] == TERMINOLOGY_CONTEXT
        assert codes["type"] == c.type_code and codes["type_modifier"] == c.type_modifier
    assert np.array_equal(export_labels(env, reloaded, ct), labels)


def test_terminology_file_resolves_every_segment_entry(env):
    assert mrml.load_terminology(env.terminologies_logic, str(TERM_FILE)) == TERMINOLOGY_CONTEXT
    logic = env.terminologies_logic
    category = slicer.vtkSlicerTerminologyCategory()
    assert logic.GetNthCategoryInTerminology(TERMINOLOGY_CONTEXT, 0, category)
    assert (category.GetCodingSchemeDesignator(), category.GetCodeValue()) == ("SCT", "49755003")
    for c in CLASSES:
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(terminology_entry(c), entry)
        found = entry.GetTypeObject()
        assert (found.GetCodingSchemeDesignator(), found.GetCodeValue()) == c.type_code[:2]
        # the file's recommended color is the class color (on the modifier for Healthy)
        by_label = slicer.vtkSlicerTerminologyEntry()
        assert logic.FindTypeInTerminologyBy3dSlicerLabel(TERMINOLOGY_CONTEXT, c.name, by_label)
        coded = by_label.GetTypeModifierObject() if c.type_modifier else by_label.GetTypeObject()
        assert tuple(coded.GetRecommendedDisplayRGBValue()) == c.color_uint8


def test_second_run_updates_the_same_nodes(env, model):
    scene = env.scene
    ct = add_ct(scene)
    mask_node = add_volume(scene, lungs_at(lps_points(CT_GEOMETRY, CT_SHAPE)), CT_GEOMETRY, "lungs",
                           "vtkMRMLLabelMapVolumeNode")
    first = mrml.process(scene, ct, mask_node, None, model=model, device="cpu", probabilities=True)
    assert len(first.probability_nodes) == 6
    ids_after_first = node_ids(scene)
    seg = first.segmentation_node
    # the user edits the output: renames a segment, deletes another
    seg.GetSegmentation().GetSegment("healthy").SetName("renamed")
    seg.GetSegmentation().RemoveSegment("honeycombing")
    # second run, smaller mask (one lung): same nodes, updated content
    one_lung = (lungs_at(lps_points(CT_GEOMETRY, CT_SHAPE)) == 1).astype(np.uint8)
    slicer.util.updateVolumeFromArray(mask_node, one_lung)
    second = mrml.process(scene, ct, mask_node, seg, model=model, device="cpu", probabilities=True)
    assert node_ids(scene) == ids_after_first
    assert second.segmentation_node is seg
    assert second.table_node is first.table_node
    assert [n.GetID() for n in second.probability_nodes] == [n.GetID() for n in first.probability_nodes]
    assert second.created_node_ids == []
    assert mrml.segment_ids_of(seg) == [c.segment_id for c in CLASSES]
    assert seg.GetSegmentation().GetSegment("healthy").GetName() == "Healthy"
    labels = export_labels(env, seg, ct)
    assert np.array_equal(labels > 0, one_lung > 0)
    rows = mrml.results_from_table(second.table_node)
    assert rows[-1][mrml.COL_VOXELS] == int(one_lung.sum())
    # probabilities sum to one inside the lung, zero outside
    probs = np.stack([slicer.util.arrayFromVolume(n) for n in second.probability_nodes], -1)
    np.testing.assert_allclose(probs.sum(-1)[one_lung > 0], 1.0, atol=1e-4)
    assert not probs[one_lung == 0].any()
    # a run without probabilities removes the stale maps (and their display nodes)
    third = mrml.process(scene, ct, mask_node, seg, model=model, device="cpu")
    assert third.probability_nodes == []
    assert seg.GetNumberOfNodeReferences(mrml.PROBABILITY_ROLE) == 0
    assert len(node_ids(scene)) == len(ids_after_first) - 12


def _cancel_when(predicate):
    event = threading.Event()

    def progress(fraction: float, message: str) -> None:
        if predicate(message):
            event.set()  # as the Cancel button does while the panel processes events
    return event, progress


@pytest.mark.parametrize("stage", ["lung mask", "network", "last moment"])
def test_cancel_leaves_the_scene_as_it_was(env, model, stage):
    scene = env.scene
    ct = add_ct(scene)
    mask_node = add_volume(scene, lungs_at(lps_points(CT_GEOMETRY, CT_SHAPE)), CT_GEOMETRY, "lungs",
                           "vtkMRMLLabelMapVolumeNode")
    previous = mrml.process(scene, ct, mask_node, None, model=model, device="cpu")
    seg = previous.segmentation_node
    ids = node_ids(scene)
    labels_before = export_labels(env, seg, ct)
    seg_mtime, table_mtime = seg.GetSegmentation().GetMTime(), previous.table_node.GetMTime()
    ct_before, mask_before = snapshot(ct), snapshot(mask_node)
    predicate = {"lung mask": lambda m: m.startswith("Lung mask"),
                 "network": lambda m: "slice" in m,
                 "last moment": lambda m: m.startswith("Creating")}[stage]
    for output in (None, seg):  # a new output, and overwriting the existing one
        event, progress = _cancel_when(predicate)
        with pytest.raises(Cancelled):
            mrml.process(scene, ct, None if stage == "lung mask" else mask_node, output, model=model,
                         device="cpu", progress=progress, cancel=event, probabilities=True)
        assert event.is_set()
        assert node_ids(scene) == ids
        assert seg.GetSegmentation().GetMTime() == seg_mtime
        assert previous.table_node.GetMTime() == table_mtime
        assert np.array_equal(export_labels(env, seg, ct), labels_before)
        assert_unchanged(ct_before, ct)
        assert_unchanged(mask_before, mask_node)


def test_bad_inputs_change_nothing(env, model, tmp_path):
    scene = env.scene
    ct = add_ct(scene)
    lungs = lungs_at(lps_points(CT_GEOMETRY, CT_SHAPE))
    mask_node = add_volume(scene, lungs, CT_GEOMETRY, "lungs", "vtkMRMLLabelMapVolumeNode")
    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    slicer.util.updateVolumeFromArray(vector, np.zeros((4, 8, 8, 3), np.uint8))
    coronal = add_volume(scene, np.zeros((1, 64, 64), np.int16),  # K runs A-P: one coronal slice
                         Geometry((1.0, 1.0, 1.0), direction=(1, 0, 0, 0, 0, 1, 0, 1, 0)), "coronal slice")
    empty = add_volume(scene, np.zeros(CT_SHAPE, np.uint8), CT_GEOMETRY, "empty", "vtkMRMLLabelMapVolumeNode")
    far = add_volume(scene, np.ones((4, 8, 8), np.uint8),
                     centred_geometry(np.eye(3), (5.0, 5.0, 5.0), (4, 8, 8), centre=(0, 0, 5000)), "far",
                     "vtkMRMLLabelMapVolumeNode")
    bad_model = tmp_path / "broken.safetensors"
    bad_model.write_bytes(b"not a model")
    ids = node_ids(scene)
    cases = [
        (dict(ct_node=None), InputError, "no CT"),
        (dict(ct_node=mask_node), InputError, "label map, not a CT"),
        (dict(ct_node=vector), InputError, "components per voxel"),
        (dict(ct_node=coronal), InputError, "single sagittal or coronal slice"),
        (dict(lung_mask_node=empty), LungMaskError, "empty"),
        (dict(lung_mask_node=far), LungMaskError, "does not overlap"),
        (dict(lung_mask_node=mask_node, model=str(bad_model)), ModelFileError, "broken.safetensors"),
        (dict(lung_mask_node=mask_node, model=str(tmp_path / "missing.safetensors")), ModelFileError, "not found"),
    ]
    for kwargs, error, text in cases:
        args = dict(ct_node=ct, lung_mask_node=None, output_segmentation_node=None, model=model, device="cpu")
        args.update(kwargs)
        with pytest.raises(error, match=text):
            mrml.process(scene, **args)
        assert node_ids(scene) == ids


def test_out_of_gpu_memory_error_changes_nothing(env, model, monkeypatch):
    """Out of GPU memory the engine halves its batches (tested with the engine); when
    it finally gives up (cpu_fallback=False, as the Slicer panel asks, to offer the
    CPU) the error reaches the caller and the scene is unchanged. No GPU here: the
    engine is replaced by one that reports the engine's error."""
    import ILDSegmentationLib.engine.inference as inference

    seen = {}

    class OutOfMemoryInferer(inference.Inferer):
        def __init__(self, loaded, device="auto", max_memory_mb=1024, mixed_precision=True, cpu_fallback=True,
                     pixel_spacing="model", crop_box="mask", decision="paper"):
            seen.update(device=device, max_memory_mb=max_memory_mb, cpu_fallback=cpu_fallback)
            super().__init__(loaded, device="cpu", max_memory_mb=max_memory_mb)

        def segment(self, *args, **kwargs):
            raise DeviceError("out of GPU memory even for a single lung crop; run with --device cpu")

    monkeypatch.setattr(inference, "Inferer", OutOfMemoryInferer)
    ct = add_ct(env.scene)
    mask_node = add_volume(env.scene, lungs_at(lps_points(CT_GEOMETRY, CT_SHAPE)), CT_GEOMETRY, "lungs",
                           "vtkMRMLLabelMapVolumeNode")
    ids = node_ids(env.scene)
    with pytest.raises(DeviceError, match="out of GPU memory"):
        mrml.process(env.scene, ct, mask_node, None, model=model, device="cpu", max_memory_mb=256,
                     cpu_fallback=False)
    assert seen == {"device": "cpu", "max_memory_mb": 256, "cpu_fallback": False}
    assert node_ids(env.scene) == ids


def test_automatic_lung_mask_and_hierarchy(env, model):
    """No mask given: the library's lung mask is computed; outputs go next to the CT
    in the subject hierarchy."""
    scene = env.scene
    ct = add_ct(scene)
    sh = scene.GetSubjectHierarchyNode()
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "patient"), "study")
    sh.CreateItem(study, ct)  # the application's plugins would do this on loading
    result = mrml.process(scene, ct, None, None, model=model, device="cpu")
    assert result.lung_mask_source == "computed automatically"
    lungs = lungs_at(lps_points(CT_GEOMETRY, CT_SHAPE)) > 0
    labels = export_labels(env, result.segmentation_node, ct)
    overlap = ((labels > 0) & lungs).sum() / lungs.sum()
    assert overlap > 0.8
    for node in (result.segmentation_node, result.table_node):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study


REAL_CT = Path(os.environ.get("ILDSEG_TEST_DATA", REPO.parent / "shared" / "data")) / "ricord-000082" / \
    "ricord-000082-5mm.nii.gz"


def test_real_ct_through_mrml(env, model, tmp_path):
    """A real chest CT (a few slices of it, to stay fast on a CPU): Slicer's storage
    node reads the file, the automatic lung mask finds lungs, the segmentation is
    written and the table adds up."""
    if not REAL_CT.exists():
        pytest.skip(f"real CT not available at {REAL_CT} (set ILDSEG_TEST_DATA to the shared data folder)")
    import SimpleITK as sitk

    image = sitk.ReadImage(str(REAL_CT))
    middle = image.GetSize()[2] // 2
    part = image[:, :, middle - 2:middle + 2]
    path = str(tmp_path / "part.nrrd")
    sitk.WriteImage(part, path)
    ct = env.volumes_logic.AddArchetypeVolume(path, "ricord", 0)
    assert ct is not None
    result = mrml.process(env.scene, ct, None, None, model=model, device="cpu")
    rows = mrml.results_from_table(result.table_node)
    voxel_ml = float(np.prod(part.GetSpacing())) / 1000.0
    assert rows[-1][mrml.COL_VOLUME] == pytest.approx(rows[-1][mrml.COL_VOXELS] * voxel_ml)
    assert rows[-1][mrml.COL_VOLUME] > 100  # two lungs over 2 cm of height
    labels = export_labels(env, result.segmentation_node, ct)
    assert labels.shape == sitk.GetArrayViewFromImage(part).shape


# ----------------------------------------------------------------------------------
# What the panel derives from its parameter node (issue 14, defects 1, 3 and 4)
# ----------------------------------------------------------------------------------
def test_lung_segment_ids_follow_the_chosen_lung_mask(env):
    ct = add_ct(env.scene)
    first, _ = _lung_segmentation(env, ct, "first")
    for sid, name in (("right", "Right lung"), ("left", "Left lung"), ("airway", "Airway")):
        first.GetSegmentation().GetSegment(sid).SetName(name)
    second = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "second")
    for sid, name in (("Segment_1", "lungs"), ("Segment_2", "heart")):
        assert second.GetSegmentation().AddEmptySegment(sid, name) == sid
    label_map = add_volume(env.scene, lungs_at(lps_points(CT_GEOMETRY, CT_SHAPE)), CT_GEOMETRY, "lungs",
                           "vtkMRMLLabelMapVolumeNode")
    # nothing to choose without a mask or with a label map
    assert mrml.lung_segment_ids_for(None, ["right"]) is None
    assert mrml.lung_segment_ids_for(label_map, ["right"]) is None
    # a newly chosen segmentation: its lung-named segments
    assert mrml.lung_segment_ids_for(first, []) == ["right", "left"]
    # a choice that fits (e.g. saved with the scene) is kept
    assert mrml.lung_segment_ids_for(first, ["right", "left", "airway"]) == ["right", "left", "airway"]
    # moving to another segmentation with other segment IDs: its own lung segments
    assert mrml.lung_segment_ids_for(second, ["right", "left"]) == ["Segment_1"]
    assert mrml.lung_segment_ids_for(first, ["Segment_1"]) == ["right", "left"]
    # no segment named lung: all of them
    for sid in ("Segment_1", "Segment_2"):
        second.GetSegmentation().GetSegment(sid).SetName("part " + sid)
    assert mrml.default_lung_segment_ids(second) == ["Segment_1", "Segment_2"]


def test_output_of_one_ct_does_not_fit_another(env, model):
    scene = env.scene
    ct = add_ct(scene, name="first CT")
    other = add_ct(scene, name="second CT")
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    assert not mrml.has_segments(None) and not mrml.has_segments(empty)
    assert mrml.output_fits_input(empty, ct) and mrml.output_fits_input(empty, other)
    assert mrml.output_fits_input(None, ct)
    result = mrml.process(scene, ct, None, None, model=model, device="cpu")
    seg = result.segmentation_node
    assert mrml.has_segments(seg)
    assert mrml.results_input_volume(seg).GetID() == ct.GetID()
    assert mrml.output_fits_input(seg, ct)
    assert not mrml.output_fits_input(seg, other)

"""The Slicer logic of "Compare with an earlier scan" (ILDSegmentationLib/slicer/compare.py)
on the real MRML core (slicer-core wheel) and real CC BY CT (a 60 mm slab of
tcga-luad-tcga-17-z015 and the same slab moved): the background child runs ``ildseg
compare``, the change map comes back as a segmentation node, the change as a table."""
from __future__ import annotations

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")
slicer = pytest.importorskip("slicer", reason="Slicer's MRML core is not importable (pip install slicer-core, "
                             "Python >= 3.10)")

from conftest import DATA, _need  # noqa: E402
from ILDSegmentationLib.slicer import mrml  # noqa: E402
from ILDSegmentationLib.slicer import nodes as slicer_nodes  # noqa: E402
from ILDSegmentationLib.slicer.background import SUCCEEDED  # noqa: E402
from ILDSegmentationLib.errors import InputError  # noqa: E402
from ILDSegmentationLib.imaging.geometry import Geometry  # noqa: E402
from ILDSegmentationLib.slicer.compare import TABLE_COLUMNS, CompareJob, describe_change, link_views  # noqa: E402
from test_mrml import add_volume, assert_unchanged, snapshot  # noqa: E402

Z015 = DATA / "tcga-luad-tcga-17-z015" / "tcga-luad-tcga-17-z015.nrrd"


@pytest.fixture(scope="module")
def scans():
    from ILDSegmentationLib.imaging.lungmask import compute_lung_mask
    from ILDSegmentationLib.simulation.followup import motion, moved_scan, shifted_grid
    full = sitk.ReadImage(str(_need(Z015)))
    n = full.GetSize()[2]
    grid = shifted_grid(full, 0.0, (n - 12) // 2, 12)
    base = moved_scan(full, grid, sitk.Transform())[0]
    moved = moved_scan(full, grid, motion(full, (2.0, 1.0, 3.0), (3.0, -2.0, 4.0)))[0]
    out = []
    for img in (base, moved):
        hu = sitk.GetArrayFromImage(img)
        g = Geometry.from_sitk(img)
        out.append((hu, g, compute_lung_mask(hu, g)))
    return out


def _scene_with_segmented_scans(scans):
    """A scene with both CTs and an earlier "Segment ILD" result of each, to reuse: all
    lung healthy (no network needed here). Returns the scene and [(CT, segmentation)]."""
    scene = mrml.HeadlessMRML().scene
    nodes = []
    for name, (hu, g, lung) in zip(("baseline", "follow-up"), scans):
        ct = add_volume(scene, hu, g, f"{name} CT")
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} ILD")
        mrml.write_labels_to_segmentation((lung != 0).astype(np.uint8), ct, seg)
        nodes.append((ct, seg))
    return scene, nodes


def test_compare_job_loads_the_change_map_and_table(scans, tmp_path):
    scene, nodes = _scene_with_segmented_scans(scans)
    before = [snapshot(ct) for ct, _ in nodes]
    count = scene.GetNumberOfNodes()
    job = CompareJob(scene, nodes[0][0], nodes[1][0], baseline_segmentation=nodes[0][1],
                     followup_segmentation=nodes[1][1], device="cpu", temp_root=str(tmp_path)).start()
    assert job.wait(600) == SUCCEEDED, job.error
    result = job.finish()
    assert result.summary["registration"]["lung_dice_affine"] > 0.9
    assert result.summary["fibrotic_extent"] == {**result.summary["fibrotic_extent"], "baseline": 0.0,
                                                 "followup": 0.0, "change": 0.0}
    seg = result.segmentation_node
    ids = seg.GetSegmentation().GetSegmentIDs()
    assert "change_1" in ids and "change_15" in ids and "change_25" in ids
    assert seg.GetSegmentation().GetSegment("change_15").GetName() == "Reticulation, new"
    # Healthy-unchanged covers most of the baseline lung.
    healthy = slicer_nodes.segments_to_array(seg, ["change_1"], nodes[0][0])
    assert healthy.sum() > 0.8 * np.count_nonzero(scans[0][2])
    table = result.table_node.GetTable()
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == list(TABLE_COLUMNS)
    # Whole lung, 2 lungs, 6 side x zone regions, 2 depths; 6 classes + the fibrotic extent each.
    assert table.GetValueByName(0, "Region").ToString() == "lung" and table.GetNumberOfRows() == 11 * 7
    assert scene.GetNumberOfNodes() > count

    # The follow-up, registered: on the baseline's grid, and the same anatomy there (the
    # follow-up is the baseline's slab moved, so the two agree within the lung).
    follow = result.registered_followup_node
    assert follow is not None and follow.GetName() == "follow-up CT on baseline CT"
    on_base, g = slicer_nodes.volume_array_and_geometry(follow)
    base_hu, base_g, base_lung = scans[0]
    assert on_base.shape == base_hu.shape
    np.testing.assert_allclose(g.origin, base_g.origin, atol=1e-3)
    np.testing.assert_allclose(g.spacing, base_g.spacing, atol=1e-4)
    inner = (base_lung != 0)
    inner[:2] = inner[-2:] = False  # the slab's first and last slices are partly outside the moved slab
    moved_hu = slicer_nodes.volume_array_and_geometry(nodes[1][0])[0]
    registered = np.corrcoef(on_base[inner], base_hu[inner])[0, 1]
    unregistered = np.corrcoef(moved_hu[inner], base_hu[inner])[0, 1]
    print(f"HU correlation with the baseline in its lung: registered {registered:.3f}, unregistered {unregistered:.3f}")
    # Twice-interpolated noise keeps it below 1; a wrong grid or an unregistered scan falls far below.
    assert registered > 0.7 and registered > unregistered + 0.3

    # Side by side, linked: baseline left, registered follow-up right.
    layout = scene.AddNewNodeByClass("vtkMRMLLayoutNode")
    composites, views = {}, {}
    for name in ("Red", "Yellow", "Green"):
        composites[name] = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composites[name].SetLayoutName(name)
        views[name] = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        views[name].SetLayoutName(name)
    # As in Slicer's conventional layout: the side-by-side one does not reorient
    # existing views, and linked views follow each other only in the same orientation.
    views["Yellow"].SetOrientationToSagittal()
    views["Green"].SetOrientationToCoronal()
    assert result.baseline_node is nodes[0][0]
    link_views(scene, result)
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
    assert composites["Red"].GetBackgroundVolumeID() == nodes[0][0].GetID()
    assert composites["Yellow"].GetBackgroundVolumeID() == follow.GetID()
    assert composites["Red"].GetLinkedControl() and composites["Yellow"].GetLinkedControl()
    assert composites["Green"].GetBackgroundVolumeID() is None and not composites["Green"].GetLinkedControl()
    assert [views[n].GetOrientation() for n in ("Red", "Yellow", "Green")] == ["Axial", "Axial", "Coronal"]

    lines = describe_change(result.summary)
    assert lines[0].startswith("Fibrotic extent (reticulation + honeycombing): 0.0 % -> 0.0 %")
    assert "within what the tool measures when nothing changed" in lines[0]
    assert "No class changed beyond its minimum detectable change." in lines

    for b, (ct, _) in zip(before, nodes):
        assert_unchanged(b, ct)
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone


def test_describe_change_names_a_significant_change_and_the_warnings():
    summary = {"fibrotic_extent": {"baseline": 2.0, "followup": 5.5, "change": 3.5, "significant": True,
                                   "mdc_percent_points": 0.6},
               "classes": [{"name": "Reticulation", "baseline_percent": 1.5, "followup_percent": 4.0,
                            "change_percent_points": 2.5, "change_ml": 80.0, "significant": True},
                           {"name": "Healthy", "baseline_percent": 90.0, "followup_percent": 88.0,
                            "change_percent_points": -2.0, "change_ml": -50.0, "significant": False}],
               "registration": {"lung_dice": 0.97}, "lung": {"baseline_ml": 4000.0, "followup_ml": 3800.0},
               "warnings": ["pair: slice_thickness: baseline 1 mm, follow-up 5 mm"]}
    lines = describe_change(summary)
    assert "+3.5 percentage points: beyond" in lines[0]
    assert lines[1] == "Reticulation: 1.5 % -> 4.0 % (+2.5 pp, +80 mL), significant"
    assert not any(line.startswith("Healthy") for line in lines)
    assert lines[-2] == "Registration: lung overlap (Dice) 0.970; lung 4000 -> 3800 mL."
    assert lines[-1] == "Warning: pair: slice_thickness: baseline 1 mm, follow-up 5 mm"


def test_compare_job_refuses_bad_nodes_before_starting(scans, tmp_path):
    env = mrml.HeadlessMRML()
    hu, g, _ = scans[0]
    ct = add_volume(env.scene, hu, g, "CT")
    with pytest.raises(InputError, match="same volume"):
        CompareJob(env.scene, ct, ct, temp_root=str(tmp_path)).start()
    other = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "not ILD")
    with pytest.raises(InputError, match="not an ILD segmentation"):
        CompareJob(env.scene, ct, add_volume(env.scene, hu, g, "CT2"), baseline_segmentation=other,
                   temp_root=str(tmp_path)).start()
    assert list(tmp_path.iterdir()) == []


def test_a_result_slicer_cannot_read_adds_nothing(scans, tmp_path):
    """finish() loads three nodes; when one file cannot be read, the ones already added
    are removed again and the temporary folder is gone: the scene is as before."""
    scene, cts = _scene_with_segmented_scans(scans)
    job = CompareJob(scene, cts[0][0], cts[1][0], baseline_segmentation=cts[0][1],
                     followup_segmentation=cts[1][1], device="cpu", temp_root=str(tmp_path)).start()
    assert job.wait(600) == SUCCEEDED, job.error
    (job.folder / "out" / "followup_on_baseline.nrrd").write_bytes(b"NRRD0004\nnot an image\n")
    count = scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="could not read the registered follow-up"):
        job.finish()
    assert scene.GetNumberOfNodes() == count
    assert list(tmp_path.iterdir()) == []

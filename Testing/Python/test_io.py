from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

from ILDSegmentationLib.classes import CLASSES
from ILDSegmentationLib.errors import InputError, LungMaskError
from ILDSegmentationLib.imaging.io import read_ct, read_lung_mask, write_label_map, write_probabilities

from permissions import public_folder, run_unprivileged
from synthetic import two_lungs

OBLIQUE = tuple(sitk.VersorTransform((0.2, 0.1, 1.0), 0.3).GetMatrix())


def _ct_file(tmp_path, name="ct.nrrd", direction=OBLIQUE):
    hu, mask = two_lungs()
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-40.0, 12.5, 300.0))
    image.SetDirection(direction)
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path, hu, mask, image


def _same_geometry(a: sitk.Image, b: sitk.Image):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def test_dicom_series_reads_in_hu(dicom_dir):
    ct = read_ct(dicom_dir)
    assert ct.array.shape == (30, 512, 512)
    assert ct.geometry.spacing[0] == pytest.approx(0.646, abs=0.01)
    assert ct.geometry.spacing[2] == pytest.approx(8.0, abs=0.1)
    air_outside = ct.array[:, 5:20, 5:20]
    assert -1100 < np.median(air_outside) < -900, "values are HU after the DICOM rescale"


@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz", ".mha"])
def test_label_map_keeps_the_ct_geometry(tmp_path, ext):
    path, hu, mask, image = _ct_file(tmp_path)
    ct = read_ct(path)
    labels = (mask * 3).astype(np.uint8)
    out = write_label_map(labels, ct.image, tmp_path / f"labels{ext}")
    back = sitk.ReadImage(str(out))
    _same_geometry(back, image)
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), labels)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_probabilities_are_a_six_component_image(tmp_path):
    path, hu, mask, image = _ct_file(tmp_path)
    ct = read_ct(path)
    p = np.random.default_rng(0).random(hu.shape + (6,)).astype(np.float32)
    back = sitk.ReadImage(str(write_probabilities(p, ct.image, tmp_path / "p.nrrd")))
    assert back.GetNumberOfComponentsPerPixel() == 6
    _same_geometry(back, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), p)


def test_seg_nrrd_is_read_by_slicer_with_names_colors_terminology(tmp_path):
    slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed (pip install slicer-core)")
    import vtk
    from vtkmodules.vtkCommonCore import reference
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)

    path, hu, mask, image = _ct_file(tmp_path)
    ct = read_ct(path)
    labels = np.zeros(hu.shape, np.uint8)
    labels[mask > 0] = 1
    labels[(mask > 0) & (np.arange(hu.shape[2]) > 60)] = 5  # classes 2, 3, 4, 6 stay empty
    out = write_label_map(labels, ct.image, tmp_path / "out.seg.nrrd")

    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    seg_logic.SetMRMLScene(scene)
    seg_logic.SetMRMLApplicationLogic(app)
    node = seg_logic.LoadSegmentationFromFile(str(out), False, "ild")
    seg = node.GetSegmentation()
    assert seg.GetNumberOfSegments() == 6
    for c in CLASSES:
        segment = seg.GetSegment(c.segment_id)
        assert segment is not None, c.name
        assert segment.GetName() == c.name
        assert segment.GetColor() == pytest.approx(c.color, abs=1e-3)
        assert segment.GetLabelValue() == c.label
        entry = reference("")
        assert segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry)
        assert "^".join(c.type_code) in str(entry)
    # The voxels come back where they were, empty classes as empty segments.
    reference_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    back = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    sn = slicer.vtkMRMLVolumeArchetypeStorageNode()
    sn.SetFileName(str(path))
    assert sn.ReadData(reference_node)
    ids = [c.segment_id for c in CLASSES]
    import vtk as _vtk
    id_list = _vtk.vtkStringArray()
    for i in ids:
        id_list.InsertNextValue(i)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(node, id_list, back, reference_node)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(back), labels)


def test_lung_mask_on_another_grid_is_resampled(tmp_path):
    path, hu, mask, image = _ct_file(tmp_path, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    ct = read_ct(path)
    m = sitk.GetImageFromArray(mask)
    m.CopyInformation(image)
    size, spacing = image.GetSize(), image.GetSpacing()
    coarse = sitk.Resample(m, [size[0] // 2, size[1] // 2, size[2]], sitk.Transform(), sitk.sitkNearestNeighbor,
                           image.GetOrigin(), [2 * spacing[0], 2 * spacing[1], spacing[2]], image.GetDirection())
    sitk.WriteImage(coarse, str(tmp_path / "coarse.nrrd"))
    resampled = read_lung_mask(tmp_path / "coarse.nrrd", ct)
    assert resampled.shape == hu.shape
    overlap = (resampled > 0) & (mask > 0)
    assert overlap.sum() / (mask > 0).sum() > 0.7

    far = sitk.Image(coarse)
    far.SetOrigin((5000.0, 5000.0, 5000.0))
    sitk.WriteImage(far, str(tmp_path / "far.nrrd"))
    with pytest.raises(LungMaskError, match="does not overlap"):
        read_lung_mask(tmp_path / "far.nrrd", ct)
    empty = sitk.Image(m) * 0
    sitk.WriteImage(empty, str(tmp_path / "empty.nrrd"))
    with pytest.raises(LungMaskError, match="empty"):
        read_lung_mask(tmp_path / "empty.nrrd", ct)


def test_lobe_label_map_counts_every_non_zero_voxel_as_lung(tmp_path):
    path, hu, mask, image = _ct_file(tmp_path)
    lobes = mask * np.array([0, 1, 2, 3, 4, 5], np.uint8)[np.arange(hu.shape[2]) % 6]
    lobes[mask > 0] = np.maximum(lobes[mask > 0], 1)
    m = sitk.GetImageFromArray(lobes)
    m.CopyInformation(image)
    sitk.WriteImage(m, str(tmp_path / "lobes.nrrd"))
    np.testing.assert_array_equal(read_lung_mask(tmp_path / "lobes.nrrd", read_ct(path)), (mask > 0).astype(np.uint8))


def test_unreadable_inputs_give_clear_errors(tmp_path):
    path, *_ = _ct_file(tmp_path)
    with pytest.raises(InputError, match="not found"):
        read_ct(tmp_path / "missing.nrrd")
    truncated = tmp_path / "truncated.nrrd"
    data = path.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match="cannot read image truncated.nrrd"):
        read_ct(truncated)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match="cannot read"):
        read_ct(garbage)
    vec = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.float32), isVector=True)
    sitk.WriteImage(vec, str(tmp_path / "vec.nrrd"))
    with pytest.raises(InputError, match="components"):
        read_ct(tmp_path / "vec.nrrd")
    four = sitk.GetImageFromArray(np.zeros((2, 4, 5, 6), np.int16), isVector=False)
    sitk.WriteImage(four, str(tmp_path / "4d.nrrd"))
    with pytest.raises(InputError, match="4D"):
        read_ct(tmp_path / "4d.nrrd")
    nan = sitk.GetImageFromArray(np.full((3, 4, 5), np.nan, np.float32))
    sitk.WriteImage(nan, str(tmp_path / "nan.nrrd"))
    with pytest.raises(InputError, match="NaN"):
        read_ct(tmp_path / "nan.nrrd")
    with pytest.raises(InputError, match="no DICOM"):
        read_ct(tmp_path)


def test_unwritable_output_leaves_nothing(tmp_path):
    path, hu, mask, image = _ct_file(tmp_path)
    ct = read_ct(path)
    with pytest.raises(InputError, match="does not exist"):
        write_label_map(mask, ct.image, tmp_path / "no" / "such" / "out.nrrd")
    # A folder without write permission. Root ignores permission bits, so there (CI)
    # the check runs as an ordinary user, in a folder that user can reach.
    with public_folder() as folder:
        locked = folder / "locked"
        locked.mkdir()
        locked.chmod(0o555)

        def refused():
            assert not os.access(locked, os.W_OK), "the check must run as a user who cannot write here"
            with pytest.raises(InputError, match="not writable"):
                write_label_map(mask, ct.image, locked / "out.nrrd")
            assert list(locked.iterdir()) == []
        run_unprivileged(refused)
        assert list(locked.iterdir()) == []
        locked.chmod(0o755)
    with pytest.raises(InputError, match="unsupported output format"):
        write_label_map(mask, ct.image, tmp_path / "out.png")


def test_uncompressed_nifti_named_nii_gz_is_read(tmp_path):
    """ITK reads it; the completeness check used to take it for a broken gzip stream."""
    image = sitk.GetImageFromArray(np.arange(2 * 8 * 9, dtype=np.int16).reshape(2, 8, 9))
    sitk.WriteImage(image, str(tmp_path / "plain.nii"), False)
    (tmp_path / "plain.nii").rename(tmp_path / "plain.nii.gz")
    ct = read_ct(tmp_path / "plain.nii.gz")
    np.testing.assert_array_equal(ct.array, sitk.GetArrayFromImage(image))

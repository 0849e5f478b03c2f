"""DICOM Segmentation output (dicomseg.py) on the real DICOM CT: read back with
highdicom and with plain pydicom, voxel by voxel against the NRRD labels of the same
run, codes against the Slicer terminology file, references to the CT's series and
slices, and validated by dciodvfy (dicom3tools)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DICOM_DIR, REPO, _need

hd = pytest.importorskip("highdicom", reason="highdicom is not installed (pip install -e '.[test]')")
pydicom = pytest.importorskip("pydicom", reason="pydicom is not installed (pip install -e '.[test]')")

from ILDSegmentationLib.classes import CLASSES  # noqa: E402
from ILDSegmentationLib.errors import InputError  # noqa: E402
from ILDSegmentationLib.imaging.io import read_ct  # noqa: E402

TERM_FILE = REPO / "ILDSegmentation" / "Resources" / "ILDSegmentation.term.json"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def ildseg(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "ILDSegmentationLib", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run of the bundled model on the real DICOM CT, writing the NRRD labels and
    the DICOM SEG side by side (about 20 s on 2 CPU cores)."""
    series = _need(DICOM_DIR)
    out = tmp_path_factory.mktemp("dicomseg")
    r = ildseg("segment", series, "-o", out / "labels.nrrd", "--dicom-seg", out / "seg.dcm",
               "--report", out / "report.json", "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nrrd")))
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in read_ct(series).dicom_files]
    return out, labels, sources, json.loads((out / "report.json").read_text())


def test_highdicom_reads_back_the_nrrd_labels_voxel_by_voxel(run):
    out, labels, sources, _ = run
    seg = hd.seg.segread(str(out / "seg.dcm"))
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and seg.SegmentationType == "BINARY"
    back = seg.get_pixels_by_source_instance(source_sop_instance_uids=[s.SOPInstanceUID for s in sources],
                                             combine_segments=True, skip_overlap_checks=True)
    assert back.shape == labels.shape
    assert np.array_equal(back, labels)
    assert len(np.unique(labels)) >= 3  # a meaningful comparison: several classes present


def test_pydicom_frames_rebuild_the_labels_from_their_references(run):
    """Without highdicom: each frame's segment number and the source slice it names
    (its SOP Instance UID) put its bits back into a label volume."""
    out, labels, sources, _ = run
    ds = pydicom.dcmread(out / "seg.dcm")
    frames = ds.pixel_array.reshape((-1, ds.Rows, ds.Columns))
    slice_of = {s.SOPInstanceUID: k for k, s in enumerate(sources)}
    rebuilt = np.zeros_like(labels)
    for frame, item in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        segment = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = slice_of[source]
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx([float(v) for v in sources[k].ImagePositionPatient], abs=1e-3)
        assert not rebuilt[k][frame > 0].any()  # the classes do not overlap
        rebuilt[k][frame > 0] = segment
    assert np.array_equal(rebuilt, labels)
    # Empty frames are left out: fewer frames than slices x classes.
    assert len(frames) < len(sources) * len(CLASSES)


def _terminology_codes():
    """label -> (category, type, modifier) codes as written in the Slicer terminology file."""
    def code(item):
        return (item["CodingSchemeDesignator"], item["CodeValue"], item["CodeMeaning"])
    found = {}
    for category in json.loads(TERM_FILE.read_text())["SegmentationCodes"]["Category"]:
        for t in category["Type"]:
            if "3dSlicerIntegerLabel" in t:
                found[t["3dSlicerIntegerLabel"]] = (code(category), code(t), None)
            for m in t.get("Modifier", []):
                found[m["3dSlicerIntegerLabel"]] = (code(category), code(t), code(m))
    return found


def test_segments_carry_the_terminology_files_codes_and_the_algorithm(run):
    out, _, _, report = run
    ds = pydicom.dcmread(out / "seg.dcm", stop_before_pixels=True)
    expected = _terminology_codes()
    assert sorted(expected) == [c.label for c in CLASSES]
    assert [s.SegmentNumber for s in ds.SegmentSequence] == [1, 2, 3, 4, 5, 6]  # empty classes kept too

    def code(item):
        return (item.CodingSchemeDesignator, item.CodeValue, item.CodeMeaning)
    for s, c in zip(ds.SegmentSequence, CLASSES):
        assert s.SegmentLabel == c.name
        t = s.SegmentedPropertyTypeCodeSequence[0]
        modifier = code(t.SegmentedPropertyTypeModifierCodeSequence[0]) \
            if "SegmentedPropertyTypeModifierCodeSequence" in t else None
        assert (code(s.SegmentedPropertyCategoryCodeSequence[0]), code(t), modifier) == expected[c.label]
        assert code(s.AnatomicRegionSequence[0]) == ("SCT", "39607008", "Lung")
        assert s.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = s.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "ILDSegmentation"
        from ILDSegmentationLib import __version__
        assert algorithm.AlgorithmVersion == __version__
        assert f"model_sha256={report['model']['sha256']}" in algorithm.AlgorithmParameters
        assert len(s.RecommendedDisplayCIELabValue) == 3
    # Distinct colors, blue for Healthy (sRGB (0, 0, 255) is L* 32, a* 79, b* -108).
    lab = [tuple(s.RecommendedDisplayCIELabValue) for s in ds.SegmentSequence]
    assert len(set(lab)) == 6
    assert lab[0] == pytest.approx((32.3 * 65535 / 100, (79.2 + 128) * 65535 / 255, (-107.9 + 128) * 65535 / 255),
                                   abs=150)


def test_the_segmentation_joins_the_cts_study_and_references_every_slice(run):
    out, _, sources, _ = run
    ds = pydicom.dcmread(out / "seg.dcm", stop_before_pixels=True)
    ct = sources[0]
    assert ds.StudyInstanceUID == ct.StudyInstanceUID and ds.PatientID == ct.PatientID
    assert ds.SeriesInstanceUID != ct.SeriesInstanceUID and ds.FrameOfReferenceUID == ct.FrameOfReferenceUID
    assert ds.Modality == "SEG"
    (referenced,) = ds.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == ct.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == \
        {s.SOPInstanceUID for s in sources}


def test_dciodvfy_finds_no_error(run):
    """dicom3tools' validator (CI installs it: .ci/run). Warnings are allowed (this
    de-identified CT's own patient name and missing Study ID give two); errors are not."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools; .ci/run does this on CI)")
    out, *_ = run
    r = subprocess.run(["dciodvfy", str(out / "seg.dcm")], capture_output=True, text=True, timeout=120)
    lines = (r.stdout + r.stderr).splitlines()
    assert any("Segmentation" in line for line in lines), lines  # it recognised the IOD
    errors = [line for line in lines if line.lstrip().startswith("Error")]
    assert errors == [], "\n".join(errors)


def test_dcm_as_the_main_output_on_a_few_real_slices(tmp_path):
    """-o result.dcm writes only the DICOM SEG; its segments hold the voxels the
    report counts (a few slices of the real series, random weights: fast)."""
    from synthetic import random_model
    series = tmp_path / "series"
    series.mkdir()
    for f in sorted(_need(DICOM_DIR).glob("*.dcm"))[10:16]:
        shutil.copy(f, series / f.name)
    model = random_model(tmp_path).path
    out = tmp_path / "out"
    out.mkdir()
    r = ildseg("segment", series, "-o", out / "result.dcm", "--report", out / "report.json", "--model", model,
               "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "result.dcm"]
    report = json.loads((out / "report.json").read_text())
    seg = hd.seg.segread(str(out / "result.dcm"))
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in read_ct(series).dicom_files]
    back = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                             skip_overlap_checks=True)
    assert back.shape == (6, 512, 512)
    assert [int((back == c["label"]).sum()) for c in report["classes"]] == [c["voxels"] for c in report["classes"]]
    assert report["lung_voxels"] > 0


@pytest.mark.parametrize("option", ["-o", "--dicom-seg"])
def test_a_ct_that_is_not_dicom_is_refused_before_any_work(tmp_path, option):
    image = sitk.GetImageFromArray(np.full((4, 32, 32), -800, np.int16))
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    outputs = ["-o", tmp_path / "seg.dcm"] if option == "-o" else ["-o", tmp_path / "l.nrrd", "--dicom-seg",
                                                                    tmp_path / "seg.dcm"]
    r = ildseg("segment", tmp_path / "ct.nrrd", *outputs, "--lung-mask", "auto")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a DICOM series as input" in lines[0] and "ct.nrrd" in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd"]


def test_dicom_seg_option_must_name_a_dcm_file(tmp_path):
    r = ildseg("segment", _need(DICOM_DIR), "-o", tmp_path / "l.nrrd", "--dicom-seg", tmp_path / "seg.nrrd")
    assert r.returncode == 2 and "name it .dcm" in r.stderr and list(tmp_path.iterdir()) == []


def test_missing_highdicom_is_one_line_saying_how_to_install(monkeypatch):
    from ILDSegmentationLib.imaging.dicomseg import require_highdicom
    monkeypatch.setitem(sys.modules, "highdicom", None)  # makes `import highdicom` raise ImportError
    with pytest.raises(InputError, match=r"pip install 'ildsegmentation\[dicom\]'"):
        require_highdicom()


def test_slices_out_of_order_are_refused_not_misplaced():
    """Frame k must lie on source slice k: a file list in another order than the grid's
    is refused (the positions disagree) rather than written with shifted labels."""
    from ILDSegmentationLib.imaging.dicomseg import build_dicom_seg
    ct = read_ct(_need(DICOM_DIR))
    labels = np.zeros(ct.array.shape, np.uint8)
    labels[:, 250:260, 250:260] = 2
    good = build_dicom_seg(labels, ct, model_name="m", model_sha256="0" * 64)
    assert good.NumberOfFrames == ct.array.shape[0]
    ct.dicom_files = tuple(reversed(ct.dicom_files))
    with pytest.raises(InputError, match="not at the CT grid"):
        build_dicom_seg(labels, ct, model_name="m", model_sha256="0" * 64)

"""ildseg compare --dicom-seg (issue 27): the change map as a DICOM Segmentation over the
baseline's DICOM series, on the real DICOM CT (lung-pet-ct-dx-A0002, CC BY 4.0; six of its
slices, as test_dicomseg.py keeps it fast). The scans' labels are given (the lung mask of
the real CT with blocks of patterns), so no network runs: registration, change map and the
DICOM SEG only. Read back with highdicom and pydicom; a baseline that is not DICOM is
refused in one line before any work. Skips with the reason without the data or highdicom."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DICOM_DIR, REPO, _need

hd = pytest.importorskip("highdicom", reason="highdicom is not installed (pip install -e '.[test]')")
pydicom = pytest.importorskip("pydicom", reason="pydicom is not installed (pip install -e '.[test]')")

from ILDSegmentationLib.analysis.change import (CHANGE_LABELS, CHANGE_SEGMENT_VALUES, NEW_OFFSET,  # noqa: E402
                                                RESOLVED_OFFSET, UNCOVERED)
from ILDSegmentationLib.classes import by_label  # noqa: E402
from ILDSegmentationLib.imaging.io import read_ct  # noqa: E402
from test_compare import _write  # noqa: E402

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def ildseg(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "ILDSegmentationLib", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=str(REPO))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Six slices of the real DICOM series as the baseline (its lung healthy, a block of
    reticulation and one of ground glass), and the same slices moved 1 degree and 2 mm
    as the follow-up (NRRD), where the reticulation grew, honeycombing appeared and the
    ground glass resolved."""
    from ILDSegmentationLib.imaging.geometry import Geometry
    from ILDSegmentationLib.imaging.lungmask import compute_lung_mask
    from ILDSegmentationLib.simulation.followup import motion, moved_labels, moved_scan
    d = tmp_path_factory.mktemp("compare_dicomseg")
    series = d / "series"
    series.mkdir()
    for f in sorted(_need(DICOM_DIR).glob("*.dcm"))[10:16]:
        shutil.copy(f, series / f.name)
    ct = read_ct(series)
    lung = compute_lung_mask(np.asarray(ct.array), ct.geometry) != 0
    assert lung.sum() > 10000, "the six slices hold lung"
    labels = lung.astype(np.uint8)
    ks, js, is_ = np.nonzero(lung)
    jc, ic = int(np.median(js)), int(np.median(is_))
    block = np.zeros_like(lung)
    block[:, jc - 40:jc + 40, ic - 60:ic - 10] = True
    labels[lung & block] = 5
    ggo = np.zeros_like(lung)
    ggo[:, jc - 40:jc + 40, ic + 10:ic + 60] = True
    labels[lung & ggo] = 2
    follow = labels.copy()
    follow[lung & ggo] = 1  # resolved
    grown = np.zeros_like(lung)
    grown[:, jc - 60:jc + 60, ic - 80:ic - 10] = True
    follow[lung & grown & ~block] = 5  # new reticulation around the old
    hc = np.zeros_like(lung)
    hc[:, jc + 60:jc + 90, :] = True
    follow[lung & hc] = 6  # new honeycombing
    base_img = sitk.GetImageFromArray(np.asarray(ct.array).astype(np.int16))
    base_img.CopyInformation(ct.image)
    t = motion(base_img, (1.0, 0.0, 0.0), (2.0, 0.0, 0.0))
    moved, _ = moved_scan(base_img, base_img, t)
    sitk.WriteImage(moved, str(d / "followup.nrrd"), True)
    _write(labels, ct.image, d / "baseline_labels.nrrd")
    _write(moved_labels(follow, ct.image, moved, t), moved, d / "followup_labels.nrrd")
    assert Geometry.from_sitk(moved).spacing == pytest.approx(ct.geometry.spacing)
    out = d / "out"
    r = ildseg("compare", series, d / "followup.nrrd", "--out", out, "--baseline-labels", d / "baseline_labels.nrrd",
               "--followup-labels", d / "followup_labels.nrrd", "--affine-only", "--no-visual-report",
               "--dicom-seg", out / "change.dcm", "--quiet")
    assert r.returncode == 0, r.stderr
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in ct.dicom_files]
    cmap = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "change_map.seg.nrrd")))
    return out, cmap, sources


def test_the_change_map_comes_back_frame_by_frame(pair):
    out, cmap, sources = pair
    seg = hd.seg.segread(str(out / "change.dcm"))
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and seg.SegmentationType == "BINARY"
    numbers = seg.get_pixels_by_source_instance(source_sop_instance_uids=[s.SOPInstanceUID for s in sources],
                                                combine_segments=True, skip_overlap_checks=True)
    assert numbers.shape == cmap.shape
    values = np.asarray((0,) + CHANGE_SEGMENT_VALUES)[numbers]
    assert np.array_equal(values, cmap)
    # A meaningful map: unchanged, new, resolved and healthy voxels all present.
    present = set(np.unique(cmap).tolist())
    assert {1, 5, NEW_OFFSET + 5, NEW_OFFSET + 6, RESOLVED_OFFSET + 2} <= present, present


def test_each_change_segment_is_named_and_coded_by_its_class(pair):
    out, cmap, _ = pair
    ds = pydicom.dcmread(out / "change.dcm", stop_before_pixels=True)
    assert ds.ContentLabel == "ILD_CHANGE"
    assert [s.SegmentNumber for s in ds.SegmentSequence] == list(range(1, len(CHANGE_LABELS) + 1))

    def code(item):
        return (item.CodingSchemeDesignator, item.CodeValue, item.CodeMeaning)
    for s, value in zip(ds.SegmentSequence, CHANGE_SEGMENT_VALUES):
        assert s.SegmentLabel == CHANGE_LABELS[value]
        assert s.SegmentDescription.startswith(f"value {value}:")
        t = s.SegmentedPropertyTypeCodeSequence[0]
        if value == UNCOVERED:
            assert code(t) == ("SCT", "39607008", "Lung")
            assert code(s.SegmentedPropertyCategoryCodeSequence[0]) == ("SCT", "91723000", "Anatomical Structure")
            continue
        c = by_label(value % 10)
        assert code(t) == c.type_code
        word = "unchanged" if value < NEW_OFFSET else "new" if value < RESOLVED_OFFSET else "resolved"
        assert s.SegmentLabel.endswith(word)
        if value >= NEW_OFFSET:
            assert word in s.SegmentDescription
        algorithm = s.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "ILDSegmentation"
        assert "baseline_labels=reused" in algorithm.AlgorithmParameters
        assert "followup=followup.nrrd" in algorithm.AlgorithmParameters
    colors = [tuple(s.RecommendedDisplayCIELabValue) for s in ds.SegmentSequence]
    assert len(set(colors)) == len(colors)


def test_it_references_the_baseline_series_and_joins_its_study(pair):
    out, _, sources = pair
    ds = pydicom.dcmread(out / "change.dcm", stop_before_pixels=True)
    ct = sources[0]
    assert ds.StudyInstanceUID == ct.StudyInstanceUID and ds.FrameOfReferenceUID == ct.FrameOfReferenceUID
    assert ds.SeriesInstanceUID != ct.SeriesInstanceUID
    (referenced,) = ds.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == ct.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} <= \
        {s.SOPInstanceUID for s in sources}


def test_a_baseline_that_is_not_dicom_is_refused_before_any_work(pair, tmp_path):
    """The NRRD follow-up as the baseline: one line, exit 2, nothing made, no scan
    segmented (the refusal comes before the model is loaded)."""
    out_dir = pair[0]
    follow = out_dir.parent / "followup.nrrd"
    out = tmp_path / "out"
    r = ildseg("compare", follow, out_dir.parent / "series", "--out", out, "--dicom-seg", out / "change.dcm")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a DICOM series as input" in lines[0] and "followup.nrrd" in lines[0], r.stderr
    assert not out.exists()
    r = ildseg("compare", out_dir.parent / "series", follow, "--out", out, "--dicom-seg", out / "change.nrrd")
    assert r.returncode == 2 and "name it .dcm" in r.stderr and not out.exists()


def test_dciodvfy_finds_no_error(pair):
    """dicom3tools' validator, as for the classes' SEG (test_dicomseg.py): warnings
    (the de-identified CT's own patient name, no Study ID) allowed, errors not."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools; .ci/run does this on CI)")
    r = subprocess.run(["dciodvfy", str(pair[0] / "change.dcm")], capture_output=True, text=True, timeout=120)
    lines = (r.stdout + r.stderr).splitlines()
    assert any("Segmentation" in line for line in lines), lines
    errors = [line for line in lines if line.lstrip().startswith("Error")]
    assert errors == [], "\n".join(errors)

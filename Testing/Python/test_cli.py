"""The ildseg command end to end, as a user runs it (a subprocess)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from permissions import assert_normal_modes, files_in, umask
from synthetic import random_model, two_lungs


def ildseg(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "ILDSegmentationLib", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def small_case(tmp_path_factory):
    d = tmp_path_factory.mktemp("case")
    hu, mask = two_lungs()
    for name, arr in (("ct.nrrd", hu), ("mask.nii.gz", mask)):
        image = sitk.GetImageFromArray(arr)
        image.SetSpacing((0.8, 0.8, 2.5))
        image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
        sitk.WriteImage(image, str(d / name))
    model = random_model(d)
    return d, mask, model.path


def test_segment_writes_labels_report_overlay_probabilities(small_case, tmp_path):
    d, mask, model = small_case
    with umask(0o027):  # the subprocess inherits it
        r = ildseg("segment", d / "ct.nrrd", "--lung-mask", d / "mask.nii.gz", "--model", model, "--device", "cpu",
                   "-o", tmp_path / "labels.nii.gz", "--report", tmp_path / "report.json",
                   "--overlay", tmp_path / "overlay.png", "--probabilities", tmp_path / "p.nrrd")
    assert r.returncode == 0, r.stderr
    # Every output has the mode of a normal file under that umask (not mkstemp's 0o600).
    assert sorted(p.name for p in files_in(tmp_path)) == ["labels.nii.gz", "overlay.png", "p.nrrd", "report.json"]
    assert_normal_modes(files_in(tmp_path), 0o640)
    labels_img = sitk.ReadImage(str(tmp_path / "labels.nii.gz"))
    ct_img = sitk.ReadImage(str(d / "ct.nrrd"))
    assert labels_img.GetSize() == ct_img.GetSize()
    np.testing.assert_allclose(labels_img.GetDirection(), ct_img.GetDirection(), atol=1e-6)
    labels = sitk.GetArrayFromImage(labels_img)
    assert labels.dtype == np.uint8 and labels.max() <= 6 and (labels[mask == 0] == 0).all()
    report = json.loads((tmp_path / "report.json").read_text())
    voxel_ml = 0.8 * 0.8 * 2.5 / 1000
    assert report["lung_volume_ml"] == pytest.approx(int(mask.sum()) * voxel_ml, rel=1e-6)
    for c in report["classes"]:
        assert c["voxels"] == int((labels == c["label"]).sum())
        assert c["volume_ml"] == pytest.approx(c["voxels"] * voxel_ml, abs=1e-3)
    assert sum(c["percent_of_lung"] for c in report["classes"]) == pytest.approx(100, abs=0.01)
    assert report["model"]["sha256"] and report["device"].startswith("cpu")
    assert set(report["timings_s"]) >= {"read", "lung_mask", "network", "write", "total"}
    assert (tmp_path / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sitk.ReadImage(str(tmp_path / "p.nrrd")).GetNumberOfComponentsPerPixel() == 6
    assert "Ground glass opacity" in r.stdout  # the summary table


def test_python_m_and_entry_point_agree():
    r = ildseg("architecture", "--json")
    assert r.returncode == 0
    d = json.loads(r.stdout)
    assert d["parameters"] == 130_056 and d["receptive_field"] == 287
    listing = ildseg("architecture", "--list")
    for name in ("no-dilation", "no-concat", "no-norm", "no-norm-skip", "width16", "exponential-dilation",
                 "9-layers", "width64", "purely-supervised"):
        assert name in listing.stdout


@pytest.mark.parametrize("case", ["missing_ct", "bad_model", "pickle_model", "bad_folder", "bad_ext", "empty_mask",
                                  "bad_device", "seg_nrrd_probabilities", "truncated_mha", "folder_without_dicom",
                                  "ct_as_mask", "nan_mask", "max_memory_nan", "max_memory_zero", "overlay_jpg"])
def test_bad_input_one_line_exit_2_no_output(small_case, tmp_path, case):
    d, mask, model = small_case
    out = tmp_path / "out.nrrd"
    args = ["segment", d / "ct.nrrd", "--lung-mask", d / "mask.nii.gz", "--model", model, "-o", out,
            "--report", tmp_path / "r.json"]
    if case == "missing_ct":
        args[1] = tmp_path / "nope.nrrd"
    elif case == "bad_model":
        (tmp_path / "m.safetensors").write_bytes(b"garbage" * 10)
        args[5] = tmp_path / "m.safetensors"
    elif case == "pickle_model":
        import pickle
        (tmp_path / "m.pt").write_bytes(pickle.dumps({"w": [1, 2]}))
        args[5] = tmp_path / "m.pt"
    elif case == "bad_folder":
        args[7] = tmp_path / "missing" / "out.nrrd"
    elif case == "bad_ext":
        args[7] = tmp_path / "out.png"
    elif case == "empty_mask":
        empty = sitk.GetImageFromArray(np.zeros_like(mask))
        empty.CopyInformation(sitk.ReadImage(str(d / "ct.nrrd")))
        sitk.WriteImage(empty, str(tmp_path / "empty.nrrd"))
        args[3] = tmp_path / "empty.nrrd"
    elif case == "seg_nrrd_probabilities":  # a probability image is no segmentation
        args += ["--probabilities", tmp_path / "out_probs.seg.nrrd"]
    elif case == "truncated_mha":  # MetaIO and ITK used to print 2 more lines of their own
        sitk.WriteImage(sitk.ReadImage(str(d / "ct.nrrd")), str(tmp_path / "in.mha"))
        data = (tmp_path / "in.mha").read_bytes()
        (tmp_path / "in.mha").write_bytes(data[:len(data) // 2])
        args[1] = tmp_path / "in.mha"
    elif case == "folder_without_dicom":  # GDCM used to print 3 lines of warnings
        (tmp_path / "empty").mkdir()
        args[1] = tmp_path / "empty"
    elif case in ("ct_as_mask", "nan_mask"):  # both used to count as lung almost everywhere
        if case == "ct_as_mask":
            args[3] = d / "ct.nrrd"
        else:
            image = sitk.GetImageFromArray(np.where(mask > 0, 1.0, np.nan).astype(np.float32))
            image.CopyInformation(sitk.ReadImage(str(d / "ct.nrrd")))
            sitk.WriteImage(image, str(tmp_path / "nan.nrrd"))
            args[3] = tmp_path / "nan.nrrd"
    elif case in ("max_memory_nan", "max_memory_zero"):
        args += ["--max-memory", "nan" if case == "max_memory_nan" else "0"]
    elif case == "overlay_jpg":
        args += ["--overlay", tmp_path / "out.jpg"]
    elif case == "bad_device":
        import torch
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        args += ["--device", "cuda"]
    r = ildseg(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ildseg: error"), r.stderr
    assert list(tmp_path.glob("out*")) == [] and not (tmp_path / "r.json").exists()


def test_outputs_never_overwrite_the_lung_mask(small_case, tmp_path):
    import shutil
    d, _, model = small_case
    mask = tmp_path / "mask.nii.gz"
    shutil.copy(d / "mask.nii.gz", mask)
    before = mask.read_bytes()
    common = ["segment", d / "ct.nrrd", "--lung-mask", mask, "--model", model, "--device", "cpu"]
    for outputs in (["-o", mask], ["-o", tmp_path / "labels.nrrd", "--report", mask]):
        r = ildseg(*common, *outputs)
        assert r.returncode == 2 and "overwrite the input lung mask" in r.stderr, r.stderr
        assert mask.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]


@pytest.mark.parametrize("name", ["L.MHA", "L.Nii", "L.NII.GZ", "L.Seg.Nrrd", ".nrrd"])
def test_output_names_itk_cannot_read_back_are_refused_before_any_work(small_case, tmp_path, name):
    """ITK picks its writer and reader by a case-sensitive extension: 'L.MHA' used to
    leave an empty file (exit 0) and hidden .part.mhd/.zraw files beside it, and
    'L.NII.GZ' failed only after the whole run."""
    d, _, model = small_case
    for option in ("-o", "--probabilities"):
        outputs = ["-o", tmp_path / "ok.nrrd", option, tmp_path / name] if option != "-o" else ["-o", tmp_path / name]
        r = ildseg("segment", d / "ct.nrrd", "--lung-mask", d / "mask.nii.gz", "--model", model, "--device", "cpu",
                   *outputs)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "lower case" in r.stderr or "unsupported output format" in r.stderr or "segmentation" in r.stderr
        assert list(tmp_path.iterdir()) == []


def test_model_notice_says_what_the_weights_are():
    from ILDSegmentationLib.analysis.report import model_notice
    assert "UNTRAINED" in model_notice({"name": "m", "trained": False, "provenance": {}})
    note = model_notice({"name": "m", "trained": True, "provenance": {"warning": "simulated data only"}})
    assert note.endswith("simulated data only") and "UNTRAINED" not in note
    assert model_notice({"name": "m", "trained": True, "provenance": {}}) is None


def test_demo_runs_on_its_built_in_case_and_scores_against_the_truth(tmp_path, monkeypatch):
    """`ildseg demo` needs no input: it writes its case, the truth and the result, and
    prints the bundled model's balanced accuracy against the known truth, with what
    the user must know about the weights."""
    from ILDSegmentationLib.engine.modelfile import default_model_path, read_info
    with umask(0o022):
        r = ildseg("demo", "--out", tmp_path / "demo", "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("demo_ct.nrrd", "demo_truth.seg.nrrd", "segmentation.seg.nrrd", "report.json", "overlay.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 0, name
    assert len(files_in(tmp_path / "demo")) == 5
    assert_normal_modes(files_in(tmp_path / "demo"), 0o644)
    line = [s for s in r.stdout.splitlines() if s.startswith("balanced accuracy against the known truth:")]
    assert len(line) == 1, r.stdout
    bacc = float(line[0].split(":")[1].split()[0])
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "demo" / "demo_truth.seg.nrrd")))
    assert len(set(np.unique(truth)) - {0}) == 6, "the demo case shows every class"
    # The printed score is the paper's BACC of the written result against the written
    # truth: per class, correct / annotated over the voxels labelled in both, averaged.
    def bacc_of(labels_file):
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_file)))
        both = (truth > 0) & (pred > 0)
        return np.mean([((truth == c) & (pred == c)).sum() / ((truth == c) & both).sum() for c in range(1, 7)])
    assert bacc == pytest.approx(bacc_of(tmp_path / "demo" / "segmentation.seg.nrrd"), abs=5e-4)
    info = read_info(default_model_path())
    if info.trained:
        # Chance is 1/6. The bundled model of 2026-11 (sha256 823eac80e616) scored 0.72 to
        # 0.88 on this case as the simulator that makes it changed; that of 2026-12 (six
        # real backgrounds, none a phantom) scores 0.68; with the phantom's parenchyma
        # measured against real lungs (issue 24) 0.698 with the paper's argmax and 0.708
        # with the model's whole-lung rule, which the demo runs. Whether the 32 px margin helps on
        # this synthetic case depends on the model (0.88 / 0.83 with and without it for the
        # 2026-11 model, 0.68 / 0.73 for the 2026-12 one), so the margin is pinned by
        # test_protocol.py, which compares boxes, not scores.
        assert bacc >= 0.6, r.stdout
        assert "not for clinical use" in r.stdout.lower()
    else:
        assert "UNTRAINED" in r.stdout


def test_omp_wait_policy_is_set_by_the_command_not_by_importing_the_library():
    """Importing the library (as Slicer does) leaves the process environment alone;
    the ildseg command sets OMP_WAIT_POLICY for its own process (BENCHMARKS.md), and
    a value the user set wins."""
    import os

    code = ("import os, ILDSegmentationLib, ILDSegmentationLib.commands.cli as cli, ILDSegmentationLib.terminology\n"
            "before = os.environ.get('OMP_WAIT_POLICY')\n"
            "try:\n    cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print(before, os.environ.get('OMP_WAIT_POLICY'))\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-2:] == ["None", "PASSIVE"]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert r.stdout.split()[-2:] == ["ACTIVE", "ACTIVE"]

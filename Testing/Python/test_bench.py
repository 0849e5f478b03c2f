"""Fast paths against the reference path, and the ``ildseg bench`` machinery.

Correctness only: benchmarks are not tests, nothing here asserts a time.

The reference is :func:`bench.reference_segment`: the paper's per-lung crops, one
crop at a time, eager float32 ``network.forward``. Every fast path (batching of
identical crops, the channels-last CPU forward of ``fastpath.py``, padded+masked
buckets on GPUs) must give the same labels inside the lung and probabilities within
PROB_ATOL; GPU-only paths are checked where a GPU exists and skipped otherwise.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from ILDSegmentationLib.training.trainer import TrainConfig, Trainer
import SimpleITK as sitk
import torch

from ILDSegmentationLib.commands import bench
from ILDSegmentationLib.engine import fastpath
from ILDSegmentationLib.commands.cli import main
from ILDSegmentationLib.imaging.geometry import Geometry
from ILDSegmentationLib.engine.inference import Inferer
from ILDSegmentationLib.engine.network import PRESETS, DilatedFCN, NetworkConfig
from ILDSegmentationLib.simulation.phantom import make_chest_phantom

from permissions import assert_normal_modes, umask
from synthetic import random_model, sitk_volume, two_lungs

#: Probabilities of a fast path may differ from the reference's by float rounding
#: only: a different order of summation in convolutions, GEMMs and normalization.
#: Measured up to ~9e-4 on real CT with the bundled model (whose raw-HU inputs give
#: large logits), ~5e-5 with the random test model.
PROB_ATOL = 2e-3
#: Share of lung voxels whose label must be equal: rounding can flip a label only
#: where two classes tie to within ~1e-4.
MIN_AGREEMENT = 0.999


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def case():
    hu, mask = two_lungs(n_slices=3)
    return hu, mask, Geometry.from_sitk(sitk_volume(hu))


@pytest.fixture(scope="module")
def reference(model, case):
    hu, mask, geo = case
    return bench.reference_segment(model.network.eval(), model.info.intensity, hu, mask, geo, probabilities=True)


def _check_against_reference(result, ref_labels, ref_probs, mask):
    lung = mask > 0
    assert (result.labels[~lung] == 0).all()
    assert bench.agreement_in_lung(result.labels, ref_labels, lung) >= MIN_AGREEMENT
    if ref_probs is not None and result.probabilities is not None:
        np.testing.assert_allclose(result.probabilities[lung], ref_probs[lung], atol=PROB_ATOL, rtol=0)


# -- the engine's CPU paths against the reference -------------------------------------
def test_default_cpu_path_matches_the_same_cropping_reference(model, case, reference):
    hu, mask, geo = case
    result = Inferer(model, device="cpu").segment(hu, mask, geo, probabilities=True)
    _check_against_reference(result, *reference, mask)


def test_one_crop_per_batch_matches_the_reference(model, case, reference):
    hu, mask, geo = case
    result = Inferer(model, device="cpu", max_memory_mb=0.001).segment(hu, mask, geo, probabilities=True)
    _check_against_reference(result, *reference, mask)


def test_batches_of_identical_crops_match_the_reference(model, case):
    """Repeated slices give identical crop shapes, which the CPU path batches."""
    hu, mask, geo = case
    hu2, mask2 = bench.repeat_slices(hu, 6), bench.repeat_slices(mask, 6)
    ref_labels, ref_probs = bench.reference_segment(model.network.eval(), model.info.intensity, hu2, mask2, geo,
                                                    probabilities=True)
    result = Inferer(model, device="cpu").segment(hu2, mask2, geo, probabilities=True)
    _check_against_reference(result, ref_labels, ref_probs, mask2)


def test_eager_cpu_path_when_asked_for(model, case, reference):
    hu, mask, geo = case
    inferer = Inferer(model, device="cpu", fast_cpu=False)
    _check_against_reference(inferer.segment(hu, mask, geo, probabilities=True), *reference, mask)


def test_bundled_model_on_the_phantom_matches_the_reference(default_model):
    """The bundled model reads raw HU (large logits): the case where rounding
    differences are largest."""
    p = make_chest_phantom(size=96, n_slices=4, spacing=(3.8, 3.8, 10.0))
    mask = p.lung_labels
    net = default_model.network.eval()
    ref_labels, ref_probs = bench.reference_segment(net, default_model.info.intensity, p.hu, mask, p.geometry,
                                                    probabilities=True)
    result = Inferer(default_model, device="cpu", pixel_spacing="native").segment(p.hu, mask, p.geometry,
                                                                               probabilities=True)
    _check_against_reference(result, ref_labels, ref_probs, mask)


def test_real_ct_matches_the_reference(default_model, dicom_dir):
    from ILDSegmentationLib.imaging.io import read_ct
    from ILDSegmentationLib.imaging.lungmask import compute_lung_mask
    ct = read_ct(dicom_dir)
    mask = compute_lung_mask(ct.array, ct.geometry)
    k = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    z = slice(int(k[len(k) // 2]), int(k[len(k) // 2]) + 2)  # two slices through the middle
    hu, mask = np.ascontiguousarray(ct.array[z]), np.ascontiguousarray(mask[z])
    net = default_model.network.eval()
    ref_labels, ref_probs = bench.reference_segment(net, default_model.info.intensity, hu, mask, ct.geometry,
                                                    probabilities=True)
    result = Inferer(default_model, device="cpu", pixel_spacing="native").segment(hu, mask, ct.geometry,
                                                                               probabilities=True)
    _check_against_reference(result, ref_labels, ref_probs, mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine: GPU paths not checked")
def test_gpu_paths_match_the_reference(model, case, reference):  # pragma: no cover - needs a GPU
    hu, mask, geo = case
    exact = Inferer(model, device="cuda", mixed_precision=False).segment(hu, mask, geo, probabilities=True)
    _check_against_reference(exact, *reference, mask)
    # Mixed precision (bf16/fp16 autocast) is allowed a looser agreement: 99 %.
    mixed = Inferer(model, device="cuda").segment(hu, mask, geo)
    assert bench.agreement_in_lung(mixed.labels, reference[0], mask > 0) >= 0.99


# -- the fast CPU forward itself ----------------------------------------------------------

CONFIGS = dict(PRESETS, **{"two-input-channels": NetworkConfig(in_channels=2), "no-head": NetworkConfig(head=())})


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fast_forward_equals_forward_for_every_configuration(name):
    torch.manual_seed(0)
    cfg = CONFIGS[name]
    net = DilatedFCN(cfg).eval()
    fast = fastpath.FastCPUForward(net)
    for shape in ((1, 37, 52), (3, 33, 35), (1, 9, 12)):  # odd sizes, a batch, smaller than the dilations
        x = torch.randn(shape[0], cfg.in_channels, *shape[1:]) * 0.3
        with torch.inference_mode():
            ref, out = net(x), fast(x)
        assert out.shape == ref.shape
        np.testing.assert_allclose(torch.softmax(out, 1).numpy(), torch.softmax(ref, 1).numpy(), atol=1e-4, rtol=0)
        scale = float(ref.abs().max())
        np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=2e-5 * scale, rtol=0)


def test_fast_forward_reuses_and_releases_its_workspace():
    torch.manual_seed(0)
    net = DilatedFCN().eval()
    fast = fastpath.FastCPUForward(net)
    big, small = torch.randn(1, 1, 48, 40), torch.randn(1, 1, 20, 30)
    with torch.inference_mode():
        a = fast(big).clone()
        fast(small)  # a smaller crop reuses the big one's workspace
        np.testing.assert_array_equal(fast(big).numpy(), a.numpy())
    assert fast._spaces
    fast.release()
    assert not fast._spaces


def test_fast_forward_applies_only_where_it_is_exact():
    net = DilatedFCN().eval()
    assert fastpath.supports(net, torch.device("cpu"))
    assert not fastpath.supports(net, torch.device("cuda"))
    assert not fastpath.supports(DilatedFCN().train(), torch.device("cpu"))
    assert not fastpath.supports(DilatedFCN().double().eval(), torch.device("cpu"))
    hooked = DilatedFCN().eval()
    hooked.head[0].register_forward_hook(lambda *a: None)
    assert not fastpath.supports(hooked, torch.device("cpu")), "a forward hook expects forward() to run"


# -- the bench's helpers and run() ------------------------------------------------------
def test_naive_baseline_labels_only_the_lung(model, case, reference):
    hu, mask, geo = case
    labels = bench.naive_segment(model.network.eval(), model.info.intensity, hu, mask, geo)
    assert labels.shape == mask.shape and labels.dtype == np.uint8
    assert (labels[mask == 0] == 0).all() and (labels[mask > 0] >= 1).all() and (labels[mask > 0] <= 6).all()
    # The baseline is the network on each whole axial slice (here K slices: identity
    # direction, the axial axis is K), labels kept inside the lung.
    expected = np.zeros_like(labels)
    with torch.inference_mode():
        for k in range(hu.shape[0]):
            x = torch.from_numpy((hu[k].astype(np.float32) / 1000.0))[None, None]  # hu1000
            expected[k] = np.where(mask[k] > 0, model.network(x)[0].argmax(0).numpy() + 1, 0)
    np.testing.assert_array_equal(labels, expected)
    # Whole slices are normalized with other statistics than the paper's crops, so the
    # labels differ from the reference's (which is why the bench reports the agreement).
    assert bench.agreement_in_lung(labels, reference[0], mask) < 0.99


def test_agreement_and_repeated_slices():
    a = np.array([[1, 2], [3, 0]])
    b = np.array([[1, 3], [3, 5]])
    lung = np.array([[1, 1], [1, 0]])
    assert bench.agreement_in_lung(a, b, lung) == pytest.approx(2 / 3)
    assert bench.agreement_in_lung(a, b, np.zeros_like(lung)) is None
    vol = np.arange(3)[:, None, None] * np.ones((1, 2, 2))
    assert bench.repeat_slices(vol, 8)[:, 0, 0].tolist() == [0, 1, 2, 2, 1, 0, 0, 1]


def test_machine_info_and_peak_memory():
    info = bench.machine_info()
    for key in ("cpu_model", "cpu_logical", "torch", "torch_threads", "gpu", "date"):
        assert key in info
    assert info["torch"] == torch.__version__ and info["cpu_logical"] == os.cpu_count()
    assert info["gpu"] is None or torch.cuda.is_available()
    peak = bench.peak_rss_mb()
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("no /proc: the peak comes from getrusage, nothing here to check it against")
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    kb = lambda name: int(fields[name].split()[0])  # noqa: E731 - "VmHWM:   123456 kB"
    # The kernel's high-water mark of this process, at least its resident size now.
    assert kb("VmRSS") / 1024 <= peak == pytest.approx(kb("VmHWM") / 1024, abs=1.0)


def test_run_writes_json_with_the_required_keys(tmp_path):
    p = make_chest_phantom(size=64, n_slices=4, spacing=(5.6, 5.6, 12.0))
    image = sitk.GetImageFromArray(p.hu)
    image.SetSpacing(p.geometry.spacing)
    image.SetOrigin(p.geometry.origin)
    ct = tmp_path / "ct.nrrd"
    sitk.WriteImage(image, str(ct))
    out = tmp_path / "bench.json"
    # Every case is a fresh interpreter (~3 s each): the long volume and training
    # are left out here (training is checked in-process below).
    with umask(0o027):
        assert main(["bench", "--ct", str(ct), "--quick", "--device", "cpu", "--scaling", "2",
                     "--skip", "long", "--skip", "training", "--json", str(out), "--quiet"]) == 0
    assert_normal_modes([out], 0o640)
    report = json.loads(out.read_text())
    for case in list(report["real_ct"].values()) + report["scaling"]:
        assert "error" not in case, case["error"]
    for key in ("speedup_vs_naive", "agreement_in_lung", "seconds_per_slice", "peak_rss_mb", "machine"):
        assert report[key] is not None, key
    assert report["agreement_in_lung_same_cropping"] >= MIN_AGREEMENT
    # The naive baseline normalizes whole slices, not the paper's crops: its labels differ.
    assert report["agreement_in_lung"] < report["agreement_in_lung_same_cropping"]
    real = report["real_ct"]
    assert report["speedup_vs_naive"] == pytest.approx(real["naive"]["timings"]["total"]
                                                       / real["product"]["timings"]["total"])
    assert report["seconds_per_slice"] == pytest.approx(real["product"]["timings"]["total"] / 4)  # 4 slices
    # A fresh interpreter with torch and the engine loaded holds well over 100 MB.
    assert report["peak_rss_mb"] == real["product"]["peak_rss_mb"] > 100
    assert report["real_ct"]["product"]["timings"]["network"] > 0
    assert report["scaling"][0]["slices"] == 8 and report["scaling"][0]["lung_voxels"] > 0
    assert report["machine"]["torch"] == torch.__version__


@pytest.mark.parametrize("trainer", ["reference", "fast"])
def test_training_throughput_worker_runs_the_real_trainer(trainer, tmp_path):
    t = time.perf_counter()
    out = bench._worker_training({"device": "cpu", "train_shapes": [[40, 36], [30, 20]], "train_epochs": 2,
                                  "train_crops": 4, "batch_size": 2, "trainer": trainer, "out": str(tmp_path)})
    elapsed = time.perf_counter() - t
    assert out["crop_shapes"] == [[40, 36], [30, 20]] and out["batch_size"] == 2
    assert out["crops"] == 8 and out["validation_crops_per_epoch"] == 1  # 2 timed epochs of 4 crops
    # The timed epochs are part of the call (which also ran a warm-up epoch and set up).
    assert 8 / elapsed < out["crops_per_second"] < 1e4 and out["cpu_seconds_per_crop"] > 0
    assert out["precision"] == ("fp32" if trainer == "reference" else
                                Trainer(TrainConfig(device="cpu"), _one_crop(), _one_crop(), tmp_path).precision)


def _one_crop():
    return bench._synthetic_crops([[20, 24]], 1, 0)


def test_training_report_prints_both_trainers_and_the_speed_up():
    t = {"device": "cpu", "precision": "bf16", "crop_shapes": [[8, 8]], "batch_size": 1, "cpu_seconds_per_crop": 1.0}
    text = "\n".join(bench.training_lines({
        "reference": dict(t, precision="fp32", crops_per_second=0.5, cpu_seconds_per_crop=2.0),
        "fast": dict(t, crops_per_second=1.25, cpu_seconds_per_crop=0.8)}))
    assert "reference trainer (cpu, fp32" in text and "fast trainer (cpu, bf16" in text
    assert "fast over reference: 2.50x (wall), 2.50x (CPU time)" in text


def test_bench_refuses_a_missing_or_unreadable_ct_in_one_line(tmp_path, capsys):
    (tmp_path / "bad.nrrd").write_text("not an image")
    for ct in (tmp_path / "missing.nrrd", tmp_path / "bad.nrrd"):
        assert main(["bench", "--ct", str(ct), "--quick", "--quiet", "--json", str(tmp_path / "b.json")]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ildseg: error")]
        assert len(err) == 1 and ct.name in err[0], err
    assert not (tmp_path / "b.json").exists()

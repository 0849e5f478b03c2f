"""The trainer's fast paths compute what the reference computes (issue 23).

Each speed-up either keeps the maths exactly (grouped and bucketed batches, the byte
dropout's distribution, the sync-free loss, the prefetched batches) or changes the
arithmetic within a stated tolerance (bf16 autocast; the fast CPU validation forward).
Speed itself is measured by ``ildseg bench`` (BENCHMARKS.md), not here.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from ILDSegmentationLib.engine.network import ByteDropout, DilatedFCN, NetworkConfig
from ILDSegmentationLib.training.batching import BUCKET, bucket_shape, passes, prefetch, transformed
from ILDSegmentationLib.training.dataset import Crop
from ILDSegmentationLib.training.loss import ild_loss
from ILDSegmentationLib.training.trainer import TrainConfig, Trainer
from ILDSegmentationLib.training.validation import validation_metrics

SMALL = NetworkConfig(dilations=(1, 2, 3), head=(16,), width=8, dropout=0.0)


def _crop(rng: np.random.Generator, h: int, w: int, name: str = "c") -> Crop:
    image = rng.normal(0, 1, (h, w)).astype(np.float32)
    lung = np.zeros((h, w), bool)
    lung[2:h - 2, 3:w - 3] = True
    target = np.where(lung & (rng.random((h, w)) < 0.3), rng.integers(0, 6, (h, w)), -1)
    return Crop(name, 0, 0, image, target.astype(np.int64), lung)


def _gradient(net: DilatedFCN, batches, weights: torch.Tensor) -> torch.Tensor:
    net.zero_grad(set_to_none=True)
    for b in batches:
        logits = net(b.x, b.valid) if b.valid is not None else net(b.x)
        loss = ild_loss(logits, b.target, b.lung, weights, 0.1, 0.5, None if b.valid is None else b.valid[:, 0] > 0)
        (loss * b.share).backward()
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


@pytest.mark.parametrize("layout", ["grouped", "bucket"])
def test_grouped_and_bucketed_batches_give_the_padded_batchs_gradient(layout):
    rng = np.random.default_rng(0)
    crops = [_crop(rng, 40, 52), _crop(rng, 33, 47), _crop(rng, 40, 52), _crop(rng, 29, 60)]
    items = transformed(crops, [0, 3, 5, 6])
    torch.manual_seed(0)
    net = DilatedFCN(SMALL).double().train()
    weights = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0, 3.0], dtype=torch.float64)
    as_double = lambda bs: [type(b)(b.x.double(), b.target, b.lung,  # noqa: E731
                                    None if b.valid is None else b.valid.double(), b.share) for b in bs]
    reference = _gradient(net, as_double(passes(items, "padded")), weights)
    got_passes = passes(items, layout)
    if layout == "grouped":
        assert all(b.valid is None for b in got_passes) and len(got_passes) == 3  # three distinct shapes
        assert sum(b.share for b in got_passes) == pytest.approx(1.0)
    else:
        assert got_passes[0].x.shape[-2:] == (64, 64) and bucket_shape(items) == (BUCKET, BUCKET)
    got = _gradient(net, as_double(got_passes), weights)
    torch.testing.assert_close(got, reference, rtol=1e-9, atol=1e-12)


def test_byte_dropout_keeps_half_at_twice_the_value_and_is_off_in_evaluation():
    drop = ByteDropout(0.5).train()
    torch.manual_seed(1)
    x = torch.ones(400, 1000)
    y = drop(x)
    assert set(torch.unique(y).tolist()) == {0.0, 2.0}
    kept = float((y > 0).float().mean())
    assert abs(kept - 0.5) < 5 * (0.25 / x.numel()) ** 0.5  # five standard deviations
    # Neighbouring values are independent (no byte reused): pairs kept together ~1/4.
    both = float(((y[:, :-1] > 0) & (y[:, 1:] > 0)).float().mean())
    assert abs(both - 0.25) < 0.005
    assert not torch.equal(drop(x), y)
    assert torch.equal(drop.eval()(x), x)
    # A rate that is no multiple of 1/256 takes torch's own dropout.
    odd = ByteDropout(0.3).train()
    assert abs(float((odd(x) > 0).float().mean()) - 0.7) < 0.01
    assert isinstance(DilatedFCN().dropout, ByteDropout)


def test_bf16_autocast_gradient_agrees_with_float32():
    rng = np.random.default_rng(2)
    items = transformed([_crop(rng, 96, 128)], [0])
    net = DilatedFCN(NetworkConfig(dropout=0.0)).train()
    torch.manual_seed(3)
    net.reset_parameters()
    weights = torch.ones(6)
    b = passes(items, "grouped")
    fp32 = _gradient(net, b, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = _gradient(net, b, weights)
    cosine = float(torch.nn.functional.cosine_similarity(fp32, bf16, dim=0))
    assert cosine >= 0.99, cosine
    assert not torch.equal(fp32, bf16)  # autocast did change the arithmetic


def test_instance_norm_statistics_are_float32_under_autocast():
    net = DilatedFCN(SMALL)
    seen = []
    net.dilated[0].norm.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(1, 1, 16, 16))
    assert seen == [torch.float32]


def test_fast_validation_matches_the_reference():
    rng = np.random.default_rng(4)
    crops = [_crop(rng, 60 + 7 * i, 70 + 5 * i, f"v{i}") for i in range(3)]
    torch.manual_seed(5)
    net = DilatedFCN()
    ref = validation_metrics(net, crops, torch.device("cpu"))
    fast = validation_metrics(net, crops, torch.device("cpu"), fast=True)
    total = np.asarray(ref["confusion_matrix"]).sum()
    assert np.asarray(fast["confusion_matrix"]).sum() == total
    # Labels may differ only at near-ties: at most 0.1 % of the scored pixels.
    assert np.abs(np.asarray(fast["confusion_matrix"]) - np.asarray(ref["confusion_matrix"])).sum() <= 2 * 0.001 * total
    assert fast["balanced_accuracy"] == pytest.approx(ref["balanced_accuracy"], abs=0.002)


def test_prefetch_yields_every_batch_in_order():
    assert list(prefetch(range(7), lambda i: i * i)) == [i * i for i in range(7)]
    assert list(prefetch([], lambda i: i)) == []


def test_fast_and_reference_epochs_train_the_same_crops_alike(tmp_path):
    """One epoch, fp32, no dropout: the fast trainer (grouped batches, prefetch, loss
    summed on the device) ends with the reference trainer's weights."""
    rng = np.random.default_rng(6)
    crops = [_crop(rng, 30 + 3 * (i % 3), 40, f"t{i}") for i in range(6)]
    weights = {}
    for fast in (False, True):
        cfg = TrainConfig(preset="proposed", device="cpu", batch_size=3, precision="fp32", fast=fast,
                          intensity="hu1000")
        trainer = Trainer(cfg, crops, crops[:2], tmp_path / str(fast))
        trainer.network.dropout.p = 0.0
        loss = trainer._epoch(0)
        weights[fast] = (loss, torch.cat([p.detach().reshape(-1) for p in trainer.network.parameters()]))
    assert weights[True][0] == pytest.approx(weights[False][0], rel=1e-5)
    torch.testing.assert_close(weights[True][1], weights[False][1], rtol=1e-4, atol=1e-6)


def test_resuming_on_another_precision_is_allowed(tmp_path):
    rng = np.random.default_rng(7)
    crops = [_crop(rng, 30, 40, f"r{i}") for i in range(2)]
    cfg = dict(preset="no-dilation", device="cpu", intensity="hu1000", epochs=1)
    Trainer(TrainConfig(precision="fp32", **cfg), crops, crops, tmp_path).fit()
    again = Trainer(TrainConfig(precision="bf16", epochs=2, **{k: v for k, v in cfg.items() if k != "epochs"}),
                    crops, crops, tmp_path)
    assert again.resume() and again.start_epoch == 1


def test_unknown_precision_is_refused():
    from ILDSegmentationLib.errors import InputError
    with pytest.raises(InputError, match="unknown precision 'fp8'"):
        TrainConfig(precision="fp8")


def test_training_processes_keep_freed_memory_instead_of_faulting_in_new_pages():
    """After keep_freed_memory, a training step reuses the memory the previous steps
    freed instead of mapping (and faulting in) fresh pages. Measured here on 2-core
    AMD EPYCs: ~850 minor faults per step against 5,700-20,000 with glibc's defaults."""
    code = """
import resource, sys, torch
import torch.nn.functional as F
torch.set_num_threads(1)
if sys.argv[1] == "tuned":
    from ILDSegmentationLib.training.allocator import keep_freed_memory
    assert keep_freed_memory()
from ILDSegmentationLib.engine.network import DilatedFCN
net = DilatedFCN().train()
opt = torch.optim.Adam(net.parameters())
shapes = [(120, 150), (110, 160), (130, 140)]
def step(h, w):
    opt.zero_grad()
    F.cross_entropy(net(torch.randn(1, 1, h, w)), torch.randint(0, 6, (1, h, w))).backward()
    opt.step()
for s in shapes:  # warm-up: the first steps map their memory either way
    step(*s)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(6):
    step(*shapes[i % 3])
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 6)
"""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt is a Linux setting")
    faults = {mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("plain", "tuned")}
    assert faults["tuned"] * 3 < faults["plain"], faults


def test_fast_and_reference_epochs_add_the_fine_tuning_pull_alike(tmp_path):
    """The fine-tuning pull (distillation + L2-SP, training/finetune.py) hooked into both
    loops: the fast trainer's per-shape passes end with the reference trainer's weights,
    and the pull changes the weights (the hook runs)."""
    from ILDSegmentationLib.training.finetune import StartModelPull
    rng = np.random.default_rng(7)
    crops = [_crop(rng, 30 + 3 * (i % 3), 40, f"t{i}") for i in range(6)]
    weights = {}
    for fast, pulled in ((False, True), (True, True), (True, False)):
        cfg = TrainConfig(preset="proposed", device="cpu", batch_size=3, precision="fp32", fast=fast,
                          intensity="hu1000")
        trainer = Trainer(cfg, crops, crops[:2], tmp_path / f"{fast}-{pulled}")
        trainer.network.dropout.p = 0.0
        with torch.no_grad():  # a teacher unlike the student, so that distillation pulls
            teacher = DilatedFCN(trainer.network.config)
            torch.manual_seed(11)
            for p in teacher.parameters():
                p.add_(0.05 * torch.randn_like(p))
        if pulled:
            pull = StartModelPull(teacher, distill_weight=5.0, l2sp_weight=1.0, alpha=trainer.alpha)
            pull.start = {n: p.detach().clone() for n, p in teacher.named_parameters()}
            trainer.regularizer = pull
        loss = trainer._epoch(0)
        weights[fast, pulled] = (loss, torch.cat([p.detach().reshape(-1) for p in trainer.network.parameters()]))
    assert weights[True, True][0] == pytest.approx(weights[False, True][0], rel=1e-5)
    torch.testing.assert_close(weights[True, True][1], weights[False, True][1], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(weights[True, True][1], weights[True, False][1], rtol=1e-4, atol=1e-6)


def test_a_run_from_a_model_resumes_after_the_model_file_metadata_changes_but_not_its_weights(tmp_path):
    """The start weights are named by their checksum, not the file's: writing the
    model's decision rule into its file (bench/decision_rule.py --write-model) must not
    orphan the runs that started from it; other weights still must."""
    import dataclasses

    from ILDSegmentationLib.engine.modelfile import load_model, save_model
    from ILDSegmentationLib.errors import InputError

    start = load_model(None)
    first = save_model(tmp_path / "start.safetensors", start.network, start.info)
    rng = np.random.default_rng(8)
    crops = [_crop(rng, 30, 40, f"m{i}") for i in range(2)]
    cfg = dict(preset="proposed", device="cpu", intensity=start.info.intensity.name, precision="fp32")
    run = Trainer(TrainConfig(epochs=1, **cfg), crops, crops, tmp_path / "run")
    run.initialize_from(load_model(first))
    run.fit()

    relabelled = save_model(tmp_path / "relabelled.safetensors", start.network,
                            dataclasses.replace(start.info, decision={"default": "paper"}))
    assert relabelled.read_bytes() != first.read_bytes()
    again = Trainer(TrainConfig(epochs=2, **cfg), crops, crops, tmp_path / "run")
    again.initialize_from(load_model(relabelled))
    assert again.resume() and again.start_epoch == 1

    with torch.no_grad():
        next(start.network.parameters()).add_(0.01)
    other = save_model(tmp_path / "other.safetensors", start.network, start.info)
    refused = Trainer(TrainConfig(epochs=2, **cfg), crops, crops, tmp_path / "run")
    refused.initialize_from(load_model(other))
    with pytest.raises(InputError, match="other settings"):
        refused.resume()

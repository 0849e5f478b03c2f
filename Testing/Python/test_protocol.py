"""The paper's protocol (SPEC section 3), each rule pinned to an independent expectation.

Every expected value here is written out by hand (literal numbers, fractions worked
out in the comments) or computed with plain numpy from the definition in the paper;
none is computed by the code under test. Where the trainer is checked, the test spies
on what it really hands to the loss (``ild_loss`` as the trainer module calls it) and
recomputes that loss from the paper's formula.

Anthimopoulos et al. 2018, as SPEC section 3 summarizes it:
- per-lung crops: bounding box + 32 px on each side, the same in training and inference;
- loss: weighted cross entropy on annotated pixels (w_i ~ 1 / n_i), plus
  -a * w_u * sum(p log p) *summed* over unannotated lung pixels, w_u = 0.1, a from the
  share of unlabelled to labelled pixels; pixels outside the lung take no part;
- Adam, lr 1e-4, one crop per step, one of the 8 flips/rotations per crop and epoch;
  stop when validation BACC has not improved by 0.5 % (relative) for 50 epochs, keep
  the best weights;
- network: ten 3x3 blocks of 32 kernels, dilations 1,1,2,3,5,8,13,21,34,55, dropout 0.5
  before the 1x1 blocks of 128 and 32.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ILDSegmentationLib.engine import cropping
from ILDSegmentationLib.commands.cli import build_parser
from ILDSegmentationLib.engine.cropping import crop_boxes
from ILDSegmentationLib.imaging.lungsides import LEFT_LUNG, RIGHT_LUNG, split_left_right
from ILDSegmentationLib.imaging.geometry import Geometry
from ILDSegmentationLib.engine.inference import Inferer
from ILDSegmentationLib.engine.network import DilatedFCN, NetworkConfig
from ILDSegmentationLib.engine.preprocessing import INTENSITY_PRESETS
from ILDSegmentationLib.training import batching as batching_module
from ILDSegmentationLib.training import trainer as trainer_module
from ILDSegmentationLib.training.dataset import Crop, crops_from_arrays, dihedral
from ILDSegmentationLib.training.loss import ild_loss
from ILDSegmentationLib.training.metrics import summarize
from ILDSegmentationLib.training.trainer import TrainConfig, Trainer

from synthetic import random_model


# -- the loss, by hand --------------------------------------------------------------------

def _softmax(logits: np.ndarray) -> np.ndarray:
    """(C, ...) -> probabilities along axis 0, float64."""
    z = logits - logits.max(axis=0, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=0, keepdims=True)


def _paper_loss(logits: np.ndarray, target: np.ndarray, lung: np.ndarray, weights, w_u: float, a: float) -> float:
    """Eq. 1 of the paper for one crop, from its definition: annotated lung pixels
    -w_t log p_t, unannotated lung pixels -a w_u sum_j p_j log p_j (summed), divided by
    the number of pixels that take part. logits (C, H, W), target (H, W) with -1 where
    unannotated, lung (H, W) bool."""
    p = _softmax(logits.astype(np.float64))
    total, n = 0.0, 0
    for (r, c), t in np.ndenumerate(target):
        if not lung[r, c]:
            continue
        n += 1
        if t >= 0:
            total += -weights[t] * np.log(p[t, r, c])
        else:
            total += -a * w_u * float(np.sum(p[:, r, c] * np.log(p[:, r, c])))
    return total / max(n, 1)


def test_entropy_term_is_summed_over_several_unlabelled_pixels():
    """Crop 1: two annotated pixels (classes 0 and 3), three unannotated lung pixels,
    one outside the lung. Crop 2: one annotated, three unannotated, two of which are
    padding (``valid`` false). Expected values from the paper's formula in numpy."""
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, (2, 6, 2, 3))
    target = np.array([[[0, 3, -1], [-1, -1, -1]],
                       [[2, -1, -1], [-1, -1, -1]]])
    lung = np.array([[[True, True, True], [True, True, False]],
                     [[True, True, True], [True, False, False]]])
    valid = np.array([[[True] * 3, [True] * 3],
                      [[True, True, False], [False, True, True]]])
    weights = np.array([0.5, 1.0, 1.5, 2.0, 1.0, 1.0])
    loss = ild_loss(torch.tensor(logits, dtype=torch.float32), torch.tensor(target), torch.tensor(lung),
                    torch.tensor(weights, dtype=torch.float32), unsupervised_weight=0.1, alpha=0.4,
                    valid=torch.tensor(valid))
    p = _softmax(logits[0])
    entropy = [-(p[:, r, c] * np.log(p[:, r, c])).sum() for r, c in ((0, 2), (1, 0), (1, 1))]
    crop1 = (-0.5 * np.log(p[0, 0, 0]) - 2.0 * np.log(p[3, 0, 1]) + 0.4 * 0.1 * sum(entropy)) / 5
    q = _softmax(logits[1])
    crop2 = (-1.5 * np.log(q[2, 0, 0]) - 0.4 * 0.1 * (q[:, 0, 1] * np.log(q[:, 0, 1])).sum()) / 2
    assert float(loss) == pytest.approx((crop1 + crop2) / 2, rel=1e-5)
    # The general helper agrees on crop 1 (it is used for the trainer below).
    assert crop1 == pytest.approx(_paper_loss(logits[0], target[0], lung[0], weights, 0.1, 0.4), rel=1e-12)
    # Mean and sum differ here (three unlabelled pixels), so an averaged term would fail:
    averaged = (-0.5 * np.log(p[0, 0, 0]) - 2.0 * np.log(p[3, 0, 1]) + 0.4 * 0.1 * np.mean(entropy)) / 5
    assert abs(crop1 - averaged) > 1e-3


# -- what the trainer hands to the loss -----------------------------------------------------

def _hand_crops():
    """Two training crops written out pixel by pixel.

    A (12 x 10): lung rows 1..10, columns 1..8 (80 pixels); class 0 on row 2, columns
    1..6 (6 pixels); class 3 on row 5, columns 1..2 (2 pixels): 72 unannotated.
    B (10 x 12): lung rows 1..8, columns 2..9 (64 pixels); class 0 on row 3, columns
    2..5 (4 pixels); class 1 on row 6, columns 2..4 (3 pixels): 57 unannotated.
    """
    rng = np.random.default_rng(0)
    lung_a = np.zeros((12, 10), bool)
    lung_a[1:11, 1:9] = True
    t_a = np.full((12, 10), -1, np.int64)
    t_a[2, 1:7] = 0
    t_a[5, 1:3] = 3
    lung_b = np.zeros((10, 12), bool)
    lung_b[1:9, 2:10] = True
    t_b = np.full((10, 12), -1, np.int64)
    t_b[3, 2:6] = 0
    t_b[6, 2:5] = 1
    a = Crop("a", 0, RIGHT_LUNG, rng.normal(-0.8, 0.1, (12, 10)).astype(np.float32), t_a, lung_a)
    b = Crop("b", 0, LEFT_LUNG, rng.normal(-0.7, 0.1, (10, 12)).astype(np.float32), t_b, lung_b)
    return [a, b]


# Class pixel counts 10 (class 0), 3 (class 1), 2 (class 3). w_i ~ 1/n_i, averaging 1
# over the 3 classes present: w_i = 3 / (n_i (1/10 + 1/3 + 1/2)) = 90 / (28 n_i).
HAND_WEIGHTS = np.array([9 / 28, 15 / 14, 0.0, 45 / 28, 0.0, 0.0])
# a = labelled / unlabelled pixels over the training set = (8 + 7) / (72 + 57).
HAND_ALPHA = 15 / 129


def _d4(array: np.ndarray):
    """The eight flips/rotations of a 2D array, written independently of dihedral()."""
    return [np.rot90(array, r) for r in range(4)] + [np.rot90(array.T, r) for r in range(4)]


def _spy_on_loss(monkeypatch):
    calls = []

    def spy(logits, target, lung, weights, unsupervised_weight=0.1, alpha=1.0, valid=None):
        value = ild_loss(logits, target, lung, weights, unsupervised_weight, alpha, valid)
        calls.append(dict(logits=logits.detach().double().numpy().copy(), target=target.numpy().copy(),
                          lung=lung.numpy().copy(), weights=weights.detach().double().numpy().copy(),
                          w_u=unsupervised_weight, alpha=alpha, valid=valid, value=float(value.detach())))
        return value
    monkeypatch.setattr(trainer_module, "ild_loss", spy)
    return calls


def test_trainer_hands_the_loss_the_papers_weights_scale_and_pixels(monkeypatch, tmp_path):
    crops = _hand_crops()
    calls = _spy_on_loss(monkeypatch)
    trainer = Trainer(TrainConfig(epochs=1, device="cpu", intensity="hu1000", seed=1), crops, crops[:1],
                      tmp_path / "run")
    loss = trainer._epoch(0)
    assert len(calls) == 2, "batch of one crop: one loss call per crop and epoch"
    ids = []
    for call in calls:
        np.testing.assert_allclose(call["weights"], HAND_WEIGHTS, rtol=1e-6)
        assert call["alpha"] == pytest.approx(HAND_ALPHA, rel=1e-12)
        assert call["w_u"] == 0.1 and call["valid"] is None
        # The target and lung it gets are one crop's, under one of the eight transforms,
        # target and lung alike.
        t, lung = call["target"][0], call["lung"][0]
        matches = [(c.case_id, k) for c in crops for k, (tt, ll) in enumerate(zip(_d4(c.target), _d4(c.lung)))
                   if tt.shape == t.shape and np.array_equal(tt, t) and np.array_equal(ll, lung)]
        assert matches, "the loss got a target/lung pair that is no flip/rotation of a training crop"
        ids.append(matches[0][0])
        expected = _paper_loss(call["logits"][0], t, lung, HAND_WEIGHTS, 0.1, HAND_ALPHA)
        assert call["value"] == pytest.approx(expected, rel=1e-4)
    assert sorted(ids) == ["a", "b"], "every crop once per epoch"
    # The epoch's loss is the mean of its steps' losses.
    assert loss == pytest.approx(np.mean([c["value"] for c in calls]), rel=1e-6)


def test_purely_supervised_and_unscaled_runs_hand_the_loss_their_settings(monkeypatch, tmp_path):
    crops = _hand_crops()
    calls = _spy_on_loss(monkeypatch)
    Trainer(TrainConfig(preset="purely-supervised", device="cpu", intensity="hu1000"), crops, crops[:1],
            tmp_path / "a")._epoch(0)
    Trainer(TrainConfig(entropy_scaling="none", device="cpu", intensity="hu1000"), crops, crops[:1],
            tmp_path / "b")._epoch(0)
    assert [c["w_u"] for c in calls] == [0.0, 0.0, 0.1, 0.1]
    assert [c["alpha"] for c in calls[2:]] == [1.0, 1.0]


def test_every_crop_meets_all_eight_flips_and_rotations(monkeypatch, tmp_path):
    """One of the eight transformations per crop and epoch, drawn from all eight."""
    rng = np.random.default_rng(1)
    crops = [Crop(f"c{i}", 0, RIGHT_LUNG, rng.normal(size=(5, 6)).astype(np.float32),
                  np.where(rng.random((5, 6)) < 0.3, 0, -1), np.ones((5, 6), bool)) for i in range(40)]
    seen = []

    def spy(array, k):
        seen.append(k)
        return dihedral(array, k)
    monkeypatch.setattr(batching_module, "dihedral", spy)
    # One batch of all 40 equal-shaped crops: the draw is per crop whatever the batch
    # size, and one step keeps this fast.
    Trainer(TrainConfig(preset="no-dilation", device="cpu", intensity="hu1000", batch_size=40), crops, crops[:1], tmp_path / "a")._epoch(0)
    # image, target and lung of each crop get the same k: 3 calls per crop.
    ks = seen[::3]
    assert seen == [k for k in ks for _ in range(3)]
    assert len(ks) == 40 and set(ks) == set(range(8))
    seen.clear()
    Trainer(TrainConfig(preset="no-dilation", device="cpu", intensity="hu1000", augment=False, batch_size=40), crops, crops[:1],
            tmp_path / "b")._epoch(0)
    assert set(seen) == {0}


def test_dihedral_is_exactly_the_eight_symmetries_of_the_square():
    a = np.arange(12).reshape(3, 4)
    got = [dihedral(a, k) for k in range(8)]
    expected = _d4(a)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)


# -- early stopping --------------------------------------------------------------------------

def test_early_stopping_is_relative_half_percent_with_patience_and_keeps_the_best(monkeypatch, tmp_path):
    """Scripted validation BACCs, patience 3, the default 0.5 % relative rule:

    epoch 1: 0.6000 first, best
    epoch 2: 0.6029 < 0.6000 * 1.005 = 0.6030: no
    epoch 3: 0.6031 >= 0.6030: best (an absolute 0.005 rule would say no)
    epoch 4: 0.6050 < 0.6031 * 1.005 = 0.60612: no
    epoch 5: 0.6060: no
    epoch 6: 0.6061: no -> three epochs without improvement: stop after epoch 6.
    """
    script = [0.6000, 0.6029, 0.6031, 0.6050, 0.6060, 0.6061, 0.99, 0.99]
    seen_states = []
    cm = np.diag([5, 5, 0, 0, 0, 0])

    def scripted(network, crops, device, **how):  # how: the fast path and autocast, irrelevant here
        seen_states.append({k: v.detach().clone() for k, v in network.state_dict().items()})
        out = summarize(cm)
        if len(seen_states) <= len(script):
            out["balanced_accuracy"] = script[len(seen_states) - 1]
        return out
    monkeypatch.setattr(trainer_module, "validation_metrics", scripted)
    crops = _hand_crops()
    trainer = Trainer(TrainConfig(preset="no-dilation", epochs=40, patience=3, device="cpu", intensity="hu1000",
                                  batch_size=2), crops,
                      crops[:1], tmp_path / "run")
    summary = trainer.fit()
    assert summary["epochs_run"] == 6 and summary["best_epoch"] == 3
    assert [r.best for r in trainer.history] == [True, False, True, False, False, False]
    # The weights kept (and written) are those validated after epoch 3, not the last.
    best = seen_states[2]
    for k, v in trainer.network.state_dict().items():
        assert torch.equal(v.cpu(), best[k]), k
    assert any(not torch.equal(seen_states[5][k], best[k]) for k in best), "training moved the weights"
    from ILDSegmentationLib.engine.modelfile import load_model
    saved = load_model(tmp_path / "run" / "model.safetensors").network.state_dict()
    for k, v in best.items():
        assert torch.equal(saved[k], v), k


# -- the paper's constants --------------------------------------------------------------------

def test_training_defaults_are_the_papers():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.patience, cfg.min_rel_improvement, cfg.unsupervised_weight, cfg.batch_size) == \
        (1e-4, 50, 0.005, 0.1, 1)
    assert cfg.augment and cfg.crops_per_epoch == 0 and cfg.preset == "proposed"
    assert cfg.intensity_augmentation == "none" and cfg.entropy_scaling == "ratio"
    args = build_parser().parse_args(["train", "--manifest", "m.csv", "--out", "run"])
    assert (args.lr, args.patience, args.min_rel_improvement, args.unsupervised_weight, args.batch_size) == \
        (1e-4, 50, 0.005, 0.1, 1)
    assert not args.no_augment and args.crops_per_epoch == 0 and args.preset == "proposed"
    assert args.intensity_augmentation == "none" and args.entropy_scaling == "ratio"


def test_trainer_uses_adam_at_the_configured_rate(tmp_path):
    crops = _hand_crops()
    t = Trainer(TrainConfig(device="cpu"), crops, crops[:1], tmp_path / "run")
    assert type(t.optimizer) is torch.optim.Adam
    assert [g["lr"] for g in t.optimizer.param_groups] == [1e-4]
    assert t.optimizer.param_groups[0]["weight_decay"] == 0


def test_network_constants_are_the_papers():
    cfg = NetworkConfig()
    assert cfg.dilations == (1, 1, 2, 3, 5, 8, 13, 21, 34, 55)
    assert (cfg.width, cfg.kernel_size, cfg.head, cfg.dropout, cfg.num_classes) == (32, 3, (128, 32), 0.5, 6)
    assert cfg.concatenate and cfg.norm and cfg.norm_skip
    net = DilatedFCN()
    assert isinstance(net.dropout, torch.nn.Dropout) and net.dropout.p == 0.5
    assert [b.conv.dilation for b in net.dilated] == [(d, d) for d in (1, 1, 2, 3, 5, 8, 13, 21, 34, 55)]
    assert [b.conv.padding for b in net.dilated] == [(d, d) for d in (1, 1, 2, 3, 5, 8, 13, 21, 34, 55)]
    assert [b.conv.kernel_size for b in net.dilated] == [(3, 3)] * 10
    assert [b.conv.out_channels for b in net.dilated] == [32] * 10
    assert [b.conv.in_channels for b in net.head] == [321, 128]
    assert (net.classifier.in_channels, net.classifier.out_channels) == (32, 6)
    assert cropping.CROP_MARGIN == 32


def test_weights_start_he_normal_with_zero_biases():
    """He-normal (std sqrt(2 / fan_in)) as the authors' demo; SPEC section 3."""
    torch.manual_seed(0)
    net = DilatedFCN()
    for conv, fan_in in ((net.dilated[0].conv, 9), (net.dilated[5].conv, 32 * 9), (net.head[0].conv, 321)):
        std = float(conv.weight.detach().std())
        assert std == pytest.approx((2 / fan_in) ** 0.5, rel=0.1), (conv, std)
        assert float(conv.bias.detach().abs().max()) == 0.0


def test_validation_scores_annotated_lung_pixels_in_eval_mode():
    """Validation BACC: mean over the classes present of correct / annotated, annotated
    lung pixels only, the network in eval mode (no dropout): computed here by hand."""
    torch.manual_seed(2)
    net = DilatedFCN(NetworkConfig(dropout=0.5)).train()
    rng = np.random.default_rng(4)
    crops = []
    for i, (h, w) in enumerate(((24, 24), (20, 26))):
        lung = np.zeros((h, w), bool)
        lung[2:-2, 2:-2] = True
        target = np.where(lung & (rng.random((h, w)) < 0.5), rng.choice([0, 1, 3, 4, 5], (h, w)), -1)
        target[0, 0] = 2  # annotated but outside the lung: does not count
        crops.append(Crop(f"v{i}", 0, RIGHT_LUNG, rng.normal(0, 1, (h, w)).astype(np.float32), target, lung))
    with torch.inference_mode():
        net.eval()
        preds = [net(torch.from_numpy(c.image)[None, None])[0].argmax(0).numpy() for c in crops]
        torch.manual_seed(0)
        net.train()
        dropped = [net(torch.from_numpy(c.image)[None, None])[0].argmax(0).numpy() for c in crops]
    cm = np.zeros((6, 6), np.int64)
    for c, pred in zip(crops, preds):
        for (r, col), t in np.ndenumerate(c.target):
            if t >= 0 and c.lung[r, col]:
                cm[t, pred[r, col]] += 1
    assert (cm.sum(axis=0) > 0).sum() >= 3, "the network must predict several classes for this test to mean much"
    assert any((a != b).any() for a, b in zip(preds, dropped)), "dropout changes labels here"
    bacc = np.mean([cm[i, i] / cm[i].sum() for i in (0, 1, 3, 4, 5)])
    for _ in range(2):  # twice, the network left in training mode as the trainer leaves it
        got = trainer_module.validation_metrics(net, crops, torch.device("cpu"))
        np.testing.assert_array_equal(got["confusion_matrix"], cm)
        assert got["balanced_accuracy"] == pytest.approx(bacc, abs=1e-12)
        net.train()


# -- crops: the 32 px margin, the same in training and inference -------------------------------

def _two_box_lungs():
    """K, J, I = 2, 200, 240 with identity geometry: canonical slice 0 is K = 1 (slices
    run head first), rows are J, columns I. Lungs on K = 1 only:
    right: rows 50..99, columns 40..89 -> crop rows 18..132, columns 8..122 (114 x 114);
    left: rows 60..109, columns 150..229 -> crop rows 28..142, columns 118..240 (the
    image ends at 240; 229 + 1 + 32 = 262 is clipped), 114 x 122."""
    rng = np.random.default_rng(3)
    hu = rng.integers(-1000, 200, (2, 200, 240)).astype(np.int16)
    mask = np.zeros(hu.shape, np.uint8)
    mask[1, 50:100, 40:90] = 1
    mask[1, 60:110, 150:230] = 1
    ann = np.zeros(hu.shape, np.uint8)
    ann[1, 60:70, 50:60] = 2
    ann[1, 80:90, 160:170] = 4
    ann[1, 20, 20] = 2  # inside the right crop, outside the lung: no target
    return hu, mask, ann


EXPECTED_BOXES = {RIGHT_LUNG: (18, 132, 8, 122), LEFT_LUNG: (28, 142, 118, 240)}


def test_crop_boxes_are_the_lung_box_plus_32_pixels():
    hu, mask, _ = _two_box_lungs()
    sides = split_left_right(mask[::-1])  # canonical: head first
    boxes = {b.side: (b.r0, b.r1, b.c0, b.c1) for b in crop_boxes(sides[0], 0)}
    assert boxes == EXPECTED_BOXES


def test_training_crops_are_the_inference_crops(tmp_path):
    """The same mask gives training the crops inference feeds the network: the boxes
    written out above, and pixel for pixel the same network input."""
    hu, mask, ann = _two_box_lungs()
    intensity = INTENSITY_PRESETS["hu1000"]
    crops = crops_from_arrays("c", hu, mask, ann, Geometry((1.0, 1.0, 2.0)), intensity)
    by_side = {c.side: c for c in crops}
    assert sorted(by_side) == [RIGHT_LUNG, LEFT_LUNG] and len(crops) == 2
    for side, (r0, r1, c0, c1) in EXPECTED_BOXES.items():
        c = by_side[side]
        assert c.slice_index == 0
        np.testing.assert_array_equal(c.image, intensity.apply(hu[1, r0:r1, c0:c1]))
        np.testing.assert_array_equal(c.lung, mask[1, r0:r1, c0:c1] > 0)  # the other lung lies outside
    assert by_side[RIGHT_LUNG].target[60 - 18, 50 - 8] == 1 and by_side[LEFT_LUNG].target[80 - 28, 160 - 118] == 3
    assert by_side[RIGHT_LUNG].target[20 - 18, 20 - 8] == -1, "annotations outside the lung are no target"
    assert (by_side[RIGHT_LUNG].target >= 0).sum() == 100 and (by_side[LEFT_LUNG].target >= 0).sum() == 100

    model = random_model(tmp_path)
    fed = []
    hook = model.network.register_forward_pre_hook(lambda m, args: fed.append(args[0].numpy().copy()))
    try:
        Inferer(model, device="cpu", max_memory_mb=0.001, pixel_spacing="native").segment(
            hu, mask, Geometry((1.0, 1.0, 2.0)))
    finally:
        hook.remove()
    assert sorted(x.shape for x in fed) == [(1, 1, 114, 114), (1, 1, 114, 122)]
    for c in crops:
        assert any(x.shape[2:] == c.image.shape and np.array_equal(x[0, 0], c.image) for x in fed), c.side

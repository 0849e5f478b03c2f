from __future__ import annotations

import pytest
import torch

from ILDSegmentationLib.engine.network import (PAPER_TABLE_II, PRESETS, DilatedFCN, InstanceNorm, NetworkConfig,
                                               count_parameters, describe)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_counts_match_table_ii(name):
    params = count_parameters(DilatedFCN(PRESETS[name]))
    paper = PAPER_TABLE_II[name][0] * 1e5
    assert abs(params - paper) / paper <= 0.025, (name, params, paper)


def test_proposed_layout_exactly():
    d = describe(PRESETS["proposed"])
    assert d["parameters"] == 130_056  # SPEC section 3
    assert d["receptive_field"] == 287
    assert [layer["channels"] for layer in d["layers"]] == [1] + [32] * 10 + [321, 128, 32, 6]


@pytest.mark.parametrize("h,w", [(37, 53), (5, 5), (1, 9), (64, 1)])
def test_any_input_size_gives_same_size_output(h, w):
    net = DilatedFCN().eval()
    with torch.inference_mode():
        out = net(torch.randn(2, 1, h, w))
    assert out.shape == (2, 6, h, w)
    assert torch.isfinite(out).all()


def test_receptive_field_is_287_pixels():
    # Instance norm makes every output depend on every input through the statistics,
    # so measure the convolutional receptive field on the no-norm ablation.
    net = DilatedFCN(PRESETS["no-norm"]).eval()
    size = 301
    x = torch.randn(1, 1, size, size, requires_grad=True)
    net(x)[0, :, size // 2, size // 2].sum().backward()
    cols = torch.nonzero(x.grad[0, 0].abs().sum(dim=0)).flatten()
    rows = torch.nonzero(x.grad[0, 0].abs().sum(dim=1)).flatten()
    assert int(cols[-1] - cols[0] + 1) == 287
    assert int(rows[-1] - rows[0] + 1) == 287


def test_normalization_uses_the_image_statistics_in_eval_mode():
    torch.manual_seed(0)
    net = DilatedFCN(NetworkConfig(dropout=0.0))
    assert not list(net.buffers()), "no running statistics may exist"
    x = torch.randn(1, 1, 40, 40) * 200 - 700
    net.train()
    train_out = net(x)
    net.eval()
    eval_out = net(x)
    torch.testing.assert_close(train_out, eval_out)
    # Each image is normalized on its own: a batch gives the same as images alone.
    y = torch.randn(1, 1, 40, 40) * 50 + 30
    both = net(torch.cat([x, y]))
    torch.testing.assert_close(both[1:], net(y), rtol=1e-4, atol=1e-3)


def test_instance_norm_normalizes_per_image_and_channel():
    norm = InstanceNorm(3).eval()
    x = torch.randn(2, 3, 16, 16) * 40 + 500
    y = norm(x)
    torch.testing.assert_close(y.mean(dim=(2, 3)), torch.zeros(2, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.std(dim=(2, 3), unbiased=False), torch.ones(2, 3), atol=1e-3, rtol=0)


@pytest.mark.parametrize("preset", ["proposed", "no-norm-skip", "no-concat"])
def test_padded_masked_batch_equals_each_crop_alone(preset):
    torch.manual_seed(1)
    net = DilatedFCN(PRESETS[preset]).eval()
    a = torch.randn(1, 1, 70, 90) * 300 - 700
    b = torch.randn(1, 1, 100, 64) * 300 - 700
    x = torch.zeros(2, 1, 100, 96)
    valid = torch.zeros(2, 1, 100, 96)
    x[0, :, :70, :90], valid[0, :, :70, :90] = a[0], 1
    x[1, :, :100, :64], valid[1, :, :100, :64] = b[0], 1
    with torch.inference_mode():
        batched = net(x, valid)
        alone_a, alone_b = net(a), net(b)
    scale = max(alone_a.abs().max(), alone_b.abs().max())
    torch.testing.assert_close(batched[0:1, :, :70, :90] / scale, alone_a / scale, atol=2e-5, rtol=0)
    torch.testing.assert_close(batched[1:2, :, :100, :64] / scale, alone_b / scale, atol=2e-5, rtol=0)


def test_config_round_trip_and_validation():
    cfg = PRESETS["exponential-dilation"]
    assert NetworkConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        NetworkConfig.from_dict({**cfg.to_dict(), "depth": 3})
    with pytest.raises(ValueError):
        NetworkConfig.from_dict({**cfg.to_dict(), "width": "32"})
    with pytest.raises(ValueError):
        NetworkConfig(dilations=(1, 0))

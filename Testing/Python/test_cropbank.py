"""Crop banks (training crops saved for a machine without the CT files) and the
trainer's wall-clock limit."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ILDSegmentationLib.errors import InputError
from ILDSegmentationLib.engine.preprocessing import INTENSITY_PRESETS
from ILDSegmentationLib.training.cropbank import hu_crops, load_crop_bank, save_crop_bank
from ILDSegmentationLib.training.dataset import load_case_crops
from ILDSegmentationLib.training.manifest import read_manifest
from ILDSegmentationLib.training.trainer import TrainConfig, Trainer

from training_data import make_manifest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return read_manifest(make_manifest(tmp_path_factory.mktemp("data"), 2, shape=(6, 48, 64)))


def test_a_bank_gives_back_the_crops_the_manifest_gives(cases, tmp_path):
    """Loaded with an intensity handling, a bank's crops equal those cut from the
    case files with it: images, targets, lung, slice, side and pixel size."""
    intensity = INTENSITY_PRESETS["hu1000"]
    saved = hu_crops(cases[0]) + hu_crops(cases[1])
    save_crop_bank(tmp_path / "bank.npz", saved, ["train"] * 3 + ["val"] * (len(saved) - 3))
    loaded, groups = load_crop_bank(tmp_path / "bank.npz", intensity)
    direct = load_case_crops(cases[0], intensity) + load_case_crops(cases[1], intensity)
    assert groups == ["train"] * 3 + ["val"] * (len(direct) - 3)
    assert len(loaded) == len(direct) > 3
    for a, b in zip(loaded, direct):
        assert (a.case_id, a.slice_index, a.side, a.pixel_spacing_mm) == (b.case_id, b.slice_index, b.side,
                                                                          b.pixel_spacing_mm)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.target, b.target)
        np.testing.assert_array_equal(a.lung, b.lung)
        assert a.image.dtype == np.float32 and a.target.dtype == np.int64 and a.lung.dtype == bool


def test_max_slices_keeps_evenly_spread_slices(cases):
    every = sorted({c.slice_index for c in hu_crops(cases[0])})
    assert len(every) == 5  # the made-up case's lungs lie on 5 of its 6 slices
    kept = sorted({c.slice_index for c in hu_crops(cases[0], max_slices=3)})
    assert kept == [every[0], every[2], every[4]]


def test_a_file_that_is_not_a_bank_is_refused(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a crop bank"):
        load_crop_bank(tmp_path / "x.npz", INTENSITY_PRESETS["hu"])
    np.savez(tmp_path / "y.npz", shapes=np.zeros((1, 2), np.int32))
    with pytest.raises(InputError, match="not a crop bank"):
        load_crop_bank(tmp_path / "y.npz", INTENSITY_PRESETS["hu"])


def test_a_bank_with_an_object_array_is_never_unpickled(tmp_path):
    """Data, never code: a bank whose header is a pickled object is refused."""
    np.savez(tmp_path / "evil.npz", header=np.array([{"format": "x"}], dtype=object),
             shapes=np.zeros((0, 2), np.int32), image=np.zeros(0, np.int16), target=np.zeros(0, np.int8),
             lung=np.zeros(0, np.uint8))
    with pytest.raises(InputError, match="not a crop bank"):
        load_crop_bank(tmp_path / "evil.npz", INTENSITY_PRESETS["hu"])


def test_training_stops_after_the_epoch_that_passes_the_time_limit(cases, tmp_path):
    intensity = INTENSITY_PRESETS["hu1000"]
    train, val = load_case_crops(cases[0], intensity), load_case_crops(cases[1], intensity)
    config = TrainConfig(epochs=50, lr=1e-3, intensity="hu1000", device="cpu", seed=1, batch_size=4)
    trainer = Trainer(config, train, val, tmp_path / "run")
    summary = trainer.fit(time_limit_s=1e-9)  # any epoch passes it
    assert summary["epochs_run"] == 1 and (tmp_path / "run" / "model.safetensors").exists()
    # Resumed without a limit, the same run goes on to its epoch limit.
    config2 = TrainConfig(epochs=3, lr=1e-3, intensity="hu1000", device="cpu", seed=1, batch_size=4)
    again = Trainer(config2, train, val, tmp_path / "run")
    assert again.resume()
    assert again.fit()["epochs_run"] == 3


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_a_bad_time_limit_is_refused_in_one_line(value, tmp_path):
    (tmp_path / "m.csv").write_text("case_id,ct,lung_mask,annotation\n")  # the option is checked before it is read
    r = subprocess.run([sys.executable, "-m", "ILDSegmentationLib", "train", "--manifest", str(tmp_path / "m.csv"),
                        "--out", str(tmp_path / "run"), "--time-limit", value], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"ildseg: error: --time-limit must be a finite number of seconds "
                                             f"above 0, not {float(value)}"]
    assert not (tmp_path / "run").exists()

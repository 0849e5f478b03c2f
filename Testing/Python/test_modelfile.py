from __future__ import annotations

import importlib.util
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from ILDSegmentationLib.errors import ModelFileError
from ILDSegmentationLib.engine.modelfile import ModelInfo, default_model_path, load_model, read_info, save_model
from ILDSegmentationLib.engine.network import PRESETS, DilatedFCN
from ILDSegmentationLib.engine.preprocessing import INTENSITY_PRESETS


def _model(tmp_path, preset="proposed", **info_kw):
    torch.manual_seed(3)
    net = DilatedFCN(PRESETS[preset])
    info = ModelInfo(name="test", network=net.config, provenance={"trained_on": "nothing"}, **info_kw)
    return net, save_model(tmp_path / "m.safetensors", net, info)


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    net, path = _model(tmp_path, preset="width16", intensity=INTENSITY_PRESETS["hu1000"], trained=True)
    loaded = load_model(path)
    assert loaded.info.network == PRESETS["width16"]
    assert loaded.info.intensity == INTENSITY_PRESETS["hu1000"]
    assert loaded.info.trained is True and loaded.info.provenance == {"trained_on": "nothing"}
    assert not loaded.network.training
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.network.state_dict()[k], v)
    assert len(loaded.sha256) == 64
    assert not list(tmp_path.glob(".*part*")), "no temporary file left behind"


def test_bundled_model_says_what_it_is_and_agrees_with_its_model_card():
    """The bundled weights carry their warning and held-out result, and the model card
    beside them states the same numbers."""
    info = read_info(default_model_path())
    assert info.network == PRESETS["proposed"] and info.intensity.name == "hu1000"
    assert info.trained is True
    assert "SIMULATED" in info.provenance["warning"] and "not for clinical use" in info.provenance["warning"]
    held = info.provenance["heldout_evaluation"]
    card = (default_model_path().parent / "README.md").read_text()
    # The card's held-out section is exactly what `train_bundled_model.py --install`
    # writes from this file's metadata.
    spec = importlib.util.spec_from_file_location(
        "train_bundled_model", Path(__file__).resolve().parents[2] / "scripts" / "train_bundled_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.heldout_section(info.provenance) in card
    loco = held["leave_one_ct_out"]
    assert set(loco) == set(script.HELDOUT)
    worst = min(r["balanced_accuracy"] for r in loco.values())
    assert f"{worst:.2f}" in info.provenance["warning"]
    assert f"Leave-one-CT-out balanced accuracy {worst:.3f}" in card  # the card's headline
    for ct, r in loco.items():
        # Each figure comes from a model that never saw that CT, in training or validation.
        assert r["model"]["excluded_backgrounds"] == [ct]
        assert r["annotated_pixels"] == sum(map(sum, r["confusion_matrix"])) > 0
    # The shipped model saw the six CC BY CTs and nothing non-commercial.
    assert sorted(info.provenance["backgrounds"]) == sorted(script.BACKGROUNDS)
    assert not any("ricord" in c or "medseg" in c for c in info.provenance["validation_cases"])
    assert info.pixel_spacing_mm == (0.75, 1.0)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_model_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    path = tmp_path / "model.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": payload}, f)
    with pytest.raises(ModelFileError, match="not a safetensors"):
        load_model(path)
    assert not marker.exists()


def _write_raw(path, header: dict, data: bytes = b"", declared_len=None):
    raw = json.dumps(header).encode()
    n = len(raw) if declared_len is None else declared_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


@pytest.mark.parametrize("declared_len", [10**9, 5000])  # above the header limit; within it, past the file's end
def test_header_larger_than_file_is_refused(tmp_path, declared_len):
    p = _write_raw(tmp_path / "x.safetensors", {"__metadata__": {}}, declared_len=declared_len)
    assert p.stat().st_size < 5000
    with pytest.raises(ModelFileError, match="header length"):
        load_model(p)


def test_huge_tensor_declaration_is_refused_before_allocating(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}
    p = _write_raw(tmp_path / "x.safetensors", header, b"\0" * 16)
    with pytest.raises(ModelFileError, match="does not fit"):
        load_model(p)


def test_truncated_file_is_refused(tmp_path):
    _, path = _model(tmp_path)
    data = path.read_bytes()
    short = tmp_path / "short.safetensors"
    short.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError):
        load_model(short)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(ModelFileError, match="truncated"):
        load_model(tiny)


def _rewrite_metadata(tmp_path, mutate):
    from safetensors.torch import load_file, save_file
    _, path = _model(tmp_path)
    meta = json.loads(read_info_raw(path))
    mutate(meta)
    out = tmp_path / "mutated.safetensors"
    save_file(load_file(str(path)), str(out), metadata={"ildseg": json.dumps(meta)})
    return out


def read_info_raw(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))["__metadata__"]["ildseg"]


@pytest.mark.parametrize("mutate,match", [
    (lambda m: m.pop("network"), "network"),
    (lambda m: m.update(trained="yes"), "trained"),
    (lambda m: m.update(format="other"), "not an ILD"),
    (lambda m: m["classes"].__setitem__(2, {"label": 3, "name": "Emphysema", "color": [0, 0, 0]}), "classes"),
    (lambda m: m["network"].update(width=10**6), "absurdly large|another architecture"),
    (lambda m: m["network"].update(num_classes=4), "classes"),
    (lambda m: m["intensity"].update(scale="x"), "invalid"),
    (lambda m: m.update(format_version=2), "unsupported model format version 2"),
    (lambda m: m.update(pixel_spacing_mm=[1.4, 1.0]), "not a range of pixel sizes"),
    (lambda m: m.update(pixel_spacing_mm=[0.0, 1.0]), "not a range of pixel sizes"),
])
def test_bad_metadata_gives_one_clear_error(tmp_path, mutate, match):
    with pytest.raises(ModelFileError, match=match):
        load_model(_rewrite_metadata(tmp_path, mutate))


def test_weights_of_another_architecture_are_refused(tmp_path):
    from safetensors.torch import save_file
    _, path = _model(tmp_path)
    meta = read_info_raw(path)
    other = DilatedFCN(PRESETS["width16"]).state_dict()
    out = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.items()}, str(out), metadata={"ildseg": meta})
    with pytest.raises(ModelFileError, match="another architecture"):
        load_model(out)


def test_missing_file_and_plain_safetensors(tmp_path):
    from safetensors.torch import save_file
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "nope.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(3)}, str(plain))
    with pytest.raises(ModelFileError, match="without ILD model metadata"):
        load_model(plain)


def test_a_damaged_weight_is_caught_by_the_checksum(tmp_path):
    """One flipped byte in the weights still loads as finite numbers of the right shape,
    and would give other labels: the checksum written with them refuses the file."""
    from ILDSegmentationLib.engine.modelfile import _read_header
    from synthetic import random_model
    good = random_model(tmp_path).path
    data = bytearray(good.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    header = _read_header(good)
    first = sorted(k for k in header if k != "__metadata__")[0]
    offsets = header[first]["data_offsets"]
    data[header_end + offsets[0] + 1] ^= 0x01  # a low mantissa bit: still a finite float
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        load_model(bad)
    load_model(good)


def test_pixel_spacing_range_round_trips_and_a_mismatched_description_is_refused(tmp_path):
    _, path = _model(tmp_path, pixel_spacing_mm=(1.0, 1.4))
    assert load_model(path).info.pixel_spacing_mm == (1.0, 1.4)
    assert read_info(path).pixel_spacing_mm == (1.0, 1.4)
    # A description of another network than the weights saved with it is refused.
    with pytest.raises(ValueError, match="must equal"):
        save_model(tmp_path / "x.safetensors", DilatedFCN(PRESETS["width16"]),
                   ModelInfo(name="x", network=PRESETS["proposed"]))
    assert not (tmp_path / "x.safetensors").exists()


def test_a_single_nan_weight_is_refused(tmp_path):
    """Written without a checksum (as files before it were): the finiteness check alone."""
    from safetensors.torch import load_file, save_file
    _, path = _model(tmp_path)
    state = load_file(str(path))
    name = sorted(state)[0]
    state[name].view(-1)[0] = float("nan")  # one value among finite ones
    out = tmp_path / "nan.safetensors"
    save_file(state, str(out), metadata={"ildseg": read_info_raw(path)})
    with pytest.raises(ModelFileError, match=f"NaN or infinite values \\('{name}'\\)"):
        load_model(out)

"""The bundled model's training recipe (scripts/train_bundled_model.py), short, on two
synthetic backgrounds: simulated cases -> crop banks -> a leave-one-background-out run
that never sees the background it leaves out -> a model file that loads."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from ILDSegmentationLib.engine.modelfile import load_model
from ILDSegmentationLib.simulation.simulate import simulate_case
from ILDSegmentationLib.training.cropbank import AS_HU, load_crop_bank, save_crop_bank
from ILDSegmentationLib.training.dataset import crops_from_arrays

from test_simulate import synthetic_chest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_bundled_model", REPO / "scripts" / "train_bundled_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def banks(tmp_path_factory):
    """Two backgrounds (synthetic chests of other seeds and noise), two simulated cases
    each: the first trains, the second validates, as `prepare` groups them."""
    root = tmp_path_factory.mktemp("bank")
    for name, seed, noise in (("chest-a", 0, 10.0), ("chest-b", 1, 25.0)):
        hu, geometry, mask = synthetic_chest(seed=seed, noise_sd=noise, height_mm=60.0)
        crops, groups = [], []
        for n, group in enumerate(("train", "val")):
            case = simulate_case(hu, geometry, lung_mask=mask, seed=10 * seed + n)
            got = crops_from_arrays(f"{name}-s{n}", case.hu, case.lung_mask, case.annotation, geometry, AS_HU)
            crops += got
            groups += [group] * len(got)
        save_crop_bank(root / f"{name}.npz", crops, groups)
    return root


def test_leave_one_background_out_never_sees_it(script, banks, tmp_path):
    out = tmp_path / "no-b"
    summary = script.train(banks, out, ["chest-b"], time_limit=1e-9, device="cpu", batch_size=2, lr=1e-3,
                           crops_per_epoch=4, seed=0)
    assert summary["epochs_run"] == 1
    model = load_model(out / "model.safetensors")
    prov = model.info.provenance
    assert prov["backgrounds"] == ["chest-a"] and prov["excluded_backgrounds"] == ["chest-b"]
    assert prov["validation_cases"] == ["chest-a-s1"]
    assert prov["training"]["intensity_augmentation"] == "scanner" and prov["training"]["intensity"] == "hu1000"
    # Trained on 1.4 mm crops only: the file says so, and inference uses it.
    assert model.info.pixel_spacing_mm == (1.4, 1.4)
    crops, groups = load_crop_bank(banks / "chest-a.npz", model.info.intensity)
    x = np.stack([crops[0].image])[None]
    import torch
    with torch.inference_mode():
        assert model.network(torch.from_numpy(x)).shape[1] == 6


def test_all_backgrounds_and_a_wrong_name(script, banks, tmp_path):
    script.train(banks, tmp_path / "all", [], time_limit=1e-9, device="cpu", batch_size=2, lr=1e-3,
                 crops_per_epoch=2, seed=0)
    prov = load_model(tmp_path / "all" / "model.safetensors").info.provenance
    assert prov["backgrounds"] == ["chest-a", "chest-b"] and prov["excluded_backgrounds"] == []
    assert prov["validation_cases"] == ["chest-a-s1", "chest-b-s1"]
    with pytest.raises(SystemExit, match="no crop bank"):
        script.train(banks, tmp_path / "x", ["chest-c"], time_limit=1e-9, device="cpu", batch_size=2, lr=1e-3,
                     crops_per_epoch=2, seed=0)


def test_continue_trains_every_run_in_turn_until_early_stopping(script, banks, tmp_path, monkeypatch):
    """`continue` goes round the runs (their state under one folder) until each has
    ended by early stopping; what it leaves per run is the compact state to commit."""
    monkeypatch.setattr(script, "RUNS", {"all": None, "no-b": "chest-b"})
    monkeypatch.setattr(script, "INIT", {})
    state = tmp_path / "state"
    script.keep_training(banks, ["all", "no-b"], 1e-9, dict(device="cpu", batch_size=2, lr=1e-3, crops_per_epoch=2,
                                                            seed=0, patience=1), state)
    for name in ("all", "no-b"):
        assert script._early_stopped(state / name)
        assert (state / name / "checkpoint.safetensors").stat().st_size < 3e6  # compact: ~2 MB a run
        rows = (state / name / "log.csv").read_text().splitlines()
        assert len(rows) >= 3  # header + at least two epochs (patience 1)
    prov = load_model(state / "no-b" / "model.safetensors").info.provenance
    assert prov["excluded_backgrounds"] == ["chest-b"]


def test_gpu_script_runs_its_three_steps_on_a_machine_without_simpleitk(banks, tmp_path):
    """scripts/gpu_run.sh with a tiny budget on the CPU, where the GPU machine's lack of
    SimpleITK is reproduced by an import hook: so that the first GPU minute is never spent
    debugging it."""
    import os
    import subprocess
    import sys
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoSimpleITK:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'SimpleITK':\n"
        "            raise ImportError('no SimpleITK on this machine (as on the lent GPU)')\n"
        "sys.meta_path.insert(0, _NoSimpleITK())\n")
    out = tmp_path / "out"
    # A run state of its own: the repository's training_runs/ belongs to the real crop banks.
    env = dict(os.environ, DEVICE="cpu", RUNS="all", SLICES="2", PYTHON=sys.executable, OMP_NUM_THREADS="1",
               STATE=str(tmp_path / "no-state-yet"),
               PYTHONPATH=os.pathsep.join([str(hook), str(REPO)]))
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_run.sh"), str(banks), str(out), "1"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    log = (out / "gpu.log").read_text()
    assert proc.returncode == 0, log[-2000:]
    assert "training bench reference: exit 0" in log and "training bench fast: exit 0" in log
    assert "all: exit 0" in log and "engine bench: exit 0" in log, log[-2000:]
    assert (out / "training_runs" / "all" / "checkpoint.safetensors").exists()
    assert not (out / "training_runs" / "all" / "model.safetensors").exists()  # only the compact state comes back
    assert (out / "engine.json").exists()
    probe = subprocess.run([sys.executable, "-c", "import SimpleITK"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "no SimpleITK on this machine" in probe.stderr  # the hook does block it

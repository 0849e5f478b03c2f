"""The decision rule (ILDSegmentationLib/engine/decision.py): the paper's argmax and the
class-prior (logit adjustment) rule, carried by the model file and run by the engine."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ILDSegmentationLib.engine.decision import PAPER, DecisionRule, resolve_decision
from ILDSegmentationLib.errors import InputError, ModelFileError
from ILDSegmentationLib.imaging.geometry import Geometry
from ILDSegmentationLib.engine.inference import Inferer
from ILDSegmentationLib.engine.modelfile import load_model, read_info, save_model

from synthetic import random_model, sitk_volume, two_lungs

#: Weights like the bundled model's: inverse to the class pixel counts, healthy lightest.
WEIGHTS = (0.08, 1.0, 1.3, 0.9, 1.1, 1.6)


def _random_probabilities(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (6,) + shape)
    p = np.exp(logits)
    return (p / p.sum(axis=0)).astype(np.float32)


def test_paper_rule_is_the_argmax():
    p = _random_probabilities((40, 30))
    np.testing.assert_array_equal(PAPER.argmax(p), p.argmax(axis=0))
    np.testing.assert_array_equal(DecisionRule("prior", 0.0, WEIGHTS).argmax(p), p.argmax(axis=0))


@pytest.mark.parametrize("tau", [0.3, 1.0, 2.5])
def test_prior_rule_is_the_logit_adjusted_argmax(tau):
    p = _random_probabilities((50, 20), seed=1)
    expected = (np.log(p.astype(np.float64)) - tau * np.log(np.array(WEIGHTS))[:, None, None]).argmax(axis=0)
    got = DecisionRule("prior", tau, WEIGHTS).argmax(p)
    np.testing.assert_array_equal(got, expected)
    # It moves pixels towards the lightly weighted (frequent) class, never away from it.
    paper = p.argmax(axis=0)
    assert np.count_nonzero(got == 0) > np.count_nonzero(paper == 0)
    assert not np.any((paper == 0) & (got != 0))


def test_prior_rule_handles_zero_probabilities():
    p = np.zeros((6, 2), np.float32)
    p[2, 0] = 1.0  # certain micronodule: stays one
    p[:, 1] = 1 / 6  # undecided: the prior decides, healthy
    np.testing.assert_array_equal(DecisionRule("prior", 1.0, WEIGHTS).argmax(p), [2, 0])


@pytest.mark.parametrize("bad", [dict(name="bayes"), dict(name="prior", tau=1.0, class_weights=None),
                                 dict(name="prior", tau=1.0, class_weights=(1.0,) * 5),
                                 dict(name="prior", tau=-1.0, class_weights=WEIGHTS),
                                 dict(name="prior", tau=1.0, class_weights=(0.0,) + WEIGHTS[1:])])
def test_invalid_rules_are_refused(bad):
    with pytest.raises(ValueError):
        DecisionRule(**bad)


def _model_with(tmp_path, decision):
    base = random_model(tmp_path)
    info = base.info
    info.decision = decision
    return load_model(save_model(tmp_path / "with-rule.safetensors", base.network, info))


RULE = {"default": "prior", "prior": {"name": "prior", "tau": 1.0, "class_weights": list(WEIGHTS)},
        "selection": {"note": "free-form"}}


def test_model_file_carries_its_rule_and_auto_runs_it(tmp_path):
    model = _model_with(tmp_path, RULE)
    assert read_info(model.path).decision == RULE
    assert resolve_decision("auto", model.info.decision) == DecisionRule("prior", 1.0, WEIGHTS)
    assert resolve_decision("paper", model.info.decision) == PAPER  # always available
    # A model without a rule runs the paper's argmax; asking it for a prior is an error.
    (tmp_path / "plain").mkdir()
    plain = random_model(tmp_path / "plain")
    assert plain.info.decision is None and resolve_decision("auto", None) == PAPER
    with pytest.raises(InputError, match="records no class-prior rule"):
        Inferer(plain, device="cpu", decision="prior")


@pytest.mark.parametrize("decision", [{"default": "prior"}, {"default": "bayes"}, [1, 2],
                                      {"default": "paper", "prior": {"name": "prior", "tau": 1.0}}])
def test_model_file_with_a_bad_rule_is_refused(tmp_path, decision):
    import safetensors.torch
    base = random_model(tmp_path)
    meta = json.loads(base.info.to_json())
    meta["decision"] = decision
    state = {k: v.contiguous() for k, v in base.network.state_dict().items()}
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(state, str(path), metadata={"ildseg": json.dumps(meta)})
    with pytest.raises(ModelFileError, match="decision"):
        read_info(path)


def test_engine_labels_follow_the_rule_and_probabilities_stay_the_network(tmp_path):
    model = _model_with(tmp_path, RULE)
    hu, mask = two_lungs()
    geometry = Geometry.from_sitk(sitk_volume(hu))
    paper = Inferer(model, device="cpu", decision="paper").segment(hu, mask, geometry, probabilities=True)
    prior = Inferer(model, device="cpu", decision="auto").segment(hu, mask, geometry, probabilities=True)
    assert paper.decision == PAPER and prior.decision.name == "prior"
    lung = mask > 0
    np.testing.assert_array_equal(paper.probabilities, prior.probabilities)
    p = paper.probabilities[lung].T  # (6, N)
    np.testing.assert_array_equal(paper.labels[lung], p.argmax(axis=0) + 1)
    np.testing.assert_array_equal(prior.labels[lung], DecisionRule("prior", 1.0, WEIGHTS).argmax(p) + 1)
    assert (prior.labels[~lung] == 0).all()
    assert np.count_nonzero(prior.labels[lung] == 1) > np.count_nonzero(paper.labels[lung] == 1)


def test_segment_command_runs_the_models_rule_and_says_so(tmp_path):
    """`ildseg segment`: auto runs the model file's rule, --decision paper the paper's;
    report.json and the printed summary say which; a model without a prior refuses
    --decision prior with one line (exit 2) and writes nothing."""
    import subprocess
    import sys

    import SimpleITK as sitk
    model = _model_with(tmp_path, RULE)
    hu, mask = two_lungs()
    for name, arr in (("ct.nrrd", hu), ("mask.nrrd", mask)):
        sitk.WriteImage(sitk_volume(arr), str(tmp_path / name))

    def run(*extra, model_path=model.path, out="labels.nrrd"):
        return subprocess.run([sys.executable, "-m", "ILDSegmentationLib", "segment", str(tmp_path / "ct.nrrd"),
                               "--lung-mask", str(tmp_path / "mask.nrrd"), "--model", str(model_path),
                               "--device", "cpu", "-o", str(tmp_path / out), "--report",
                               str(tmp_path / (out + ".json")), *extra], capture_output=True, text=True, timeout=600)

    labels = {}
    for choice, expected in (("auto", "prior"), ("paper", "paper")):
        r = run("--decision", choice, out=f"{choice}.nrrd")
        assert r.returncode == 0, r.stderr
        report = json.loads((tmp_path / f"{choice}.nrrd.json").read_text())
        assert report["decision_rule"]["name"] == expected and report["decision_rule"]["choice"] == choice
        assert f"decision rule: {expected}" in r.stdout
        labels[choice] = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{choice}.nrrd")))
    assert report["decision_rule"]["description"].startswith("paper")
    assert np.count_nonzero(labels["auto"] == 1) > np.count_nonzero(labels["paper"] == 1)

    (tmp_path / "plain").mkdir()
    plain = random_model(tmp_path / "plain")
    r = run("--decision", "prior", model_path=plain.path, out="refused.nrrd")
    assert r.returncode == 2 and "records no class-prior rule" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "refused.nrrd").exists() and not (tmp_path / "refused.nrrd.json").exists()

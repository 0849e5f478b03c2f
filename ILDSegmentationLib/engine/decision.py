"""The decision rule: how the engine turns a pixel's six class probabilities into a label.

* ``paper``: the argmax of the network's softmax, as in Anthimopoulos et al. 2018.
  The paper trained with class weights inverse to the class pixel counts
  (:mod:`ILDSegmentationLib.training.loss`), so this argmax acts as if all six
  classes were equally likely: right for scoring annotated regions with balanced
  accuracy (the paper's metric), wrong for a whole lung, where most pixels are healthy
  and most dots on a slice are vessels (issue 24: vessels called micronodules).
* ``prior``: logit adjustment (Menon et al., "Long-tail learning via logit
  adjustment", ICLR 2021): the label is ``argmax_c [log p_c - tau * log w_c]``, with
  ``w`` the class weights the model was trained with. ``tau = 1`` undoes the weighting
  (the classes' frequencies among the training annotations become the prior again);
  ``tau = 0`` is the paper's argmax. The model file carries ``tau`` and ``w``
  (``ModelInfo.decision``), chosen on validation data by ``bench/decision_rule.py``.
* ``auto``: the rule the model file recommends (its ``decision.default``); the
  paper's for a model that records none.

Only the labels change: probabilities written by ``--probabilities`` stay the
network's softmax. Arrays: probabilities are (C, ...) with C = 6, class label - 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..classes import NUM_CLASSES

#: Named rules a user may ask for (``--decision``, ``Inferer(decision=...)``).
DECISION_CHOICES = ("auto", "paper", "prior")


@dataclass(frozen=True)
class DecisionRule:
    """name: "paper" or "prior"; tau: strength of the adjustment (0 = paper);
    class_weights: the training class weights, one per class in label order."""

    name: str = "paper"
    tau: float = 0.0
    class_weights: Optional[Tuple[float, ...]] = None
    log_bias: Tuple[float, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        if self.name not in ("paper", "prior"):
            raise ValueError(f"decision rule must be 'paper' or 'prior', not {self.name!r}")
        if self.name == "paper":
            object.__setattr__(self, "log_bias", (0.0,) * NUM_CLASSES)
            return
        w = self.class_weights
        if w is None or len(w) != NUM_CLASSES or not all(isinstance(v, (int, float)) and v > 0 and math.isfinite(v)
                                                          for v in w):
            raise ValueError(f"the prior rule needs {NUM_CLASSES} positive class weights, not {w!r}")
        if not (isinstance(self.tau, (int, float)) and math.isfinite(self.tau) and 0 <= self.tau <= 10):
            raise ValueError(f"tau must be a number from 0 to 10, not {self.tau!r}")
        object.__setattr__(self, "log_bias", tuple(-float(self.tau) * math.log(v) for v in w))

    def describe(self) -> str:
        """One line for reports and the Slicer panel."""
        if self.name == "paper":
            return "paper (argmax of the network's probabilities)"
        return f"prior (logit adjustment, tau = {self.tau:g} x log of the training class weights)"

    def argmax(self, probabilities: np.ndarray) -> np.ndarray:
        """Class index (label - 1) per pixel of (C, ...) probabilities, as int64."""
        if self.name == "paper":
            return probabilities.argmax(axis=0)
        # argmax(log p + b) = argmax(p * exp(b)): no log of a zero probability.
        scale = np.exp(np.asarray(self.log_bias, np.float64) - max(self.log_bias)).astype(np.float32)
        return (probabilities * scale.reshape((-1,) + (1,) * (probabilities.ndim - 1))).argmax(axis=0)

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"name": self.name}
        if self.name == "prior":
            d.update(tau=float(self.tau), class_weights=[float(v) for v in self.class_weights])
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DecisionRule":
        if not isinstance(d, dict):
            raise ValueError("a decision rule is an object {name, tau, class_weights}")
        w = d.get("class_weights")
        return cls(str(d.get("name")), float(d.get("tau", 0.0)), None if w is None else tuple(float(v) for v in w))


PAPER = DecisionRule("paper")


def check_model_decision(d: Any) -> Dict[str, Any]:
    """Validate a model file's ``decision`` metadata: ``{"default": "paper"|"prior",
    "prior": {rule}, ...free-form selection figures}``. Raises ValueError."""
    if not isinstance(d, dict):
        raise ValueError("'decision' must be an object")
    if d.get("default") not in ("paper", "prior"):
        raise ValueError("'decision.default' must be 'paper' or 'prior'")
    if "prior" in d:
        rule = DecisionRule.from_dict(d["prior"])
        if rule.name != "prior":
            raise ValueError("'decision.prior' must be a prior rule")
    elif d["default"] == "prior":
        raise ValueError("'decision.default' is 'prior' but the file holds no prior rule")
    return d


def resolve_decision(choice: Any, model_decision: Optional[Dict[str, Any]]) -> DecisionRule:
    """The rule to run: ``choice`` is a :class:`DecisionRule` (used as given) or one of
    :data:`DECISION_CHOICES`; ``model_decision`` is the model file's ``decision``
    metadata (None when it records none). Raises ValueError naming the problem."""
    if isinstance(choice, DecisionRule):
        return choice
    if choice not in DECISION_CHOICES:
        raise ValueError(f"decision must be one of {', '.join(DECISION_CHOICES)}, not {choice!r}")
    if choice == "paper":
        return PAPER
    if choice == "auto":
        if not model_decision or model_decision.get("default") != "prior":
            return PAPER
    if not model_decision or "prior" not in model_decision:
        raise ValueError("this model file records no class-prior rule (its training class weights and tau); "
                         "use the paper's decision rule")
    return DecisionRule.from_dict(model_decision["prior"])

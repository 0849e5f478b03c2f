"""Balanced accuracy (paper Eq. 2), confusion matrix and Dice, on annotated pixels only."""
from __future__ import annotations

from typing import Any, Dict

import numpy as np

from ..classes import CLASSES, NUM_CLASSES


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """(C, C) counts, rows = truth class, columns = predicted class, labels 1..C.

    Only pixels that are annotated (truth > 0) and predicted (inside the lung mask,
    predicted > 0) count: the paper evaluates annotated lung pixels."""
    t = np.asarray(truth).ravel()
    p = np.asarray(predicted).ravel()
    keep = (t > 0) & (p > 0)
    t, p = t[keep].astype(np.int64) - 1, p[keep].astype(np.int64) - 1
    return np.bincount(t * NUM_CLASSES + p, minlength=NUM_CLASSES * NUM_CLASSES).reshape(NUM_CLASSES, NUM_CLASSES)


def summarize(cm: np.ndarray) -> Dict[str, Any]:
    """BACC = mean over the classes present of correct / total; Dice per class."""
    cm = np.asarray(cm, dtype=np.float64)
    totals = cm.sum(axis=1)
    present = totals > 0
    per_class = np.divide(np.diag(cm), totals, out=np.full(NUM_CLASSES, np.nan), where=present)
    predicted = cm.sum(axis=0)
    dice = np.divide(2 * np.diag(cm), totals + predicted, out=np.full(NUM_CLASSES, np.nan),
                     where=(totals + predicted) > 0)
    return {
        "balanced_accuracy": float(np.nanmean(per_class)) if present.any() else float("nan"),
        "accuracy": float(np.trace(cm) / cm.sum()) if cm.sum() else float("nan"),
        "per_class_accuracy": {c.name: (None if np.isnan(v) else float(v)) for c, v in zip(CLASSES, per_class)},
        "dice": {c.name: (None if np.isnan(v) else float(v)) for c, v in zip(CLASSES, dice)},
        "confusion_matrix": cm.astype(np.int64).tolist(),
        "classes": [c.name for c in CLASSES],
        "annotated_pixels": int(cm.sum()),
    }

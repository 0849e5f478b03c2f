"""PNG plots of a run: learning curves and the confusion matrix (matplotlib, optional)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np

from ..imaging.atomicfile import atomic_path

log = logging.getLogger(__name__)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return None


def plot_learning_curves(history: Sequence[Any], path: Path) -> None:
    plt = _pyplot()
    if plt is None or not history:
        return
    epochs = [r.epoch + 1 for r in history]
    fig, ax1 = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax1.plot(epochs, [r.train_loss for r in history], color="tab:blue", label="training loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(epochs, [r.val_bacc for r in history], color="tab:red", label="validation BACC")
    ax2.set_ylabel("validation balanced accuracy", color="tab:red")
    ax2.set_ylim(0, 1)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_confusion(metrics: Dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    if plt is None:
        return
    cm = np.asarray(metrics["confusion_matrix"], dtype=float)
    rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    names = metrics["classes"]
    fig, ax = plt.subplots(figsize=(5.5, 4.8), dpi=100)
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("annotated")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{rows[i, j]:.2f}", ha="center", va="center",
                    color="white" if rows[i, j] > 0.5 else "black", fontsize=8)
    ax.set_title(f"BACC {metrics['balanced_accuracy']:.3f}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)

"""The paper's loss (Eq. 1), per pixel:

- annotated pixel of class i: ``-w_i log p_i`` with class weights ``w_i`` inversely
  proportional to the class's pixel count in the training set (normalized so the
  weights average 1 over the classes present: every class contributes equally);
- unannotated pixel inside the lung: ``-a w_u sum_j p_j log p_j`` (entropy
  minimization, Grandvalet & Bengio), ``w_u = 0.1`` in the paper;
- pixel outside the lung: nothing.

The crop's loss is the sum over participating pixels divided by their number.

``a`` is left open by the paper ("scaled relatively with the proportion of the
unlabeled regions versus the annotated ones"). Options (``entropy_scaling``):

- ``ratio`` (default): ``a = N_labeled / N_unlabeled`` over the training set, so the
  entropy term's total weight relative to the supervised term is ``w_u`` whatever
  the share of unannotated lung (the reading in which ``w_u`` keeps one meaning
  across data sets);
- ``none``: ``a = 1``, every unannotated pixel weighs ``w_u`` (the authors' demo mixes
  the two terms with fixed weights).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

ENTROPY_SCALINGS = ("ratio", "none")


def class_weights(counts: np.ndarray) -> torch.Tensor:
    """w_i proportional to 1 / n_i, averaging 1 over the classes present (0 if absent)."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = 1.0 / counts[present]
    if present.any():
        w *= present.sum() / w.sum()
    return torch.tensor(w, dtype=torch.float32)


def entropy_scale(n_labeled: int, n_unlabeled: int, scaling: str = "ratio") -> float:
    if scaling not in ENTROPY_SCALINGS:
        raise ValueError(f"entropy scaling must be one of {ENTROPY_SCALINGS}")
    if scaling == "none" or n_unlabeled == 0:
        return 1.0
    return float(n_labeled) / float(n_unlabeled)


def ild_loss(logits: torch.Tensor, target: torch.Tensor, lung: torch.Tensor, weights: torch.Tensor,
             unsupervised_weight: float = 0.1, alpha: float = 1.0,
             valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean loss over a batch of crops.

    logits (N, C, H, W); target (N, H, W) int64 class index or -1 when unannotated;
    lung (N, H, W) bool; valid (N, H, W) bool for padded batches (pixels outside a
    crop take no part)."""
    # One expression for the whole batch, with no host synchronisation (no .any(),
    # no boolean indexing): on a GPU the step runs without waiting for the host.
    logp = F.log_softmax(logits.float(), dim=1)
    inside = lung if valid is None else lung & valid
    labeled = (target >= 0) & inside
    unlabeled = inside & ~labeled
    safe_target = target.clamp_min(0)
    nll = -logp.gather(1, safe_target.unsqueeze(1)).squeeze(1) * weights.to(logp.device)[safe_target]
    zero = logp.new_zeros(())
    total = torch.where(labeled, nll, zero).sum(dim=(1, 2))
    if unsupervised_weight > 0:
        # where(), not a product with the mask: p log p is NaN where p underflows to 0.
        entropy = -(logp.exp() * logp).sum(dim=1)
        total = total + alpha * unsupervised_weight * torch.where(unlabeled, entropy, zero).sum(dim=(1, 2))
    count = (labeled | unlabeled).sum(dim=(1, 2)).clamp_min(1)
    return (total / count).mean()

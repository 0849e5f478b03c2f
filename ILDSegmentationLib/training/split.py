"""Per-scan folds balanced by hill climbing (paper, IV-B).

Start from an arbitrary split (a seeded round robin); try swapping two scans
between two folds and keep a swap when the mean entropy of the folds' class
distributions rises; stop when no swap improves it. Scans are never split, and
swaps keep the fold sizes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Sequence

import numpy as np

if TYPE_CHECKING:
    from .manifest import Case


def distribution_entropy(counts: np.ndarray) -> float:
    """Shannon entropy (nats) of a class-count vector."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def mean_fold_entropy(case_counts: Dict[str, np.ndarray], folds: Sequence[Sequence[str]]) -> float:
    return float(np.mean([distribution_entropy(sum((case_counts[c] for c in f), np.zeros_like(
        next(iter(case_counts.values()))))) for f in folds]))


def hill_climb_split(case_counts: Dict[str, np.ndarray], n_folds: int = 5, seed: int = 0) -> List[List[str]]:
    """Folds (lists of case ids) maximizing the mean class-distribution entropy."""
    ids = sorted(case_counts)
    if n_folds < 2 or len(ids) < n_folds:
        raise ValueError(f"{len(ids)} cases cannot make {n_folds} folds (need at least one case per fold)")
    order = list(np.random.default_rng(seed).permutation(ids))
    folds = [order[k::n_folds] for k in range(n_folds)]
    fold_counts = [sum((case_counts[c] for c in f), np.zeros(len(case_counts[ids[0]]), np.int64)) for f in folds]
    entropies = [distribution_entropy(c) for c in fold_counts]
    improved = True
    while improved:
        improved = False
        for a in range(n_folds):
            for b in range(a + 1, n_folds):
                for i, ca in enumerate(folds[a]):
                    for j, cb in enumerate(folds[b]):
                        delta = case_counts[cb] - case_counts[ca]
                        ea = distribution_entropy(fold_counts[a] + delta)
                        eb = distribution_entropy(fold_counts[b] - delta)
                        if ea + eb > entropies[a] + entropies[b] + 1e-12:
                            folds[a][i], folds[b][j] = cb, ca
                            fold_counts[a] = fold_counts[a] + delta
                            fold_counts[b] = fold_counts[b] - delta
                            entropies[a], entropies[b] = ea, eb
                            ca = cb
                            improved = True
    return [sorted(str(c) for c in f) for f in folds]


def split_scans(cases: Sequence[Case], case_counts: Dict[str, np.ndarray], n_folds: int = 5,
                seed: int = 0) -> List[List[str]]:
    """Folds of case ids, built per scan: the cases of one scan (``Case.scan_key``)
    always land in one fold, and the hill climbing balances the scans' summed class
    counts. ``ildseg split`` and ``ildseg train`` both call this, on the same counts."""
    if n_folds < 2:
        raise ValueError(f"a split needs 2 folds or more, not {n_folds}")
    scans: Dict[str, List[str]] = {}
    for c in cases:
        # hill_climb_split sorts its keys: a string per scan key, unique and ordered.
        scans.setdefault(repr(c.scan_key), []).append(c.case_id)
    if len(scans) < n_folds:
        raise ValueError(f"{len(scans)} scans cannot make {n_folds} folds (need at least one scan per fold)")
    scan_counts = {s: sum(case_counts[c] for c in ids) for s, ids in scans.items()}
    scan_folds = hill_climb_split(scan_counts, n_folds, seed)
    return [sorted(c for s in f for c in scans[s]) for f in scan_folds]

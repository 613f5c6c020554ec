"""Classification metrics, vectorised over classes; checked against scikit-learn in the tests."""

from __future__ import annotations

import numpy as np


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array, ties sharing their average rank (like scipy's rankdata)."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start of each run of equal values, and the average rank of the run.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Exact ROC AUC per column (Mann-Whitney U with ties counted half); NaN where a column
    has no positives or no negatives. ``scores``, ``labels``: (N,) or (N, C)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    one = scores.ndim == 1
    if one:
        scores, labels = scores[:, None], labels[:, None]
    out = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        pos = labels[:, c]
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = _average_ranks(scores[:, c])
        out[c] = (ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return out[0] if one else out

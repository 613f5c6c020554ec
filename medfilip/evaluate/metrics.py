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


def _as_columns(scores, labels) -> tuple[np.ndarray, np.ndarray, bool]:
    """(N, C) float scores and bool labels, and whether the input was one 1-D class."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if scores.shape != labels.shape or scores.ndim not in (1, 2):
        raise ValueError(
            f"scores {scores.shape} and labels {labels.shape} must have the same shape, (N,) or (N, C)"
        )
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; a NaN score has no place in a ranking, drop or fix those rows first")
    one = scores.ndim == 1
    if one:
        scores, labels = scores[:, None], labels[:, None]
    return scores, labels, one


def f1_max(scores, labels):
    """Best F1 per class over every distinct score as threshold (positive when score >= t), with that
    threshold and the accuracy there; equal F1s go to the highest threshold; NaN where a class has no positives."""
    scores, labels, one = _as_columns(scores, labels)
    n, n_classes = scores.shape
    if n == 0:  # no images (an empty val split): nothing to choose a threshold from
        nan = np.full(n_classes, np.nan)
        return (nan[0], nan[0], nan[0]) if one else (nan, nan.copy(), nan.copy())
    # Descending per column; cutting after position i predicts the top i + 1 positive. Only cuts at
    # the end of a run of equal scores are real thresholds: tied scores flip together.
    order = np.argsort(-scores, axis=0, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=0)
    tp = np.cumsum(np.take_along_axis(labels, order, axis=0), axis=0)
    n_predicted = np.arange(1, n + 1)[:, None]
    n_pos = labels.sum(axis=0)
    run_end = np.ones((n, n_classes), dtype=bool)
    run_end[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2.0 * tp / (n_predicted + n_pos)  # 2TP / (2TP + FP + FN)
    best = np.argmax(np.where(run_end, f1, -1.0), axis=0)  # first maximum = highest threshold
    cols = np.arange(n_classes)
    tp_best = tp[best, cols]
    acc = (tp_best + (n - n_pos) - (best + 1 - tp_best)) / n  # (TP + TN) / N, TN = negatives - FP
    out_f1 = np.where(n_pos > 0, f1[best, cols], np.nan)
    out_t = np.where(n_pos > 0, sorted_scores[best, cols], np.nan)
    out_acc = np.where(n_pos > 0, acc, np.nan)
    if one:
        return float(out_f1[0]), float(out_t[0]), float(out_acc[0])
    return out_f1, out_t, out_acc


def binary_at_threshold(scores, labels, thresholds) -> dict:
    """F1, accuracy, precision and recall per class when predicting positive at score >= threshold (chosen
    elsewhere, e.g. on val); precision 0 with no predicted positives; F1 and recall NaN with no positives."""
    scores, labels, one = _as_columns(scores, labels)
    thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (scores.shape[1],))
    predicted = scores >= thresholds
    tp = (predicted & labels).sum(axis=0)
    n_predicted = predicted.sum(axis=0)
    n_pos = labels.sum(axis=0)
    n = scores.shape[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "f1": np.where(n_pos > 0, 2.0 * tp / (n_predicted + n_pos), np.nan),
            "acc": (n - n_predicted - n_pos + 2 * tp) / n,  # (TP + TN) / N
            "precision": np.where(n_predicted > 0, tp / n_predicted, 0.0),
            "recall": np.where(n_pos > 0, tp / n_pos, np.nan),
        }
    # A NaN threshold (val had no positives) chose nothing: every number it would give is NaN.
    for key in out:
        out[key] = np.where(np.isnan(thresholds), np.nan, out[key])
    if one:
        return {key: float(value[0]) for key, value in out.items()}
    return out


def _bootstrap_replicates(metric_fn, scores, labels, n_boot: int, seed: int) -> tuple[np.ndarray, bool]:
    """(n_boot, C) metric values on images resampled with replacement, the same rows for every class."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim not in (1, 2):
        raise ValueError(
            f"scores {scores.shape} and labels {labels.shape} must have the same shape, (N,) or (N, C)"
        )
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    one = scores.ndim == 1
    if one:
        scores, labels = scores[:, None], labels[:, None]
    n = scores.shape[0]
    rng = np.random.default_rng(seed)
    # One replicate at a time: memory stays at one resampled (N, C) copy however large n_boot is.
    replicates = np.empty((n_boot, scores.shape[1]))
    for b in range(n_boot):
        rows = rng.integers(0, n, size=n)
        replicates[b] = np.asarray(metric_fn(scores[rows], labels[rows]), dtype=np.float64)
    return replicates, one


def _percentile_interval(replicates: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval per column over the non-NaN replicates; NaN where every replicate is NaN."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    lo = np.full(replicates.shape[1], np.nan)
    hi = np.full(replicates.shape[1], np.nan)
    some = ~np.isnan(replicates).all(axis=0)
    if some.any():
        lo[some], hi[some] = np.nanpercentile(replicates[:, some], [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return lo, hi


def bootstrap_ci(metric_fn, scores, labels, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0):
    """Percentile bootstrap (1 - alpha) interval per class of ``metric_fn(scores, labels) -> (C,)``, resampling
    images; replicates where a class's metric is NaN are left out for that class. 1-D input gives scalars."""
    replicates, one = _bootstrap_replicates(metric_fn, scores, labels, n_boot, seed)
    lo, hi = _percentile_interval(replicates, alpha)
    return (float(lo[0]), float(hi[0])) if one else (lo, hi)


def bootstrap_mean_ci(metric_fn, scores, labels, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0):
    """Percentile bootstrap (1 - alpha) interval of the mean over classes (NaN classes left out of each
    replicate's mean), resampling images as in ``bootstrap_ci``."""
    replicates, _ = _bootstrap_replicates(metric_fn, scores, labels, n_boot, seed)
    valid = ~np.isnan(replicates)
    counts = valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(valid, replicates, 0.0).sum(axis=1) / counts  # nanmean without the all-NaN warning
    lo, hi = _percentile_interval(means[:, None], alpha)
    return float(lo[0]), float(hi[0])


def retrieval_precision_at_k(sim, relevant, ks=(1, 3, 10)) -> dict:
    """Precision@k = relevant items among each query's top k by similarity / (queries x k), ties going to the
    lower gallery index; a k above the gallery size G is clipped to G (the key keeps the asked k)."""
    sim = np.asarray(sim, dtype=np.float64)
    relevant = np.asarray(relevant).astype(bool)
    if sim.ndim != 2 or sim.shape != relevant.shape:
        raise ValueError(f"sim {sim.shape} and relevant {relevant.shape} must both be (queries, gallery)")
    n_queries, n_gallery = sim.shape
    if n_queries == 0 or n_gallery == 0:
        raise ValueError(f"retrieval needs at least one query and one gallery item, got sim {sim.shape}")
    if np.isnan(sim).any():
        raise ValueError("sim contains NaN; a NaN similarity has no place in a ranking")
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"every k must be at least 1, got {tuple(ks)}")
    order = np.argsort(-sim, axis=1, kind="stable")
    hits = np.cumsum(np.take_along_axis(relevant, order, axis=1), axis=1)  # hits[:, j] = hits in the top j + 1
    out = {}
    for k in ks:
        top = min(int(k), n_gallery)
        out[f"p@{k}"] = float(hits[:, top - 1].sum() / (n_queries * top))
    return out


def label_sets_match(query_labels, gallery_labels, mode: str = "overlap") -> np.ndarray:
    """(Q, G) bool: "overlap" when the two label sets share a positive class, "exact" when they are
    identical (two empty sets count as identical; an empty set overlaps nothing)."""
    query = np.asarray(query_labels).astype(bool)
    gallery = np.asarray(gallery_labels).astype(bool)
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query {query.shape} and gallery {gallery.shape} must be (Q, C) and (G, C) with one C")
    shared = query.astype(np.float64) @ gallery.T.astype(np.float64)  # exact: counts are small integers
    if mode == "overlap":
        return shared > 0
    if mode == "exact":
        return (shared == query.sum(axis=1)[:, None]) & (shared == gallery.sum(axis=1)[None, :])
    raise ValueError(f'mode must be "overlap" or "exact", got {mode!r}')

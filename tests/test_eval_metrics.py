"""F1 at the best threshold, metrics at a given threshold, bootstrap intervals and retrieval precision,
each against scikit-learn or a slow obvious twin."""

from __future__ import annotations

import math

import numpy as np
import pytest
import metric_cases
from sklearn.metrics import accuracy_score, f1_score, precision_recall_curve, precision_score, recall_score

from medfilip.evaluate.metrics import (
    binary_at_threshold,
    bootstrap_ci,
    bootstrap_mean_ci,
    f1_max,
    label_sets_match,
    retrieval_precision_at_k,
    roc_auc,
)


def random_case(seed, n=80, n_classes=6, decimals=None):
    return metric_cases.random_case(seed, n, n_classes, decimals)


# --- f1_max -----------------------------------------------------------------------------------------


def slow_f1_max(scores, labels):
    """Try every distinct score as threshold; keep the best F1, the highest threshold among equals."""
    labels = labels.astype(bool)
    if not labels.any():
        return math.nan, math.nan, math.nan
    best = (-1.0, math.nan, math.nan)
    for t in sorted(set(scores.tolist()), reverse=True):
        pred = scores >= t
        tp = int((pred & labels).sum())
        fp = int((pred & ~labels).sum())
        fn = int((~pred & labels).sum())
        f1 = 2 * tp / (2 * tp + fp + fn)
        if f1 > best[0]:
            best = (f1, t, float((pred == labels).mean()))
    return best


def sklearn_max_f1(scores, labels):
    precision, recall, _ = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]  # the last point (precision 1, recall 0) has no threshold
    with np.errstate(invalid="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return f1.max()


def check_f1_max_column(scores, labels, f1, threshold, acc):
    if not labels.any():
        assert math.isnan(f1) and math.isnan(threshold) and math.isnan(acc)
        return
    slow = slow_f1_max(scores, labels)
    assert f1 == pytest.approx(slow[0], abs=1e-12)
    assert threshold == slow[1]  # exact: the threshold is one of the scores themselves
    assert acc == pytest.approx(slow[2], abs=1e-12)
    assert f1 == pytest.approx(sklearn_max_f1(scores, labels), abs=1e-12)
    pred = scores >= threshold
    assert f1 == pytest.approx(f1_score(labels, pred), abs=1e-12)
    assert acc == pytest.approx(accuracy_score(labels, pred), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("decimals", [None, 1, 0])  # 0: integer scores, heavy ties
def test_f1_max_matches_sklearn_and_the_slow_twin(seed, decimals):
    scores, labels = random_case(seed, decimals=decimals)
    labels[:, 0] = False  # no positives
    labels[:, 1] = True  # all positive
    f1, threshold, acc = f1_max(scores, labels)
    assert f1.shape == threshold.shape == acc.shape == (scores.shape[1],)
    for c in range(scores.shape[1]):
        check_f1_max_column(scores[:, c], labels[:, c], f1[c], threshold[c], acc[c])
    assert f1[1] == 1.0 and acc[1] == 1.0 and threshold[1] == scores[:, 1].min()


def test_f1_max_tied_scores_flip_together():
    # The top three scores tie; a per-row threshold would take only the positive one and reach F1 1.
    scores = np.array([0.9, 0.9, 0.9, 0.1])
    labels = np.array([1, 0, 0, 0])
    f1, threshold, acc = f1_max(scores, labels)
    assert threshold == 0.9
    assert f1 == pytest.approx(0.5)  # TP 1, FP 2: 2 / (2 + 2)
    assert acc == pytest.approx(0.5)


def test_f1_max_single_class_gives_scalars():
    scores, labels = random_case(11, n=50, n_classes=1, decimals=1)
    got = f1_max(scores[:, 0], labels[:, 0].astype(int))
    assert all(np.ndim(x) == 0 for x in got)
    check_f1_max_column(scores[:, 0], labels[:, 0], *got)
    assert all(math.isnan(x) for x in f1_max(np.array([0.2, 0.4]), np.array([0, 0])))


# --- binary_at_threshold ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_binary_at_threshold_matches_sklearn(seed):
    scores, labels = random_case(seed, decimals=1)
    labels[:, 0] = False
    thresholds = np.quantile(scores, [0.0, 0.3, 0.5, 0.7, 0.9, 1.0], axis=0).diagonal().copy()
    thresholds[-1] = scores[:, -1].max() + 1  # nothing predicted positive
    got = binary_at_threshold(scores, labels, thresholds)
    for c in range(scores.shape[1]):
        y, pred = labels[:, c], scores[:, c] >= thresholds[c]
        assert got["acc"][c] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
        assert got["precision"][c] == pytest.approx(precision_score(y, pred, zero_division=0), abs=1e-12)
        if y.any():
            assert got["f1"][c] == pytest.approx(f1_score(y, pred), abs=1e-12)
            assert got["recall"][c] == pytest.approx(recall_score(y, pred), abs=1e-12)
        else:
            assert math.isnan(got["f1"][c]) and math.isnan(got["recall"][c])
    assert got["precision"][-1] == 0.0


def test_binary_at_threshold_scalar_and_nan_threshold():
    scores = np.array([0.1, 0.5, 0.7, 0.9])
    labels = np.array([0, 1, 0, 1])
    got = binary_at_threshold(scores, labels, 0.6)
    # Predicted positive: 0.7 (negative), 0.9 (positive): TP 1, FP 1, FN 1, TN 1.
    assert got == pytest.approx({"f1": 0.5, "acc": 0.5, "precision": 0.5, "recall": 0.5})
    assert all(math.isnan(v) for v in binary_at_threshold(scores, labels, math.nan).values())


def test_val_threshold_applied_to_test_agrees_with_f1_max_on_the_same_split():
    scores, labels = random_case(5, decimals=1)
    f1, threshold, acc = f1_max(scores, labels)
    got = binary_at_threshold(scores, labels, threshold)
    np.testing.assert_allclose(got["f1"], f1, atol=1e-12)
    np.testing.assert_allclose(got["acc"], acc, atol=1e-12)


# --- bootstrap --------------------------------------------------------------------------------------

TRUE_AUC = 0.7602499389065233  # Phi(1 / sqrt(2)): P(X > Y), X ~ N(1, 1), Y ~ N(0, 1)


def test_true_auc_constant():
    assert TRUE_AUC == pytest.approx(0.5 * (1 + math.erf(0.5)), abs=1e-15)


def test_bootstrap_auc_interval_covers_the_true_auc_about_95_percent_of_the_time():
    rng = np.random.default_rng(2024)
    n_pos = n_neg = 40
    labels = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
    covered = 0
    n_datasets = 200
    for d in range(n_datasets):
        scores = np.r_[rng.normal(1, 1, n_pos), rng.normal(0, 1, n_neg)]
        lo, hi = bootstrap_ci(roc_auc, scores, labels, n_boot=200, seed=d)
        covered += lo <= TRUE_AUC <= hi
    assert 0.88 <= covered / n_datasets <= 0.99


def test_bootstrap_ci_contains_the_estimate_and_is_deterministic():
    scores, labels = random_case(3, n=120, n_classes=4, decimals=1)
    labels[:, 2] = False  # every replicate NaN: the interval is NaN
    lo, hi = bootstrap_ci(roc_auc, scores, labels, n_boot=300, seed=7)
    point = roc_auc(scores, labels)
    ok = ~np.isnan(point)
    assert np.all(lo[ok] <= point[ok]) and np.all(point[ok] <= hi[ok])
    assert np.isnan(lo[2]) and np.isnan(hi[2])
    again = bootstrap_ci(roc_auc, scores, labels, n_boot=300, seed=7)
    np.testing.assert_array_equal(lo, again[0])
    np.testing.assert_array_equal(hi, again[1])
    other = bootstrap_ci(roc_auc, scores, labels, n_boot=300, seed=8)
    assert not np.array_equal(lo[ok], other[0][ok])


def test_bootstrap_ignores_nan_replicates_per_class():
    # A class with 2 positives in 60: some replicates draw none and give NaN; the rest still make an interval.
    rng = np.random.default_rng(0)
    labels = np.zeros((60, 2), bool)
    labels[:2, 0] = True
    labels[:30, 1] = True
    scores = rng.normal(size=(60, 2)) + labels
    lo, hi = bootstrap_ci(roc_auc, scores, labels, n_boot=400, seed=1)
    assert np.all(np.isfinite(lo)) and np.all(lo <= hi)


def test_bootstrap_same_rows_for_every_class_and_1d_input():
    # Two identical columns must give identical intervals: each replicate resamples whole images.
    scores, labels = random_case(4, n=70, n_classes=1)
    twice_s, twice_l = np.repeat(scores, 2, axis=1), np.repeat(labels, 2, axis=1)
    lo, hi = bootstrap_ci(roc_auc, twice_s, twice_l, n_boot=100, seed=3)
    assert lo[0] == lo[1] and hi[0] == hi[1]
    one = bootstrap_ci(roc_auc, scores[:, 0], labels[:, 0], n_boot=100, seed=3)
    assert np.ndim(one[0]) == 0 and one == (lo[0], hi[0])


def test_bootstrap_mean_ci_against_a_slow_twin():
    scores, labels = random_case(6, n=90, n_classes=5, decimals=1)
    labels[:, 4] = False  # NaN in every replicate: left out of each mean
    lo, hi = bootstrap_mean_ci(roc_auc, scores, labels, n_boot=150, seed=2)
    rng = np.random.default_rng(2)
    means = []
    for _ in range(150):
        rows = rng.integers(0, len(scores), size=len(scores))
        means.append(np.nanmean(roc_auc(scores[rows], labels[rows])))
    assert lo == pytest.approx(np.percentile(means, 2.5), abs=1e-12)
    assert hi == pytest.approx(np.percentile(means, 97.5), abs=1e-12)
    point = np.nanmean(roc_auc(scores, labels))
    assert lo <= point <= hi


def test_bootstrap_rejects_bad_arguments():
    scores, labels = random_case(0, n=20, n_classes=2)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci(roc_auc, scores, labels, n_boot=10, alpha=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(roc_auc, scores, labels, n_boot=0)
    with pytest.raises(ValueError, match="same shape"):
        bootstrap_ci(roc_auc, scores, labels[:, :1])


# --- retrieval --------------------------------------------------------------------------------------


def slow_precision_at_k(sim, relevant, k):
    hits = 0
    top = min(k, sim.shape[1])
    for q in range(sim.shape[0]):
        ranked = sorted(range(sim.shape[1]), key=lambda g: (-sim[q, g], g))  # ties: lower index first
        hits += sum(bool(relevant[q, g]) for g in ranked[:top])
    return hits / (sim.shape[0] * top)


def test_retrieval_hand_made_case():
    sim = np.array(
        [
            [0.9, 0.1, 0.8, 0.3, 0.5],
            [0.2, 0.7, 0.7, 0.1, 0.0],  # gallery 1 and 2 tie: 1 ranks first
            [0.0, 0.0, 0.0, 0.0, 0.0],  # all tie: ranked 0, 1, 2, 3, 4
        ]
    )
    relevant = np.array(
        [
            [1, 0, 0, 1, 1],  # ranking 0, 2, 4, 3, 1: top1 hits 1, top3 hits 2 (0, 4)
            [0, 0, 1, 0, 0],  # ranking 1, 2, 0, 3, 4: top1 hits 0, top3 hits 1 (2)
            [0, 0, 0, 0, 1],  # ranking 0, 1, 2, 3, 4: top1 hits 0, top3 hits 0
        ],
        bool,
    )
    got = retrieval_precision_at_k(sim, relevant, ks=(1, 3, 10))
    # p@1 = 1 / (3 x 1); p@3 = 3 / (3 x 3); p@10 clipped to k = 5: every relevant item counts, 3 + 1 + 1 = 5 / (3 x 5).
    assert got == pytest.approx({"p@1": 1 / 3, "p@3": 3 / 9, "p@10": 5 / 15})
    assert list(got) == ["p@1", "p@3", "p@10"]


@pytest.mark.parametrize("seed", range(3))
def test_retrieval_matches_the_slow_twin(seed):
    rng = np.random.default_rng(seed)
    sim = np.round(rng.normal(size=(25, 40)), 1)  # rounded: many ties
    relevant = rng.random((25, 40)) < 0.2
    got = retrieval_precision_at_k(sim, relevant, ks=(1, 3, 10, 40, 100))
    for k in (1, 3, 10, 40, 100):
        assert got[f"p@{k}"] == pytest.approx(slow_precision_at_k(sim, relevant, k), abs=1e-12)
    assert got["p@100"] == got["p@40"] == pytest.approx(relevant.mean())


def test_retrieval_k_above_gallery_is_clipped():
    sim = np.array([[0.3, 0.9], [0.5, 0.1]])
    relevant = np.array([[True, False], [False, False]])
    # G = 2, so k = 10 becomes 2: one relevant item in 2 queries x 2.
    assert retrieval_precision_at_k(sim, relevant, ks=(10,)) == {"p@10": 0.25}
    with pytest.raises(ValueError, match="k must be at least 1"):
        retrieval_precision_at_k(sim, relevant, ks=(0,))


def test_label_sets_match():
    query = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]], bool)
    gallery = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 0], [1, 1, 1]], bool)
    np.testing.assert_array_equal(
        label_sets_match(query, gallery, "overlap"),
        [[1, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 1]],
    )
    np.testing.assert_array_equal(
        label_sets_match(query, gallery, "exact"),
        [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]],  # two empty sets are identical
    )
    rng = np.random.default_rng(0)
    q, g = rng.random((15, 6)) < 0.3, rng.random((20, 6)) < 0.3
    np.testing.assert_array_equal(label_sets_match(q, g, "overlap"), (q[:, None, :] & g[None, :, :]).any(axis=2))
    np.testing.assert_array_equal(label_sets_match(q, g, "exact"), (q[:, None, :] == g[None, :, :]).all(axis=2))
    with pytest.raises(ValueError, match="mode"):
        label_sets_match(q, g, "subset")


def test_f1_max_of_no_images_is_nan():
    from medfilip.evaluate.metrics import f1_max

    f1, threshold, acc = f1_max(np.zeros((0, 2)), np.zeros((0, 2), dtype=bool))
    assert np.isnan(f1).all() and np.isnan(threshold).all() and np.isnan(acc).all()
    assert all(np.isnan(v) for v in f1_max(np.zeros(0), np.zeros(0, dtype=bool)))

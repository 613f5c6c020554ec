"""The vectorised ROC AUC against scikit-learn and a pairwise-counting twin."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medfilip.evaluate.metrics import roc_auc
from metric_cases import random_case


def pairwise_auc(scores, labels):
    """P(score of a positive > score of a negative) + 0.5 P(tie), over every (positive, negative) pair."""
    pos = [float(s) for s, y in zip(scores, labels) if y]
    neg = [float(s) for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return math.nan
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))




def assert_matches_references(scores, labels, got):
    assert got.shape == (scores.shape[1],)
    for c in range(scores.shape[1]):
        if labels[:, c].all() or not labels[:, c].any():
            assert math.isnan(got[c])
            continue
        assert got[c] == pytest.approx(roc_auc_score(labels[:, c], scores[:, c]), abs=1e-12)
        assert got[c] == pytest.approx(pairwise_auc(scores[:, c], labels[:, c]), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [None, 1, 0])  # 0: integer scores, nearly every score tied
def test_matches_sklearn_and_pairwise_twin(seed, decimals):
    scores, labels = random_case(seed, decimals=decimals)
    assert_matches_references(scores, labels, roc_auc(scores, labels))


def test_ties_are_heavy_in_the_rounded_cases():
    scores, _ = random_case(0, decimals=0)
    assert all(len(np.unique(scores[:, c])) < 10 for c in range(scores.shape[1]))


def test_all_scores_equal_gives_one_half():
    labels = np.array([1, 0, 1, 0, 0])
    assert roc_auc(np.full(5, 0.3), labels) == 0.5


def test_one_class_as_1d_input_gives_a_scalar():
    scores, labels = random_case(7, n=40, n_classes=1, decimals=1)
    got = roc_auc(scores[:, 0], labels[:, 0].astype(int))
    assert np.ndim(got) == 0
    assert float(got) == pytest.approx(roc_auc_score(labels[:, 0], scores[:, 0]), abs=1e-12)
    assert math.isnan(roc_auc(np.array([0.1, 0.9]), np.array([1, 1])))


def test_columns_without_positives_or_negatives_are_nan_and_leave_the_others_alone():
    scores, labels = random_case(3, n=30, n_classes=4)
    labels[:, 1] = False
    labels[:, 2] = True
    got = roc_auc(scores, labels.astype(float))  # 0/1 floats read as booleans
    assert np.isnan(got[1]) and np.isnan(got[2])
    assert_matches_references(scores, labels, got)


def test_perfect_and_reversed_rankings():
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert roc_auc(scores, labels) == 1.0
    assert roc_auc(-scores, labels) == 0.0

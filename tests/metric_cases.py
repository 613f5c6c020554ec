"""Random score/label matrices shared by the metric tests."""

import numpy as np


def random_case(seed, n=60, n_classes=5, decimals=None):
    """(scores (n, C), labels (n, C) bool): positives score higher on average; ``decimals`` makes ties."""
    rng = np.random.default_rng(seed)
    labels = rng.random((n, n_classes)) < rng.uniform(0.1, 0.6, size=n_classes)
    scores = rng.normal(size=(n, n_classes)) + labels * rng.uniform(0, 2, size=n_classes)
    if decimals is not None:
        scores = np.round(scores, decimals)
    return scores, labels

"""Linear probing (the paper's Table 2): logistic regression on frozen image features.

The image tower's pooled backbone features (before the projection) are computed once per
image; then, for each training fraction (1 %, 10 %, 100 %) and seed, a random subset of the
training rows is drawn, the features are standardised with the subset's statistics and one
L2-regularised logistic regression per class (one-vs-rest) is fitted and scored on the test
rows. Everything is a pure function of the seeds.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import torch

from medfilip.evaluate.metrics import roc_auc
from medfilip.model import MedFILIP, _pooled_image

log = logging.getLogger("medfilip.evaluate.probe")

THRESHOLD = 0.5  # F1 and ACC: a fixed threshold, never tuned on the test set
MAX_SUBSET_TRIES = 10


# --------------------------------------------------------------------------- features


@torch.no_grad()
def extract_features(model: MedFILIP, store_array: np.ndarray, pixel_rows: Sequence[int],
                     batch_size: int = 128, device: str | torch.device = "cpu") -> np.ndarray:
    """Pooled image-backbone features (N, D) float32 of the store rows ``pixel_rows``.

    The model runs in eval mode (BatchNorm uses its running statistics), so an image's features
    depend on that image alone, not on the batch it shares. The model's train/eval mode is
    restored afterwards; it is moved to ``device``.
    """
    rows = np.asarray(pixel_rows, dtype=np.int64).reshape(-1)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.to(device).eval()
    out = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            pixels = torch.from_numpy(np.stack([np.asarray(store_array[r], dtype=np.uint8) for r in chunk]))
            x = model.prepare_images(pixels.to(device))
            out.append(_pooled_image(model.image_tower(pixel_values=x)).float().cpu().numpy())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, model.image_proj.in_features), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- the probe


def fraction_key(fraction: float) -> str:
    """0.01 -> '1%', 0.1 -> '10%', 1.0 -> '100%' (the keys of probe.json)."""
    return f"{round(fraction * 100, 6):g}%"


def subset_size(n_rows: int, fraction: float) -> int:
    """Rows in a ``fraction`` subset of ``n_rows``: rounded, at least 1."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"probe fraction must be in (0, 1], got {fraction}")
    return min(n_rows, max(1, int(round(fraction * n_rows))))


def draw_subset(train_y: np.ndarray, fraction: float, seed: int,
                max_tries: int = MAX_SUBSET_TRIES) -> tuple[np.ndarray, list[int]]:
    """Sorted row indices of a random ``fraction`` of the training rows, and the classes left
    without a positive in it although the full training set has one.

    Draws are repeated (up to ``max_tries``) until every class with a positive in the training
    set has one in the subset; otherwise the draw missing the fewest classes is kept. The same
    seed draws nested subsets across fractions when the first try succeeds, and the whole set
    (in its original order) at fraction 1.0.
    """
    y = np.asarray(train_y, dtype=bool)
    n = len(y)
    k = subset_size(n, fraction)
    present = y.any(axis=0)
    if k == n:
        return np.arange(n), []
    rng = np.random.default_rng(seed)
    best_rows, best_missing = None, None
    for _ in range(max(1, max_tries)):
        rows = np.sort(rng.permutation(n)[:k])
        missing = np.flatnonzero(present & ~y[rows].any(axis=0)).tolist()
        if best_missing is None or len(missing) < len(best_missing):
            best_rows, best_missing = rows, missing
        if not missing:
            break
    return best_rows, best_missing


def fit_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, C: float = 1.0,
                max_iter: int = 1000) -> tuple[np.ndarray, list[int]]:
    """Test probabilities (M, C) of one-vs-rest L2 logistic regressions (lbfgs) fitted on
    standardised ``train_x``, and the classes with one label value in ``train_y``, which get
    their constant training prior instead of a fit."""
    from sklearn.linear_model import LogisticRegression

    train_x = np.asarray(train_x, dtype=np.float64)
    test_x = np.asarray(test_x, dtype=np.float64)
    y = np.asarray(train_y, dtype=bool)
    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0)
    std[std == 0] = 1.0  # a constant feature carries no information; leave it at zero
    xs, ts = (train_x - mean) / std, (test_x - mean) / std
    probs = np.empty((len(test_x), y.shape[1]), dtype=np.float64)
    constant = []
    for c in range(y.shape[1]):
        yc = y[:, c]
        if yc.all() or not yc.any():
            probs[:, c] = float(yc.mean()) if len(yc) else 0.0
            constant.append(c)
            continue
        clf = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter)
        clf.fit(xs, yc)
        probs[:, c] = clf.predict_proba(ts)[:, 1]
    return probs, constant


def probe_scores(probs: np.ndarray, test_y: np.ndarray, threshold: float = THRESHOLD) -> dict:
    """AUC (mean over classes with both labels in test), macro F1 at ``threshold`` (over classes
    with a positive in test) and ACC (mean per-class accuracy at ``threshold``, all classes)."""
    y = np.asarray(test_y, dtype=bool)
    pred = np.asarray(probs) >= threshold
    aucs = roc_auc(probs, y)
    tp = (pred & y).sum(axis=0)
    fp = (pred & ~y).sum(axis=0)
    fn = (~pred & y).sum(axis=0)
    has_pos = y.any(axis=0)
    f1 = 2 * tp[has_pos] / np.maximum(2 * tp[has_pos] + fp[has_pos] + fn[has_pos], 1)
    acc = (pred == y).mean(axis=0)
    evaluable = ~np.isnan(aucs)
    return {
        "auc": float(aucs[evaluable].mean()) if evaluable.any() else float("nan"),
        "f1": float(f1.mean()) if len(f1) else float("nan"),
        "acc": float(acc.mean()) if len(acc) else float("nan"),
        "auc_per_class": [None if np.isnan(a) else float(a) for a in aucs],
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    if not len(arr):
        return float("nan"), float("nan")
    if np.all(arr == arr[0]):  # identical fits (fraction 1.0): exactly zero, not rounding noise
        return float(arr[0]), 0.0
    return float(arr.mean()), float(arr.std(ddof=1))  # sample std over seeds


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 fractions: Sequence[float] = (0.01, 0.1, 1.0), seeds: Sequence[int] = (0, 1, 2),
                 C: float = 1.0, max_iter: int = 1000,
                 class_names: Optional[Sequence[str]] = None) -> dict:
    """Table 2: per fraction ('1%', '10%', '100%') the mean and std over seeds of AUC, F1 and
    ACC, with each seed's numbers and the classes that could not be fitted.

    ``*_x``: features (N, D); ``*_y``: bool labels (N, C). At fraction 1.0 every seed fits the
    same rows; the seeds are still counted in ``n_seeds``.
    """
    train_x, test_x = np.asarray(train_x), np.asarray(test_x)
    train_y, test_y = np.asarray(train_y, dtype=bool), np.asarray(test_y, dtype=bool)
    if train_y.ndim != 2 or test_y.ndim != 2 or train_y.shape[1] != test_y.shape[1]:
        raise ValueError(f"labels must be (N, C) with the same C for train and test; got "
                         f"{train_y.shape} and {test_y.shape}")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(f"features and labels disagree in rows: train {len(train_x)} vs {len(train_y)}, "
                         f"test {len(test_x)} vs {len(test_y)}")
    if not len(train_x) or not len(test_x) or not len(seeds):
        raise ValueError("linear probe needs at least one train row, one test row and one seed")
    names = list(class_names) if class_names is not None else list(range(train_y.shape[1]))
    if len(names) != train_y.shape[1]:
        raise ValueError(f"{len(names)} class names for {train_y.shape[1]} label columns")

    results = {}
    fits: dict[bytes, tuple[np.ndarray, list[int]]] = {}  # the same rows are fitted once
    for fraction in fractions:
        per_seed = []
        for seed in seeds:
            rows, missing = draw_subset(train_y, fraction, int(seed))
            key = rows.tobytes()
            if key not in fits:
                fits[key] = fit_predict(train_x[rows], train_y[rows], test_x, C=C, max_iter=max_iter)
            probs, constant = fits[key]
            scores = probe_scores(probs, test_y)
            per_seed.append({
                "seed": int(seed), "n_train": int(len(rows)),
                "auc": scores["auc"], "f1": scores["f1"], "acc": scores["acc"],
                "auc_per_class": dict(zip(map(str, names), scores["auc_per_class"])),
                # Predicted by the constant prior: one label value in the subset.
                "constant_classes": [names[c] for c in constant],
                "missing_positive_classes": [names[c] for c in missing],
            })
            if constant:
                log.warning("probe %s seed %d: %d class(es) with one label value in the subset, predicted "
                            "by their prior: %s", fraction_key(fraction), seed, len(constant),
                            [names[c] for c in constant])
        entry = {}
        for metric in ("auc", "f1", "acc"):
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = _mean_std([s[metric] for s in per_seed])
        entry.update(
            n_seeds=len(per_seed),
            n_train=per_seed[0]["n_train"],
            n_test=int(len(test_x)),
            constant_classes=sorted({c for s in per_seed for c in s["constant_classes"]}, key=names.index),
            per_seed=per_seed,
        )
        results[fraction_key(fraction)] = entry
    return results

"""Linear probe: separable data is learned, a direct scikit-learn fit is its twin, degenerate
subsets are reported, and image features do not depend on the batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from medfilip.evaluate.probe import (draw_subset, extract_features, fraction_key, linear_probe,
                                     subset_size)


def clusters(seed, n, n_classes=4, dim=12, sep=3.0):
    """Multi-label Gaussian data: each class adds its own mean shift to the features."""
    rng = np.random.default_rng(seed)
    y = rng.random((n, n_classes)) < 0.3
    centres = np.random.default_rng(1234).normal(size=(n_classes, dim))
    centres *= sep / np.linalg.norm(centres, axis=1, keepdims=True)
    x = rng.normal(size=(n, dim)) + y.astype(float) @ centres
    return x, y


@pytest.fixture(scope="module")
def data():
    train_x, train_y = clusters(0, 1000)
    test_x, test_y = clusters(1, 400)
    return train_x, train_y, test_x, test_y


@pytest.fixture(scope="module")
def probe(data):
    return linear_probe(*data, fractions=(0.01, 0.1, 1.0), seeds=(0, 1, 2))


def test_fraction_keys():
    assert [fraction_key(f) for f in (0.01, 0.1, 1.0, 0.07)] == ["1%", "10%", "100%", "7%"]


def test_separable_data_is_learned_and_more_data_helps(probe):
    assert set(probe) == {"1%", "10%", "100%"}
    full, one = probe["100%"], probe["1%"]
    assert full["auc_mean"] > 0.9
    assert full["auc_mean"] >= one["auc_mean"] - 0.02
    assert full["acc_mean"] > 0.8 and full["f1_mean"] > 0.7
    for key, n in (("1%", 10), ("10%", 100), ("100%", 1000)):
        entry = probe[key]
        assert entry["n_seeds"] == 3 and entry["n_train"] == n
        for metric in ("auc", "f1", "acc"):
            assert entry[f"{metric}_mean"] == pytest.approx(np.mean([s[metric] for s in entry["per_seed"]]))
            assert entry[f"{metric}_std"] >= 0


def test_full_fraction_is_the_same_fit_for_every_seed(probe):
    full = probe["100%"]
    assert len({s["auc"] for s in full["per_seed"]}) == 1
    assert full["auc_std"] == 0.0 and full["f1_std"] == 0.0 and full["acc_std"] == 0.0


def test_deterministic(data, probe):
    again = linear_probe(*data, fractions=(0.01, 0.1, 1.0), seeds=(0, 1, 2))
    assert again == probe


def twin_scores(train_x, train_y, test_x, test_y, rows):
    """The probe written out plainly: standardise, one sklearn fit per class, sklearn metrics."""
    x, y = train_x[rows], train_y[rows]
    mean, std = x.mean(axis=0), x.std(axis=0)
    aucs, f1s, accs = [], [], []
    for c in range(y.shape[1]):
        clf = LogisticRegression(C=1.0, max_iter=1000).fit((x - mean) / std, y[:, c])
        p = clf.predict_proba((test_x - mean) / std)[:, 1]
        aucs.append(roc_auc_score(test_y[:, c], p))
        f1s.append(f1_score(test_y[:, c], p >= 0.5))
        accs.append(accuracy_score(test_y[:, c], p >= 0.5))
    return np.mean(aucs), np.mean(f1s), np.mean(accs)


@pytest.mark.parametrize("fraction,seed", [(0.1, 0), (0.1, 5), (1.0, 0)])
def test_matches_a_direct_sklearn_fit_on_the_same_subset(data, fraction, seed):
    train_x, train_y, test_x, test_y = data
    rows, missing = draw_subset(train_y, fraction, seed)
    assert missing == [] and len(rows) == subset_size(len(train_y), fraction)
    got = linear_probe(*data, fractions=(fraction,), seeds=(seed,))[fraction_key(fraction)]
    auc, f1, acc = twin_scores(train_x, train_y, test_x, test_y, rows)
    assert got["auc_mean"] == pytest.approx(auc, abs=1e-9)
    assert got["f1_mean"] == pytest.approx(f1, abs=1e-9)
    assert got["acc_mean"] == pytest.approx(acc, abs=1e-9)


def test_subsets_resample_until_each_class_has_a_positive():
    y = np.zeros((500, 2), dtype=bool)
    y[:, 0] = np.arange(500) % 2 == 0
    y[[7, 300], 1] = True  # rare: a 1 % subset (5 rows) almost never holds one by chance
    rows, missing = draw_subset(y, 0.01, seed=0, max_tries=1000)
    assert len(rows) == 5 and missing == [] and y[rows, 1].any()
    assert np.array_equal(rows, draw_subset(y, 0.01, seed=0, max_tries=1000)[0])
    # With few tries the class stays missing, and is named.
    rows, missing = draw_subset(y, 0.01, seed=0, max_tries=1)
    assert missing == [1] and not y[rows, 1].any()


def test_a_class_without_positives_in_the_subset_is_reported_not_fatal(data):
    train_x, train_y, test_x, test_y = data
    train_y = train_y.copy()
    train_y[:, 2] = False
    train_y[0, 2] = True  # one positive in 1000 rows: a 1 % subset misses it
    out = linear_probe(train_x, train_y, test_x, test_y, fractions=(0.01, 1.0), seeds=(0, 1),
                       class_names=["a", "b", "c", "d"])
    small = out["1%"]
    assert "c" in small["constant_classes"]
    for s in small["per_seed"]:
        assert s["constant_classes"] == ["c"] and s["missing_positive_classes"] == ["c"]
        assert s["auc_per_class"]["c"] == 0.5  # the constant prior ranks nothing
    assert math.isfinite(small["auc_mean"]) and math.isfinite(small["f1_mean"])
    assert out["100%"]["constant_classes"] == []  # the full set holds the positive: fitted


def test_a_class_absent_from_train_is_predicted_by_its_prior(data):
    train_x, train_y, test_x, test_y = data
    train_y = train_y.copy()
    train_y[:, 3] = False
    out = linear_probe(train_x, train_y, test_x, test_y, fractions=(1.0,), seeds=(0,))["100%"]
    assert out["constant_classes"] == [3]
    assert out["per_seed"][0]["missing_positive_classes"] == []  # nothing to resample for


def test_bad_shapes_are_explained(data):
    train_x, train_y, test_x, test_y = data
    with pytest.raises(ValueError, match="same C"):
        linear_probe(train_x, train_y, test_x, test_y[:, :2])
    with pytest.raises(ValueError, match="fraction"):
        linear_probe(train_x, train_y, test_x, test_y, fractions=(0.0,))


# --------------------------------------------------------------------------- features


@pytest.fixture(scope="module")
def tiny_model():
    from medfilip.model import MedFILIP, ModelConfig

    torch.manual_seed(0)
    model = MedFILIP(ModelConfig(image_encoder="resnet-small", image_size=32, embed_dim=16))
    model.train()
    # Non-trivial BatchNorm running statistics, so eval mode differs from batch statistics.
    with torch.no_grad():
        for module in model.image_tower.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


def test_features_are_batch_independent_and_per_image(tiny_model):
    from medfilip.model import _pooled_image

    store = np.random.default_rng(0).integers(0, 256, size=(12, 40, 40), dtype=np.uint8)
    rows = [11, 3, 3, 0, 7, 5, 9, 1, 2]
    a = extract_features(tiny_model, store, rows, batch_size=2)
    b = extract_features(tiny_model, store, rows, batch_size=7)
    dim = tiny_model.image_proj.in_features
    assert a.shape == (len(rows), dim) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a[1], a[2])  # the same row twice
    assert tiny_model.training  # the caller's mode is restored
    tiny_model.eval()
    with torch.no_grad():
        for i, r in enumerate(rows):
            x = tiny_model.prepare_images(torch.from_numpy(store[r][None]))
            single = _pooled_image(tiny_model.image_tower(pixel_values=x)).numpy()[0]
            np.testing.assert_allclose(a[i], single, rtol=1e-5, atol=1e-6)
    tiny_model.train()
    np.testing.assert_array_equal(a, extract_features(tiny_model, store, rows, batch_size=2))
    assert extract_features(tiny_model, store, [], batch_size=4).shape == (0, dim)

"""Evaluation pieces against independent computations: truth, zero-shot reports, retrieval."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from medfilip.evaluate.truth import build_truth
from medfilip.evaluate.zeroshot import (fine_grained_report, image_embeddings, multilabel_report,
                                        retrieval_report, single_label_report, unseen_report)
from medfilip.model import MedFILIP, ModelConfig

CLASSES = ["pneumothorax", "pleural effusion", "no finding", "covid-19"]


def _truth(uncertain="positive"):
    images = pa.table({"image_id": ["a1", "a2", "b1", "c1", "d1"], "study_id": ["a", "a", "b", "c", "d"]})
    studies = pa.table({"study_id": ["a", "b", "c", "d"], "split": ["test", "test", "val", "test"]})
    findings = pa.table({
        "study_id": ["a", "a", "b", "c", "d"],
        "category": ["pneumothorax", "pleural effusion", "pneumothorax", "pleural effusion", "covid-19"],
        "severity": ["mild", None, "severe", "moderate", None],
        "uncertain": [False, True, False, False, False],
        "negated": [False, False, True, False, False],
    })
    return build_truth(images, studies, findings, CLASSES, uncertain=uncertain)


def test_truth_never_counts_a_negation_and_applies_the_uncertain_policy():
    t = _truth()
    col = {c: t.column(c) for c in CLASSES}
    assert t.labels[0, col["pneumothorax"]] and t.labels[1, col["pneumothorax"]]  # both images of study a
    assert not t.labels[2, col["pneumothorax"]]  # negated in study b
    assert t.labels[2, col["no finding"]]  # b's only finding is negated: normal
    assert t.labels[0, col["pleural effusion"]]  # uncertain -> positive (U-Ones)
    assert not _truth("negative").labels[0, col["pleural effusion"]]
    ignored = _truth("ignore")
    assert not ignored.known[0, col["pleural effusion"]] and ignored.known[0, col["pneumothorax"]]
    assert t.severity[(0, "pneumothorax")] == "mild"
    assert list(t.split) == ["test", "test", "test", "val", "test"]


def test_a_dataset_reference_is_normal_only_where_it_says_so(tmp_path):
    """SIIM-style labels (pneumothorax or not): "no pneumothorax" is not "no finding"."""
    import pyarrow.parquet as pq

    from medfilip.data.importers import reference_table
    from medfilip.evaluate.truth import load_truth, truth_classes

    images = pa.table({"image_id": ["i1", "i2", "i3"], "study_id": ["s1", "s2", "s3"]})
    studies = pa.table({"study_id": ["s1", "s2", "s3"], "split": ["test"] * 3})
    pq.write_table(images, tmp_path / "images.parquet")
    pq.write_table(studies, tmp_path / "studies.parquet")
    siim = reference_table([{"study_id": "s1", "category": "pneumothorax"},
                            {"study_id": "s2", "category": "pneumothorax", "negated": True}])
    pq.write_table(siim, tmp_path / "reference.parquet")
    assert truth_classes(tmp_path, CLASSES) == ["pneumothorax"]
    t = load_truth(tmp_path, tmp_path, CLASSES, uncertain="positive")
    assert not t.labels[:, t.column("no finding")].any()
    assert t.labels[:, t.column("pneumothorax")].tolist() == [True, False, False]

    nih = reference_table([{"study_id": "s1", "category": "pneumothorax"}, {"study_id": "s3", "category": "no finding"}])
    pq.write_table(nih, tmp_path / "reference.parquet")
    assert truth_classes(tmp_path, CLASSES) == ["pneumothorax", "no finding"]
    t = load_truth(tmp_path, tmp_path, CLASSES, uncertain="positive")
    assert t.labels[:, t.column("no finding")].tolist() == [False, False, True]
    assert t.known.all(axis=1).tolist() == [True, False, True]  # s2 has no label at all: unknown, not negative


def test_multilabel_report_matches_sklearn_and_picks_thresholds_on_val():
    rng = np.random.default_rng(0)
    n = 120
    labels = rng.random((n, 2)) < 0.3
    scores = labels * 0.5 + rng.normal(0, 0.5, (n, 2))
    images = pa.table({"image_id": [f"i{k}" for k in range(n)], "study_id": [f"s{k}" for k in range(n)]})
    studies = pa.table({"study_id": [f"s{k}" for k in range(n)], "split": ["test"] * 80 + ["val"] * 40})
    rows = [{"study_id": f"s{k}", "category": c} for k in range(n) for j, c in enumerate(["x", "y"]) if labels[k, j]]
    truth = build_truth(images, studies, pa.Table.from_pylist(rows), ["x", "y"])
    test, val = truth.select("test"), truth.select("val")
    report = multilabel_report(scores[test], truth, test, scores[val], val, ["x", "y"], n_boot=50, seed=0, split="test")
    for j, c in enumerate(["x", "y"]):
        entry = report["classes"][c]
        assert entry["auc"] == pytest.approx(roc_auc_score(labels[test, j], scores[test, j]))
        assert entry["auc_ci"][0] <= entry["auc"] <= entry["auc_ci"][1]
        best = max(f1_score(labels[test, j], scores[test, j] >= t) for t in scores[test, j])
        assert entry["f1_max"] == pytest.approx(best)
        val_best = max(scores[val, j], key=lambda t: (f1_score(labels[val, j], scores[val, j] >= t), t))
        assert entry["threshold_val"] == pytest.approx(val_best)
        assert entry["f1_at_val_threshold"] == pytest.approx(f1_score(labels[test, j], scores[test, j] >= val_best))
    assert report["mean_auc"] == pytest.approx(np.mean([report["classes"][c]["auc"] for c in ("x", "y")]))
    lo, hi = report["mean_auc_ci"]
    assert lo <= report["mean_auc"] <= hi


def test_single_label_and_unseen_reports_match_sklearn():
    t = _truth()
    rows = t.select("test")
    seen = ["pneumothorax", "pleural effusion", "no finding"]
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.1, 0.2, 0.7], [0.5, 0.4, 0.3]])
    report = single_label_report(scores, t, rows, seen)
    cols = [t.column(c) for c in seen]
    labels = t.labels[rows][:, cols]
    one = labels.sum(1) == 1
    assert report["n_images"] == int(one.sum())
    assert report["accuracy"] == pytest.approx(accuracy_score(labels[one].argmax(1), scores[one].argmax(1)))
    present = sorted(set(labels[one].argmax(1)))
    assert report["macro_f1"] == pytest.approx(
        f1_score(labels[one].argmax(1), scores[one].argmax(1), labels=present, average="macro"))

    unseen = unseen_report({"name": np.array([[0.1], [0.2], [0.3], [0.9]]),
                            "explanation": np.array([[0.5], [0.2], [0.3], [0.1]])}, t, rows, ["covid-19"])
    y = t.labels[rows, t.column("covid-19")]
    assert unseen["covid-19"]["auc_name"] == pytest.approx(roc_auc_score(y, [0.1, 0.2, 0.3, 0.9]))
    assert unseen["covid-19"]["auc_explanation"] == pytest.approx(roc_auc_score(y, [0.5, 0.2, 0.3, 0.1]))
    assert unseen["covid-19"]["explanation_wins"] is False


def test_retrieval_on_a_hand_made_case():
    # Two images, three class texts. Image 0 has classes {0, 1}; image 1 has {2}.
    image_labels = np.array([[1, 1, 0], [0, 0, 1]], dtype=bool)
    text_labels = np.eye(3, dtype=bool)
    image_emb = np.array([[1.0, 0.0], [0.0, 1.0]])
    text_emb = np.array([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]])
    report = retrieval_report(image_emb, image_labels, text_emb, text_labels, ks=(1, 3))
    # i2t: image 0 ranks texts 0 (hit), 2, 1 (hit); image 1 ranks 1 (miss), 2 (hit), 0.
    assert report["i2t"]["p@1"] == pytest.approx(1 / 2)
    assert report["i2t"]["p@3"] == pytest.approx(3 / 6)
    # t2i: text 0 -> image 0 (hit); text 1 -> image 1 (miss); text 2 -> tie 0.5/0.5, lower index: image 0 (miss).
    assert report["t2i"]["p@1"] == pytest.approx(1 / 3)
    # a random ranking's P@K: image 0 has 2 of 3 texts relevant, image 1 has 1; each text 1 of 2 images
    assert report["chance"]["i2t"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert report["chance"]["t2i"] == pytest.approx(1 / 2)


def test_retrieval_chance_is_the_mean_precision_of_random_rankings():
    rng = np.random.default_rng(0)
    image_labels = rng.random((40, 5)) < 0.3
    text_labels = np.eye(5, dtype=bool)
    report = retrieval_report(rng.normal(size=(40, 3)), image_labels, rng.normal(size=(5, 3)), text_labels, ks=(1,))
    # P@1 of many random rankings, the obvious way
    hits = [image_labels[i, rng.integers(0, 5)] for _ in range(200) for i in range(40)]
    assert report["chance"]["i2t"] == pytest.approx(np.mean(hits), abs=0.02)


def test_fine_grained_picks_the_true_severity():
    t = _truth()
    rows = t.select("test")
    prompts = {(s, "pneumothorax"): np.array(v) for s, v in
               (("mild", [1.0, 0.0]), ("moderate", [0.0, 1.0]), ("severe", [-1.0, 0.0]))}
    image_emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    report = fine_grained_report(image_emb, t, rows, ["pneumothorax"], prompts)
    # Images a1 (mild -> right) and a2 (mild, but closest to moderate -> wrong).
    assert report["classes"]["pneumothorax"] == {"severity_accuracy": 0.5, "n": 2}


def test_image_scores_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    model = MedFILIP(ModelConfig(image_encoder="resnet-small", image_size=32, embed_dim=8))
    model.train()
    for module in model.modules():  # running statistics away from their init, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
    store = np.random.default_rng(0).integers(0, 255, (9, 40, 40), dtype=np.uint8)
    rows = np.arange(9)
    one = image_embeddings(model, store, rows, batch_size=1)
    many = image_embeddings(model, store, rows, batch_size=7)
    assert np.allclose(one, many, atol=1e-5)
    reversed_rows = image_embeddings(model, store, rows[::-1], batch_size=4)[::-1]
    assert np.allclose(one, reversed_rows, atol=1e-5)


def test_fine_grained_reports_the_majority_severity_baseline_and_an_image_bootstrap_interval():
    t = _truth()
    rows = t.select("test")
    prompts = {(s, "pneumothorax"): np.array(v) for s, v in
               (("mild", [1.0, 0.0]), ("moderate", [0.0, 1.0]), ("severe", [-1.0, 0.0]))}
    image_emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    report = fine_grained_report(image_emb, t, rows, ["pneumothorax"], prompts, n_boot=200, seed=0)
    # both scored findings are mild: always answering "mild" scores 1.0
    assert report["severity_majority"] == "mild" and report["severity_majority_baseline"] == 1.0
    lo, hi = report["severity_accuracy_ci"]
    assert 0.0 <= lo <= report["severity_accuracy"] <= hi <= 1.0
    # resampling two images with one hit and one miss: the interval spans 0 .. 1
    assert lo == 0.0 and hi == 1.0
    assert fine_grained_report(image_emb, t, rows, ["pneumothorax"], prompts)["severity_accuracy_ci"] is None


def test_every_row_is_scored_in_its_own_training_style_and_in_the_iki_form():
    from medfilip.config import ExplainParams
    from medfilip.prompts import class_prompts, finding_prompt

    explanations = {"pneumothorax": "air in the pleural space"}
    iki = "pneumothorax, where pneumothorax is air in the pleural space"
    for mode, training in (("category", "pneumothorax"), ("triplet", "pneumothorax"),
                           ("triplet_explanation", iki), ("report", iki)):
        explain = ExplainParams(mode=mode)
        assert class_prompts(["pneumothorax"], "explanation", explanations, explain) == [iki]
        assert class_prompts(["pneumothorax"], "training", explanations, explain) == [training]
    triplet = ExplainParams(mode="triplet")
    assert finding_prompt("pneumothorax", "mild", "training", explanations, triplet) == "mild pneumothorax"
    assert finding_prompt("pneumothorax", "mild", "explanation", explanations, triplet) == "mild " + iki
    # category mode has no severity words: its three severity prompts are one text
    category = ExplainParams(mode="category")
    assert len({finding_prompt("pneumothorax", s, "training", explanations, category)
                for s in ("mild", "moderate", "severe")}) == 1

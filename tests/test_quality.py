"""Extraction quality metrics: checked against scikit-learn, MeSH -> categories, the keyword floor."""

import json

import numpy as np
import pyarrow as pa
import pytest

from medfilip.benchmarks.quality import (
    PRED_SCHEMA,
    MeshMapError,
    keyword_baseline,
    load_mesh_map,
    map_mesh_term,
    openi_truth,
    score_extraction,
    truth_labels,
    unmapped_terms,
)
from medfilip.vocab import load_vocabulary

sklearn_metrics = pytest.importorskip("sklearn.metrics")
from sklearn.preprocessing import MultiLabelBinarizer  # noqa: E402


@pytest.fixture(scope="module")
def vocab():
    return load_vocabulary()


def _pred(rows):
    full = [{"severity": None, "location": None, "negated": False, "uncertain": False, "evidence": None, **r}
            for r in rows]
    return pa.Table.from_pylist(full, schema=PRED_SCHEMA)


def _truth(rows):
    full = [{"severity": None, "location": None, **r} for r in rows]
    return pa.Table.from_pylist(full, schema=pa.schema([("study_id", pa.string()), ("category", pa.string()),
                                                         ("severity", pa.string()), ("location", pa.string())]))


def _random_tables(rng, vocab, n_studies=80):
    cats = ["pleural effusion", "pneumothorax", "consolidation", "pneumonia", "atelectasis", "cardiomegaly",
            "nodule", "mass", "fracture"]
    spelled = {"pleural effusion": "Pleural Effusions", "pneumothorax": "PTX", "cardiomegaly": "cardiomegally"}
    studies = [f"s{i}" for i in range(n_studies)]
    truth_rows, pred_rows = [], []
    for s in studies:
        truth_cats = [c for c in cats if rng.random() < 0.25]
        truth_rows += [{"study_id": s, "category": c} for c in truth_cats]
        for c in cats:
            p = 0.8 if c in truth_cats else 0.1
            if rng.random() < p:
                negated = bool(rng.random() < 0.15)
                uncertain = bool(rng.random() < 0.2)
                pred_rows.append({"study_id": s, "category": spelled.get(c, c) if rng.random() < 0.5 else c,
                                  "negated": negated, "uncertain": uncertain})
            elif rng.random() < 0.3:  # a negated mention of an absent finding is never a positive
                pred_rows.append({"study_id": s, "category": c, "negated": True})
    return studies, _truth(truth_rows), _pred(pred_rows)


def _sklearn(studies, truth, pred, vocab, level, uncertain_counts=True):
    """The independent computation: binary indicator matrices and precision_recall_fscore_support."""
    def label(c):
        c = vocab.category_of(c)
        return c if level == "category" else vocab.group_of(c)

    t_sets = {s: set() for s in studies}
    p_sets = {s: set() for s in studies}
    for r in truth.to_pylist():
        t_sets[r["study_id"]].add(label(r["category"]))
    for r in pred.to_pylist():
        if not r["negated"] and (uncertain_counts or not r["uncertain"]):
            p_sets[r["study_id"]].add(label(r["category"]))
    labels = sorted(set().union(*t_sets.values(), *p_sets.values()))
    mlb = MultiLabelBinarizer(classes=labels)
    y_true = mlb.fit_transform([t_sets[s] for s in studies])
    y_pred = mlb.transform([p_sets[s] for s in studies])
    per = sklearn_metrics.precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    micro = sklearn_metrics.precision_recall_fscore_support(y_true, y_pred, average="micro", zero_division=0)
    return labels, per, micro


@pytest.mark.parametrize("level", ["category", "group"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_scikit_learn(vocab, level, seed):
    studies, truth, pred = _random_tables(np.random.default_rng(seed), vocab)
    score = score_extraction(pred, truth, vocab, level, studies=studies)
    labels, (p, r, f, support), micro = _sklearn(studies, truth, pred, vocab, level)
    for i, label in enumerate(labels):
        got = score["per_label"][label]
        assert got["precision"] == pytest.approx(p[i])
        assert got["recall"] == pytest.approx(r[i])
        assert got["f1"] == pytest.approx(f[i])
        assert got["support"] == support[i]
    assert set(score["per_label"]) == set(labels)
    assert score["micro"]["precision"] == pytest.approx(micro[0])
    assert score["micro"]["recall"] == pytest.approx(micro[1])
    assert score["micro"]["f1"] == pytest.approx(micro[2])
    supported = [f[i] for i in range(len(labels)) if support[i] > 0]
    assert score["macro_f1"] == pytest.approx(np.mean(supported))
    assert score["n_studies"] == len(studies)

    strict = score["uncertain_excluded"]
    _, _, micro_strict = _sklearn(studies, truth, pred, vocab, level, uncertain_counts=False)
    assert strict["f1"] == pytest.approx(micro_strict[2])


def test_agreement_scope_studies_and_unknown_categories(vocab):
    truth = _truth([
        {"study_id": "a", "category": "pleural effusion", "severity": "mild", "location": "left"},
        {"study_id": "a", "category": "consolidation", "location": "right lower zone"},
        {"study_id": "b", "category": "pneumothorax", "severity": "severe", "location": "right"},
        {"study_id": "c", "category": "no finding"},  # a scored study without positives
    ])
    pred = _pred([
        {"study_id": "a", "category": "effusion", "severity": "small", "location": "left costophrenic angle"},
        {"study_id": "a", "category": "consolidation", "location": "left base"},
        {"study_id": "b", "category": "pneumothorax", "severity": "moderate", "location": "right apex"},
        {"study_id": "c", "category": "cardiomegaly", "uncertain": True},
        {"study_id": "c", "category": "sternotomy"},  # outside the label space given below
        {"study_id": "c", "category": "wobbly thing"},
        {"study_id": "z", "category": "pneumothorax"},  # not a scored study
    ])
    labels = {"pleural effusion", "consolidation", "pneumothorax", "cardiomegaly"}
    score = score_extraction(pred, truth, vocab, "category", labels=labels)
    assert score["n_studies"] == 3
    assert (score["micro"]["tp"], score["micro"]["fp"], score["micro"]["fn"]) == (3, 1, 0)
    assert score["uncertain_excluded"]["fp"] == 0
    assert score["location_agreement"] == {"n": 3, "exact": pytest.approx(2 / 3), "side_n": 3,
                                           "side": pytest.approx(2 / 3)}
    assert score["severity_agreement"] == {"n": 2, "exact": 0.5}
    assert score["pred_out_of_scope"] == 1
    assert score["pred_unknown_category"] == {"wobbly thing": 1}

    group = score_extraction(pred, truth, vocab, "group", labels=labels)
    assert set(group["per_label"]) == {"pleural", "lung opacity", "pneumothorax", "cardiac"}
    with pytest.raises(ValueError, match="level"):
        score_extraction(pred, truth, vocab, "organ")


# ----------------------------------------------------------------- MeSH -> categories


@pytest.mark.parametrize("term, kind, category, severity, location", [
    ("Opacity/lung/base/left/mild", "finding", "lung opacity", "mild", "left lower zone"),
    ("Cardiomegaly/borderline", "finding", "cardiomegaly", "mild", None),
    ("Pulmonary Atelectasis/base/left", "finding", "atelectasis", None, "left lower zone"),
    ("Pleural Effusion/bilateral/small", "finding", "pleural effusion", "mild", "bilateral"),
    ("Pneumothorax/apex/right/large", "finding", "pneumothorax", "severe", "right"),
    ("Calcified Granuloma/lung/lingula", "finding", "calcified granuloma", None, "left middle zone"),
    ("Opacity/lung/bilateral/interstitial/diffuse", "finding", "interstitial markings", None, "bilateral"),
    ("Lung/hypoinflation/mild", "finding", "hypoinflation", "mild", None),
    ("Lung/hyperdistention", "finding", "hyperinflation", None, None),
    ("Diaphragm/right/elevated", "finding", "diaphragm elevation", None, "right"),
    ("Calcinosis/aorta", "finding", "atherosclerosis", None, None),
    ("Thoracic Vertebrae/degenerative/mild", "finding", "degenerative spine", "mild", None),
    ("Catheters, Indwelling/right", "finding", "support device", None, None),
    ("normal", "normal", None, None, None),
    ("No Indexing", "unusable", None, None, None),
    ("Technical Quality of Image Unsatisfactory ", "ignored", None, None, None),
    ("Lung/azygos lobe", "ignored", None, None, None),
    ("Lung/mild", "unmapped", None, None, None),
    ("Unicorn Horn/left", "unmapped", None, None, None),
])
def test_mesh_terms(vocab, term, kind, category, severity, location):
    mesh_map = load_mesh_map(vocabulary=vocab)
    m = map_mesh_term(term, mesh_map, vocab)
    assert (m.kind, m.category, m.severity, m.location) == (kind, category, severity, location)


def test_mesh_map_names_unknown_categories(tmp_path, vocab):
    path = tmp_path / "mesh.yaml"
    path.write_text("terms:\n  Opacity: {category: lung opacity, when: {round: blob}}\n")
    with pytest.raises(MeshMapError, match=r"terms.Opacity.when.round: 'blob'"):
        load_mesh_map(path, vocab)


class _Report:
    def __init__(self, uid, *terms):
        self.uid, self.mesh_major = uid, terms


def test_openi_truth_from_mesh_tags(vocab):
    reports = [
        _Report("CXR1", "normal"),
        _Report("CXR2", "Cardiomegaly/mild", "Opacity/lung/base/left", "Technical Quality of Image Unsatisfactory"),
        _Report("CXR3", "No Indexing"),
        _Report("CXR4", "Technical Quality of Image Unsatisfactory"),
        _Report("CXR5", "Unicorn Horn", "Pleural Effusion/right"),
        _Report("CXR6", "Unicorn Horn"),
    ]
    truth = openi_truth(reports, vocabulary=vocab)
    rows = {(r["study_id"], r["category"]): r for r in truth.to_pylist()}
    assert set(truth.column("study_id").to_pylist()) == {"CXR1", "CXR2", "CXR5"}  # the usable studies
    assert rows[("CXR1", "no finding")]["mesh"] == "normal"
    assert rows[("CXR2", "cardiomegaly")]["severity"] == "mild"
    assert rows[("CXR2", "lung opacity")]["location"] == "left lower zone"
    assert rows[("CXR2", "lung opacity")]["group"] == "lung opacity"
    assert unmapped_terms(truth) == {"Unicorn Horn": 2}
    assert "pleural effusion" in truth_labels(truth) and "sternotomy" not in truth_labels(truth)
    assert json.loads(truth.schema.metadata[b"term_counts"])["unusable"] == 1


# ----------------------------------------------------------------- the keyword floor


def test_keyword_baseline(vocab):
    found = {f.category: f for f in keyword_baseline(
        "Small left pleural effusion. No pneumothorax. Heart size is normal! Possible pneumonia.", vocab)}
    assert not found["pleural effusion"].negated and found["pleural effusion"].severity == "mild"
    assert found["pleural effusion"].location == "left"
    assert found["pneumothorax"].negated
    assert not found["pneumonia"].negated and not found["pneumonia"].uncertain  # the floor knows no hedges
    assert "cardiomegaly" not in found  # nor statements of normality
    assert keyword_baseline("", vocab) == []

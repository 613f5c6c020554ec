"""Extraction quality metrics: checked against scikit-learn, MeSH -> categories, the keyword floor,
in-scope vs strict, the tuning/held-out split of Open-i, and the `score` stage."""

import hashlib
import io
import json
import runpy
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from medfilip.benchmarks.quality import (
    HALVES,
    PRED_SCHEMA,
    SPLIT_RULE,
    MeshMapError,
    halves,
    keyword_baseline,
    load_mesh_map,
    map_mesh_term,
    openi_truth,
    score_datasets,
    score_extraction,
    split_half,
    truth_labels,
    unmapped_studies,
    unmapped_terms,
)
from medfilip.config import ExtractParams, LLMParams
from medfilip.vocab import load_vocabulary

ROOT = Path(__file__).resolve().parents[1]

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

    certain = score["uncertain_excluded"]
    _, _, micro_certain = _sklearn(studies, truth, pred, vocab, level, uncertain_counts=False)
    assert certain["f1"] == pytest.approx(micro_certain[2])
    # Every label in scope and no unmapped study: strict is the in-scope score.
    assert {k: score["strict"][k] for k in ("tp", "fp", "fn")} == {k: score["micro"][k] for k in ("tp", "fp", "fn")}


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
    assert unmapped_studies(truth) == ["CXR4", "CXR6"]  # indexed, no tag maps: kept for the strict score
    assert truth.schema.metadata[b"n_not_indexed"] == b"1"  # CXR3: No Indexing, no reference at all
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


# ----------------------------------------------------------------- in scope vs strict


def test_strict_counts_out_of_scope_and_unmapped_studies_as_false_positives(vocab):
    truth = _truth([
        {"study_id": "a", "category": "pleural effusion"},
        {"study_id": "a", "category": "cardiomegaly"},
        {"study_id": "b", "category": "pneumothorax"},
        {"study_id": "c", "category": "no finding"},
    ])
    pred = _pred([
        {"study_id": "a", "category": "pleural effusion"},               # TP
        {"study_id": "a", "category": "cardiomegaly", "negated": True},  # FN
        {"study_id": "a", "category": "sternotomy"},                     # out of scope
        {"study_id": "b", "category": "pneumothorax"},                   # TP
        {"study_id": "b", "category": "consolidation"},                  # FP in scope
        {"study_id": "c", "category": "sternotomy"},                     # out of scope
        {"study_id": "c", "category": "wobbly thing"},                   # no category: out of scope
        {"study_id": "d", "category": "consolidation"},                  # an unmapped study: FP
        {"study_id": "d", "category": "sternotomy"},                     # an unmapped study, out of scope
        {"study_id": "e", "category": "pneumothorax"},                   # not scored at all
    ])
    labels = {"pleural effusion", "cardiomegaly", "pneumothorax", "consolidation"}
    score = score_extraction(pred, truth, vocab, "category", labels=labels, unmapped=["d"])
    # In scope, by hand: TP 2 (a effusion, b pneumothorax), FP 1 (b consolidation), FN 1 (a cardiomegaly).
    assert (score["micro"]["tp"], score["micro"]["fp"], score["micro"]["fn"]) == (2, 1, 1)
    assert score["micro"]["precision"] == pytest.approx(2 / 3) and score["micro"]["f1"] == pytest.approx(2 / 3)
    assert score["n_studies"] == 3
    # Strict: the same TP and FN, and 5 more FP: a, c, d sternotomy, c "wobbly thing", d consolidation.
    strict = score["strict"]
    assert (strict["tp"], strict["fp"], strict["fn"], strict["n_studies"]) == (2, 6, 1, 4)
    assert strict["precision"] == pytest.approx(2 / 8)
    assert strict["recall"] == pytest.approx(2 / 3)
    assert strict["f1"] == pytest.approx(4 / 11)  # 2PR/(P+R) = (1/3)/(11/12)
    assert (strict["fp_out_of_scope"], strict["fp_unmapped_studies"]) == (4, 1)
    assert strict["out_of_scope_labels"] == {"sternotomy": 3, "unknown: wobbly thing": 1}
    assert strict["precision"] < score["micro"]["precision"]

    # At the group level the label space is the groups of ``labels``; the same bookkeeping holds.
    group = score_extraction(pred, truth, vocab, "group", labels=labels, unmapped=["d"])
    g, m = group["strict"], group["micro"]
    assert (g["tp"], g["fn"]) == (m["tp"], m["fn"])
    assert g["fp"] == m["fp"] + g["fp_out_of_scope"] + g["fp_unmapped_studies"] == 6


# ----------------------------------------------------------------- the tuning / held-out split


def test_split_half_is_a_stable_balanced_hash_of_the_study_id():
    # Fixed here so that a change of the rule (another hash, salt or bit) fails: the halves must not move.
    assert [split_half(s) for s in ("CXR1", "CXR2", "CXR3", "CXR4", "CXR10", "CXR3955")] == \
        ["held_out", "held_out", "tuning", "tuning", "tuning", "tuning"]
    ids = [f"CXR{i}" for i in range(1, 3956)]
    # The slow twin: the last hex digit of the digest is odd for held_out.
    assert all(split_half(s) == HALVES[int(hashlib.sha256(s.encode()).hexdigest()[-1], 16) % 2] for s in ids)
    split = halves(ids, ids[:10])
    tuning, held_out = set(split["tuning"][0]), set(split["held_out"][0])
    assert not tuning & held_out and tuning | held_out == set(ids) == set(split["all"][0])
    assert 0.47 < len(tuning) / len(ids) < 0.53
    assert sorted(split["tuning"][1] + split["held_out"][1]) == sorted(ids[:10])


_XML = """<eCitation><IUXRId id="{n}"/><uId id="CXR{n}"/><MedlineCitation><Article><Abstract>
<AbstractText Label="FINDINGS">{findings}</AbstractText><AbstractText Label="IMPRESSION">{impression}</AbstractText>
</Abstract></Article></MedlineCitation><MeSH>{mesh}</MeSH></eCitation>"""


def _archive(path: Path, reports: list[tuple[str, str, list[str]]]) -> Path:
    """A tar.gz shaped like Open-i's, of reports written for this test."""
    with tarfile.open(path, "w:gz") as tar:
        for n, (findings, impression, mesh) in enumerate(reports, start=1):
            data = _XML.format(n=n, findings=findings, impression=impression,
                               mesh="".join(f"<major>{m}</major>" for m in mesh)).encode()
            info = tarfile.TarInfo(f"ecgen-radiology/{n}.xml")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_score_datasets_reports_both_halves_in_scope_and_strict(tmp_path):
    archive = _archive(tmp_path / "reports.tgz", [
        ("Small left pleural effusion.", "Left effusion.", ["Pleural Effusion/left/small"]),  # CXR1 held_out
        ("Heart size is normal. Lungs are clear.", "No acute disease.", ["normal"]),         # CXR2 held_out
        ("Median sternotomy wires. Right pneumothorax.", "Pneumothorax.", ["Pneumothorax/right"]),  # CXR3 tuning
        ("Cardiomegaly. Right pleural effusion.", "Effusion.", ["Unicorn Horn"]),             # CXR4 tuning, unmapped
        ("No acute findings.", "Normal.", ["No Indexing"]),                                   # CXR5 not indexed
    ])
    llm = LLMParams(provider="rules", model="rules-v1")
    results = score_datasets(llm, ExtractParams(cache=str(tmp_path / "llm.sqlite"), progress=False), openi=True,
                             phantom_dir=None, openi_archive=archive)
    openi = results["openi"]
    assert openi["split"] == SPLIT_RULE and openi["n_not_indexed"] == 1 and openi["n_unmapped_studies"] == 1
    for extractor in ("rules:rules-v1", "keyword"):
        entry = openi[extractor]
        for level in ("category", "group"):
            n = {half: entry[half][level]["in_scope"]["n_studies"] for half in ("all", *HALVES)}
            assert n == {"all": 3, "tuning": 1, "held_out": 2}
            n = {half: entry[half][level]["strict"]["n_studies"] for half in ("all", *HALVES)}
            assert n == {"all": 4, "tuning": 2, "held_out": 2}  # + CXR4, whose only tag is unmapped
        cat = entry["all"]["category"]
        assert cat["in_scope"]["recall"] == 1.0
        # sternotomy (CXR3) is out of scope; CXR4's cardiomegaly and effusion have no reference.
        assert cat["strict"]["fp_out_of_scope"] >= 1 and cat["strict"]["fp_unmapped_studies"] == 2
        assert cat["strict"]["precision"] < cat["in_scope"]["precision"]
        assert entry["held_out"]["category"]["strict"]["fp"] == entry["held_out"]["category"]["in_scope"]["fp"]


# ----------------------------------------------------------------- the `score` stage


def test_score_stage_writes_the_quality_report_under_dvc():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["score"]
    assert stage["cmd"] == "python pipeline/score.py" and (ROOT / "pipeline/score.py").exists()
    assert {"reports/quality.json": {"cache": False}} in stage["metrics"]
    assert {"pipeline/score.py", "medfilip/benchmarks/quality.py", "medfilip/data/openi.py", "medfilip/extract",
            "data/extract/rules", "data/knowledge/vocabulary.yaml", "data/knowledge/mesh_map.yaml",
            "data/raw/phantom"} <= set(stage["deps"])
    assert {"llm", "extract.text", "extract.max_report_chars"} <= set(stage["params"])
    assert not (ROOT / "reports/quality_rules.json").exists()  # superseded: a report no stage writes goes stale


def test_score_stage_without_torchxrayvision_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import medfilip.data.openi

    monkeypatch.setattr(medfilip.data.openi, "package_dirs", lambda package: [])
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "pipeline/score.py"), run_name="__main__")
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("score: ") and "pip install --no-deps torchxrayvision" in err and "\n" not in err
    assert not (tmp_path / "reports").exists()

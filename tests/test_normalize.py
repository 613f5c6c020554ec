"""normalize: synonyms, plurals, misspellings -> canonical; every row kept or dropped with a reason."""

import pyarrow as pa
import pytest

from medfilip.normalize import normalize_triplets
from medfilip.vocab import load_vocabulary


@pytest.fixture(scope="module")
def vocabulary():
    return load_vocabulary()


def raw_table(rows):
    base = {"study_id": "s1", "severity": None, "location": None, "category": None, "negated": False,
            "uncertain": False, "evidence": None, "provider": "openai", "model": "m"}
    return pa.Table.from_pylist([{**base, **r} for r in rows])


def by_category(table):
    return {r["category"]: r for r in table.to_pylist()}


@pytest.mark.parametrize("raw, canonical", [
    ("Pleural Effusions", "pleural effusion"),
    ("effusion", "pleural effusion"),
    ("plueral effusion", "pleural effusion"),
    ("enlarged cardiac silhouette", "cardiomegaly"),
    ("PNEUMOTHORACES", "pneumothorax"),
    ("airspace consolidation", "consolidation"),
    ("pulmonary nodules", "nodule"),
    ("interstitial edema", "pulmonary edema"),
])
def test_synonyms_plurals_misspellings(vocabulary, raw, canonical):
    table, _ = normalize_triplets(raw_table([{"category": raw}]), vocabulary)
    row = table.to_pylist()[0]
    assert row["category"] == raw  # the raw value is kept beside the canonical one
    assert row["category_norm"] == canonical and row["kept"] and row["drop_reason"] is None


def test_severity_and_location_normalised(vocabulary):
    table, summary = normalize_triplets(raw_table([
        {"category": "effusion", "severity": "small", "location": "left base"},
        {"study_id": "s2", "category": "pneumothorax", "severity": "large", "location": "right apex"},
        {"study_id": "s3", "category": "consolidation", "severity": "very weird", "location": "somewhere"},
    ]), vocabulary)
    rows = {r["study_id"]: r for r in table.to_pylist()}
    assert rows["s1"]["severity_norm"] == "mild"
    assert rows["s1"]["location_norm"] is not None and "left" in rows["s1"]["location_norm"]
    assert rows["s2"]["severity_norm"] == "severe" and "right" in rows["s2"]["location_norm"]
    assert rows["s3"]["kept"] and rows["s3"]["severity_norm"] is None
    assert summary["top_unmapped_severity"] == [{"term": "very weird", "count": 1}]


def test_drop_reasons_and_counts(vocabulary):
    rows = [
        {"category": "pleural effusion", "severity": "moderate"},
        {"category": "effusions", "severity": "moderate"},  # the same finding again (IMPRESSION): merged
        {"category": ""},
        {"category": "flux capacitor malfunction"},
        {"category": "flux capacitor malfunction", "study_id": "s2"},
        {"category": "pneumothorax", "negated": True},
        {"category": "pneumothorax", "negated": False},  # not a duplicate: negation differs
    ]
    table, summary = normalize_triplets(raw_table(rows), vocabulary)
    out = table.to_pylist()
    assert len(out) == len(rows)  # nothing dropped silently
    assert [r["drop_reason"] for r in out] == [
        None, "duplicate", "no_category", "out_of_vocabulary", "out_of_vocabulary", None, None]
    assert out[0]["severity_norm"] == "moderate"
    assert summary["dropped_by_reason"] == {"no_category": 1, "out_of_vocabulary": 2, "duplicate": 1}
    assert summary["n_kept"] == 3 and summary["n_rows"] == 7
    assert summary["top_oov_terms"] == [{"term": "flux capacitor malfunction", "count": 2}]
    assert {"category_norm", "severity_norm", "location_norm", "kept", "drop_reason"} <= set(table.column_names)


def test_two_labels_with_different_locations_in_one_report_survive_normalize(vocabulary):
    rows = [
        {"category": "nodule", "location": "right upper lobe"},
        {"category": "pulmonary nodule", "location": "left lower lobe"},
        {"category": "nodules", "location": "right upper lobe"},  # an exact repeat of the first
    ]
    table, summary = normalize_triplets(raw_table(rows), vocabulary)
    out = table.to_pylist()
    assert [r["kept"] for r in out] == [True, True, False] and out[2]["drop_reason"] == "duplicate"
    assert out[0]["location_norm"] != out[1]["location_norm"]
    assert "right" in out[0]["location_norm"] and "left" in out[1]["location_norm"]
    assert summary["kept_by_category"] == {"nodule": 2}


@pytest.mark.parametrize("other", [
    {"severity": "large"},  # a different severity
    {"location": None},  # stated with less detail: not the same statement
])
def test_rows_differing_in_severity_or_location_are_not_duplicates(vocabulary, other):
    first = {"category": "pleural effusion", "severity": "small", "location": "left"}
    table, _ = normalize_triplets(raw_table([first, {**first, **other}]), vocabulary)
    assert table.column("kept").to_pylist() == [True, True]


def test_uncertain_carried_and_kept_apart_from_certain(vocabulary):
    rows = [
        {"category": "pneumonia", "uncertain": True},  # "possible pneumonia"
        {"category": "pneumonia", "uncertain": False},  # "pneumonia" elsewhere in the report
        {"category": "pneumonia", "uncertain": True},  # exact repeat of the first
    ]
    table, summary = normalize_triplets(raw_table(rows), vocabulary)
    assert table.column("uncertain").to_pylist() == [True, False, True]
    assert table.column("kept").to_pylist() == [True, True, False]
    assert summary["kept_uncertain"] == 1


def test_without_deduplication_all_in_vocabulary_rows_kept(vocabulary):
    rows = [{"category": "pleural effusion"}, {"category": "effusions"}]
    table, summary = normalize_triplets(raw_table(rows), vocabulary, deduplicate=False)
    assert summary["n_kept"] == 2


def test_empty_input(vocabulary):
    empty = raw_table([{"category": "x"}]).slice(0, 0)
    table, summary = normalize_triplets(empty, vocabulary)
    assert table.num_rows == 0 and summary["n_rows"] == 0

"""explain: the ablation modes, negated findings, normal labels, stable unique text ids."""

import pyarrow as pa
import pytest

from medfilip.config import ExplainParams
from medfilip.explain import ExplainError, build_labels, render_label, text_id

EXPLANATIONS = {
    "pleural effusion": "a dense opacity at the lung base with a meniscus",
    "pneumothorax": "a dark rim of air without lung markings",
    "no finding": "a radiograph with clear lungs and a normal heart",
}


def triplets(rows):
    base = {"study_id": "s1", "category": "x", "severity_norm": None, "location_norm": None, "negated": False,
            "kept": True, "category_norm": "pleural effusion", "drop_reason": None}
    return pa.Table.from_pylist([{**base, **r} for r in rows])


STUDIES = pa.table({
    "study_id": ["s1", "s2", "s3", "s4"],
    "report": ["FINDINGS: Mild left effusion. No pneumothorax.", "Normal chest.", "Mild left effusion.", "???"],
    "findings": ["Mild left effusion. No pneumothorax.", None, None, None],
    "impression": [None, "Normal chest.", None, None],
})
EXTRACTIONS = pa.table({"study_id": ["s1", "s2", "s3", "s4"], "status": ["ok", "ok", "ok", "failed"]})
ROWS = [
    {"study_id": "s1", "severity_norm": "mild", "location_norm": "left"},
    {"study_id": "s1", "category_norm": "pneumothorax", "negated": True},
    {"study_id": "s3", "severity_norm": "mild", "location_norm": "left"},
    {"study_id": "s3", "category_norm": "pneumothorax", "kept": False, "drop_reason": "duplicate"},
]


def texts_of(labels, texts, study):
    lookup = dict(zip(texts.column("text_id").to_pylist(), texts.column("text").to_pylist()))
    return sorted(lookup[t] for s, t in zip(labels.column("study_id").to_pylist(),
                                            labels.column("text_id").to_pylist()) if s == study)


def run(**kw):
    return build_labels(triplets(ROWS), STUDIES, EXTRACTIONS, EXPLANATIONS, ExplainParams(**kw))


def test_paper_mode_renders_triplet_with_explanation():
    labels, texts, summary = run()
    assert texts_of(labels, texts, "s1") == [
        "mild left pleural effusion, where pleural effusion is a dense opacity at the lung base with a meniscus"]
    # s1 and s3 share the same finding: one unique text, two labels.
    assert texts_of(labels, texts, "s3") == texts_of(labels, texts, "s1")
    assert summary["n_unique_texts"] == texts.num_rows == 2  # the finding + the normal label
    assert texts_of(labels, texts, "s2") == ["no finding, where no finding is a radiograph with clear lungs and a normal heart"]
    assert texts_of(labels, texts, "s4") == []  # failed extraction: unknown, not normal
    assert summary["n_studies_failed_extraction"] == 1 and summary["n_studies_normal_label"] == 1


def test_category_and_triplet_modes():
    labels, texts, _ = run(mode="category")
    assert texts_of(labels, texts, "s1") == ["pleural effusion"]
    labels, texts, _ = run(mode="triplet")
    assert texts_of(labels, texts, "s1") == ["mild left pleural effusion"]


def test_report_mode_one_label_per_study():
    labels, texts, summary = run(mode="report")
    assert texts_of(labels, texts, "s1") == ["Mild left effusion. No pneumothorax."]
    assert texts_of(labels, texts, "s3") == ["Mild left effusion."]
    assert texts_of(labels, texts, "s4") == []
    assert labels.column("category_norm").null_count == labels.num_rows


def test_negated_findings_become_labels_when_asked():
    labels, texts, _ = run(mode="triplet", include_negated=True)
    assert texts_of(labels, texts, "s1") == ["mild left pleural effusion", "no pneumothorax"]
    negated = dict(zip(labels.column("text_id").to_pylist(), labels.column("negated").to_pylist()))
    assert negated[text_id("no pneumothorax")] is True


def test_no_normal_label_when_disabled():
    labels, texts, _ = run(normal_label=None)
    assert texts_of(labels, texts, "s2") == []


def test_text_ids_are_stable_hashes():
    labels, texts, _ = run()
    for tid, text in zip(texts.column("text_id").to_pylist(), texts.column("text").to_pylist()):
        assert tid == text_id(text)
    assert text_id("a") == text_id("a") != text_id("b")


def test_missing_explanation_and_bad_template_are_named():
    with pytest.raises(ExplainError, match="'cardiomegaly' has no explanation"):
        render_label("cardiomegaly", None, None, False, ExplainParams(), EXPLANATIONS)
    with pytest.raises(ExplainError, match="unknown field"):
        run(template="{category} {colour}")


def test_template_without_severity_or_location_reads_cleanly():
    text = render_label("pneumothorax", None, None, False, ExplainParams(), EXPLANATIONS)
    assert text == "pneumothorax, where pneumothorax is a dark rim of air without lung markings"

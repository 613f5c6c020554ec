"""explain: the ablation modes, negated findings, normal labels from the report, uncertainty, stable text ids."""

import pyarrow as pa
import pytest

from medfilip.config import ExplainParams, ExtractParams
from medfilip.explain import ExplainError, build_labels, render_label, text_id
from medfilip.extract.text import report_text

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


# --------------------------------------------------------------------------- the normal label


NORMAL = "no finding, where no finding is a radiograph with clear lungs and a normal heart"


def study(sid, report, findings=None, impression=None, rows=(), status="ok", n_dropped=0, **kw):
    """One study's row, extraction and normalized findings, for :func:`build_one`."""
    return {"study_id": sid, "report": report, "findings": findings, "impression": impression,
            "rows": [{"study_id": sid, **r} for r in rows], "status": status, "n_dropped": n_dropped}


def build_one(*cases, extract=None, **kw):
    base = {"category": "x", "severity_norm": None, "location_norm": None, "negated": False, "uncertain": False,
            "kept": True, "category_norm": "pleural effusion", "drop_reason": None}
    rows = [{**base, **r} for c in cases for r in c["rows"]]
    schema = pa.schema([("study_id", pa.string()), ("category", pa.string()), ("severity_norm", pa.string()),
                        ("location_norm", pa.string()), ("negated", pa.bool_()), ("uncertain", pa.bool_()),
                        ("kept", pa.bool_()), ("category_norm", pa.string()), ("drop_reason", pa.string())])
    studies = pa.Table.from_pylist([{k: c[k] for k in ("study_id", "report", "findings", "impression")}
                                    for c in cases])
    extractions = pa.Table.from_pylist([{k: c[k] for k in ("study_id", "status", "n_dropped")} for c in cases])
    return build_labels(pa.Table.from_pylist(rows, schema=schema), studies, extractions, EXPLANATIONS,
                        ExplainParams(**kw), extract=extract)


def reasons(summary):
    return {k: v for k, v in summary["unlabelled_by_reason"].items() if v}


def test_an_empty_report_gets_no_normal_label():
    labels, texts, summary = build_one(study("e1", ""), study("e2", "   \n"))
    assert labels.num_rows == 0 and summary["n_studies_normal_label"] == 0
    assert reasons(summary) == {"empty_report": 2} and summary["n_studies_unlabelled"] == 2


def test_all_dropped_findings_get_no_normal_label():
    dropped = [{"category_norm": None, "kept": False, "drop_reason": "out_of_vocabulary"},
               {"category": "", "category_norm": None, "kept": False, "drop_reason": "no_category"}]
    labels, texts, summary = build_one(
        study("d1", "Flux capacitor malfunction.", rows=dropped),
        # a normal statement does not outweigh a finding nobody could read
        study("d2", "No acute cardiopulmonary process. Flux capacitor.", rows=dropped[:1]),
        # nor do negations beside it
        study("d3", "No effusion. Flux capacitor.", rows=[{"negated": True}, dropped[0]]),
        # findings the extract stage dropped for want of a category count too
        study("d4", "Normal chest.", n_dropped=1),
    )
    assert labels.num_rows == 0
    assert reasons(summary) == {"findings_dropped": 4}


def test_all_negated_findings_with_nothing_dropped_get_the_normal_label():
    negated = [{"negated": True}, {"category_norm": "pneumothorax", "negated": True},
               {"category_norm": "pneumothorax", "negated": True, "kept": False, "drop_reason": "duplicate"}]
    labels, texts, summary = build_one(study("n1", "No effusion. No pneumothorax. No pneumothorax.", rows=negated))
    assert texts_of(labels, texts, "n1") == [NORMAL]
    assert summary["normal_label_evidence"] == {"normal_statement": 0, "all_negated": 1}
    row = labels.to_pylist()[0]
    assert row["category_norm"] == "no finding" and not row["negated"] and not row["uncertain"]


@pytest.mark.parametrize("report", [
    "FINDINGS: Heart size is normal. IMPRESSION: No acute cardiopulmonary process.",
    "The lungs are clear.",
    "Normal chest.",
    "IMPRESSION:\n1. No acute intrathoracic abnormality.",
])
def test_explicit_normal_statement_gets_the_normal_label(report):
    labels, texts, summary = build_one(study("a", report))
    assert texts_of(labels, texts, "a") == [NORMAL]
    assert summary["normal_label_evidence"]["normal_statement"] == 1


def test_no_finding_and_no_normal_statement_gets_no_label():
    labels, _, summary = build_one(study("q", "Stable appearance of the chest. Lungs are not clear."))
    assert labels.num_rows == 0 and reasons(summary) == {"no_normal_statement": 1}


def test_normal_statement_is_read_in_the_text_the_extractor_saw():
    filler = "Portable technique. " * 40  # 800 characters before the impression
    case = study("t", filler + "IMPRESSION: Normal chest.", findings=filler, impression="Normal chest.")
    labels, _, _ = build_one(case)
    assert labels.num_rows == 1  # sections: the impression is read
    labels, _, summary = build_one(case, extract=ExtractParams(max_report_chars=500))
    assert labels.num_rows == 0 and reasons(summary) == {"no_normal_statement": 1}  # cut before it


def test_normal_category_from_the_extractor_is_a_statement_not_a_second_label():
    labels, texts, summary = build_one(
        study("c", "All good.", rows=[{"category": "normal chest", "category_norm": "no finding"}]),
        study("c2", "Effusion. All good.", rows=[{}, {"category_norm": "no finding"}]),
    )
    assert texts_of(labels, texts, "c") == [NORMAL]
    assert texts_of(labels, texts, "c2") == [
        "pleural effusion, where pleural effusion is a dense opacity at the lung base with a meniscus"]


def test_uncertain_is_carried_and_an_uncertain_study_is_not_normal():
    labels, texts, summary = build_one(
        study("u1", "Possible effusion. No acute cardiopulmonary process.", rows=[{"uncertain": True}]),
        # the same text hedged once and stated once: the certain mention decides
        study("u2", "Effusion, possibly. Effusion.", rows=[{"uncertain": True}, {"uncertain": False}]),
        # only a hedged negation ("effusion is unlikely") is no evidence of a normal study
        study("u3", "Effusion unlikely.", rows=[{"negated": True, "uncertain": True}]),
    )
    rows = {r["study_id"]: r for r in labels.to_pylist()}
    assert set(rows) == {"u1", "u2"} and labels.num_rows == 2
    assert rows["u1"]["uncertain"] is True and rows["u1"]["category_norm"] == "pleural effusion"
    assert rows["u2"]["uncertain"] is False
    assert summary["n_labels_uncertain"] == 1 and summary["n_studies_normal_label"] == 0
    assert reasons(summary) == {"uncertain_negation": 1}
    assert labels.schema.field("uncertain").type == pa.bool_()


def test_negated_labels_label_a_study_without_making_it_normal():
    labels, texts, summary = build_one(
        study("i", "No effusion. Flux capacitor.",
              rows=[{"negated": True}, {"category_norm": None, "kept": False, "drop_reason": "out_of_vocabulary"}]),
        mode="triplet", include_negated=True)
    assert texts_of(labels, texts, "i") == ["no pleural effusion"]
    assert summary["n_studies_normal_label"] == 0 and reasons(summary) == {}


def test_failed_extraction_and_disabled_normal_label_are_counted():
    labels, _, summary = build_one(study("f", "Normal chest.", status="failed"), study("g", "Normal chest."),
                                   normal_label=None)
    assert labels.num_rows == 0
    assert reasons(summary) == {"failed_extraction": 1, "normal_label_disabled": 1}
    assert set(summary["unlabelled_by_reason"]) == {
        "failed_extraction", "empty_report", "findings_dropped", "uncertain_negation", "no_normal_statement",
        "normal_label_disabled"}


def test_report_mode_counts_empty_and_failed():
    _, _, summary = build_one(study("r1", ""), study("r2", "x", status="failed"), study("r3", "Normal."),
                              mode="report")
    assert reasons(summary) == {"empty_report": 1, "failed_extraction": 1} and summary["n_labels"] == 1


def test_phantom_normal_studies_get_the_normal_label_and_abnormal_ones_do_not():
    """The synthetic benchmark's normal reports, read by the rules extractor, end up normal."""
    import numpy as np

    from medfilip.data.phantom import demo_finding
    from medfilip.data.phantom_findings import StudyPlan
    from medfilip.data.phantom_reports import write_report
    from medfilip.data.sections import findings_and_impression
    from medfilip.extract.rules import RulesExtractor
    from medfilip.normalize import normalize_triplets

    rules = RulesExtractor()
    rng = np.random.default_rng(0)
    plans = {f"n{i}": StudyPlan(1 + i % 2, ()) for i in range(40)}
    plans.update({f"a{i}": StudyPlan(1, (demo_finding(c, "moderate"),))
                  for i, c in enumerate(("pleural effusion", "pneumothorax", "cardiomegaly", "consolidation"))})
    studies, raw = [], []
    for sid, plan in plans.items():
        report = write_report(plan, rng)
        findings, impression = findings_and_impression(report)
        studies.append({"study_id": sid, "report": report, "findings": findings, "impression": impression})
        text, _ = report_text(studies[-1], ExtractParams())
        raw += [{**f.to_dict(), "study_id": sid} for f in rules.extract_report(text)]
    triplets, _ = normalize_triplets(pa.Table.from_pylist(raw), rules.vocabulary)
    extractions = pa.table({"study_id": list(plans), "status": ["ok"] * len(plans)})
    labels, texts, summary = build_labels(triplets, pa.Table.from_pylist(studies), extractions, EXPLANATIONS,
                                          ExplainParams(mode="category"))
    normal = {s for s, c in zip(labels.column("study_id").to_pylist(), labels.column("category_norm").to_pylist())
              if c == "no finding"}
    assert normal == {sid for sid in plans if sid.startswith("n")}

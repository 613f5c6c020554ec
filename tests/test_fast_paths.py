"""The vectorised normalize and explain (unique values mapped once) equal a plain row-by-row twin.

The twins below are the stages as first written: one Python loop iteration per finding row.
"""

from collections import Counter
from typing import Mapping

import numpy as np
import pyarrow as pa
import pytest

from medfilip.benchmarks.findings import synthetic_findings
from medfilip.config import ExplainParams, ExtractParams, KnowledgeParams
from medfilip.explain import (EMPTY_REPORT, FAILED_EXTRACTION, LABEL_SCHEMA, NORMAL_LABEL_DISABLED, TEXT_SCHEMA,
                              UNLABELLED_REASONS, _normal_evidence, _StudyFindings, build_labels, check_template,
                              render_label, study_text, text_id)
from medfilip.extract.text import report_text
from medfilip.knowledge import knowledge_base
from medfilip.normal import NormalStatements, load_normal_statements
from medfilip.normalize import DROP_REASONS, DUPLICATE, NO_CATEGORY, NORM_FIELDS, OUT_OF_VOCABULARY, normalize_triplets
from medfilip.vocab import Vocabulary, load_vocabulary, normalize_text


def _dedup_key(row: dict) -> tuple:
    """Rows that say exactly the same thing about one study: only these merge."""
    return (row["study_id"], row["category_norm"], row["severity_norm"], row["location_norm"],
            bool(row.get("negated")), bool(row.get("uncertain")))


def slow_normalize_triplets(raw: pa.Table, vocabulary: Vocabulary, deduplicate: bool = True,
                       top_oov: int = 25) -> tuple[pa.Table, dict]:
    """Add canonical category/severity/location, ``kept`` and ``drop_reason`` to every raw finding.

    With ``deduplicate`` only exact duplicates merge -- same study, canonical category, severity
    and location, negation and uncertainty (FINDINGS repeated in IMPRESSION): the first is kept,
    the others are dropped as ``duplicate``. "right upper lobe nodule" and "left lower lobe
    nodule" in one report stay two findings, and "possible pneumonia" stays apart from "pneumonia".
    """
    rows = raw.to_pylist()
    oov: Counter[str] = Counter()
    unmapped_severity: Counter[str] = Counter()
    unmapped_location: Counter[str] = Counter()
    for row in rows:
        raw_category = (row.get("category") or "").strip()
        category = vocabulary.category_of(raw_category) if raw_category else None
        row["category_norm"] = category
        row["severity_norm"] = vocabulary.severity_of(row.get("severity"), category) if category else None
        row["location_norm"] = vocabulary.location_of(row.get("location"), category) if category else None
        row["group"] = vocabulary.group_of(category) if category else None
        if not raw_category:
            row["kept"], row["drop_reason"] = False, NO_CATEGORY
        elif category is None:
            row["kept"], row["drop_reason"] = False, OUT_OF_VOCABULARY
            oov[normalize_text(raw_category)] += 1
        else:
            row["kept"], row["drop_reason"] = True, None
            if row.get("severity") and row["severity_norm"] is None:
                unmapped_severity[normalize_text(row["severity"])] += 1
            if row.get("location") and row["location_norm"] is None:
                unmapped_location[normalize_text(row["location"])] += 1

    if deduplicate:
        seen: set[tuple] = set()
        for row in rows:
            if not row["kept"]:
                continue
            key = _dedup_key(row)
            if key in seen:
                row["kept"], row["drop_reason"] = False, DUPLICATE
            else:
                seen.add(key)

    schema = raw.schema
    for name, typ in NORM_FIELDS:
        if name not in schema.names:
            schema = schema.append(pa.field(name, typ))
    table = pa.Table.from_pylist(rows, schema=schema)

    reasons = Counter(r["drop_reason"] for r in rows if not r["kept"])
    kept = [r for r in rows if r["kept"]]
    summary = {
        "n_rows": len(rows),
        "n_kept": len(kept),
        "n_dropped": len(rows) - len(kept),
        "dropped_by_reason": {reason: reasons.get(reason, 0) for reason in DROP_REASONS},
        "n_studies_with_kept": len({r["study_id"] for r in kept}),
        "kept_by_category": dict(Counter(r["category_norm"] for r in kept).most_common()),
        "kept_negated": sum(bool(r.get("negated")) for r in kept),
        "kept_uncertain": sum(bool(r.get("uncertain")) for r in kept),
        "kept_with_severity": sum(r["severity_norm"] is not None for r in kept),
        "kept_with_location": sum(r["location_norm"] is not None for r in kept),
        "top_oov_terms": [{"term": t, "count": n} for t, n in oov.most_common(top_oov)],
        "top_unmapped_severity": [{"term": t, "count": n} for t, n in unmapped_severity.most_common(top_oov)],
        "top_unmapped_location": [{"term": t, "count": n} for t, n in unmapped_location.most_common(top_oov)],
    }
    return table, summary


def slow_build_labels(triplets: pa.Table, studies: pa.Table, extractions: pa.Table,
                 explanations: Mapping[str, str], params: ExplainParams,
                 extract: ExtractParams | None = None,
                 normal_statements: NormalStatements | None = None) -> tuple[pa.Table, pa.Table, dict]:
    """labels (study_id, text_id, category_norm, negated, uncertain, ...) and unique texts (text_id, text, ...).

    Studies whose extraction failed get no label (their findings are unknown, not normal). A study
    without a kept positive finding gets ``explain.normal_label`` only when its report says it is
    normal (see :func:`_normal_evidence`), read in the text the extractor saw (``extract``: the
    extract stage's params; ``normal_statements``: default ``data/knowledge/normal_statements.txt``).
    A label's ``uncertain`` is true only when every mention of its text in the study was hedged.
    """
    check_template(params.template)
    extract = extract if extract is not None else ExtractParams()
    ok = {r["study_id"] for r in extractions.select(["study_id", "status"]).to_pylist() if r["status"] == "ok"}
    texts: dict[str, tuple[str, str | None]] = {}
    labels: list[dict] = []
    index: dict[tuple[str, str], int] = {}  # (study, text_id) -> row in labels

    def add(study_id: str, text: str, category: str | None, negated: bool, uncertain: bool = False,
            severity=None, location=None) -> None:
        tid = text_id(text)
        texts.setdefault(tid, (text, category))
        i = index.get((study_id, tid))
        if i is None:
            index[(study_id, tid)] = len(labels)
            labels.append({"study_id": study_id, "text_id": tid, "category_norm": category, "negated": negated,
                           "uncertain": uncertain, "severity_norm": severity, "location_norm": location})
        else:  # "possible X" and "X" in one study: the certain mention decides
            labels[i]["uncertain"] = labels[i]["uncertain"] and uncertain

    study_rows = studies.to_pylist()
    reasons: Counter[str] = Counter()
    evidence: Counter[str] = Counter()
    if params.mode == "report":
        for s in study_rows:
            text = study_text(s)
            if s["study_id"] not in ok:
                reasons[FAILED_EXTRACTION] += 1
            elif not text:
                reasons[EMPTY_REPORT] += 1
            else:
                add(s["study_id"], text, None, False)
    else:
        normal_category = params.normal_label
        found: dict[str, _StudyFindings] = {}
        for t in triplets.to_pylist():
            if t["study_id"] not in ok:
                continue
            f = found.setdefault(t["study_id"], _StudyFindings())
            negated, uncertain = bool(t["negated"]), bool(t.get("uncertain"))
            if not t["kept"]:
                f.dropped += t["drop_reason"] != DUPLICATE
                continue
            if normal_category is not None and t["category_norm"] == normal_category:
                # The extractor reported the normal statement itself: evidence, not a finding label.
                f.stated_normal = f.stated_normal or not (negated or uncertain)
                continue
            if negated:
                f.negated_uncertain += uncertain
                f.negated += not uncertain
            else:
                f.positive = True
            if negated and not params.include_negated:
                continue
            text = render_label(t["category_norm"], t["severity_norm"], t["location_norm"], negated,
                                params, explanations)
            add(t["study_id"], text, t["category_norm"], negated, uncertain, t["severity_norm"], t["location_norm"])

        # Findings the extract stage dropped for want of a category never reached normalize.
        if "n_dropped" in extractions.column_names:
            for sid, n in zip(extractions.column("study_id").to_pylist(), extractions.column("n_dropped").to_pylist()):
                if n and sid in ok:
                    found.setdefault(sid, _StudyFindings()).dropped += n

        normal_text = None
        if normal_category is not None:
            normal_text = render_label(normal_category, None, None, False, params, explanations)
        statements = normal_statements if normal_statements is not None else load_normal_statements()
        labelled = {lab["study_id"] for lab in labels}
        for s in study_rows:
            sid = s["study_id"]
            f = found.get(sid, _StudyFindings())
            if sid not in ok:
                outcome = FAILED_EXTRACTION
            elif f.positive:
                continue  # labelled by its findings
            else:
                text, _ = report_text(s, extract)
                outcome = _normal_evidence(f, text, statements) if text else EMPTY_REPORT
            if outcome in UNLABELLED_REASONS:
                if sid not in labelled:  # negated labels (include_negated) still label a study
                    reasons[outcome] += 1
            elif normal_text is None:
                if sid not in labelled:
                    reasons[NORMAL_LABEL_DISABLED] += 1
            else:
                add(sid, normal_text, normal_category, False)
                evidence[outcome] += 1

    labels.sort(key=lambda r: (r["study_id"], r["text_id"]))
    label_table = pa.Table.from_pylist(labels, schema=LABEL_SCHEMA)
    text_table = pa.Table.from_pylist(
        [{"text_id": k, "text": v[0], "category_norm": v[1]} for k, v in sorted(texts.items())], schema=TEXT_SCHEMA
    )
    per_study = Counter(lab["study_id"] for lab in labels)
    summary = {
        "mode": params.mode,
        "include_negated": params.include_negated,
        "n_labels": len(labels),
        "n_labels_uncertain": sum(lab["uncertain"] for lab in labels),
        "n_unique_texts": len(texts),
        "n_studies": len(study_rows),
        "n_studies_labelled": len(per_study),
        "n_studies_failed_extraction": sum(s["study_id"] not in ok for s in study_rows),
        "n_studies_normal_label": sum(evidence.values()),
        "normal_label_evidence": {"normal_statement": evidence["normal_statement"],
                                  "all_negated": evidence["all_negated"]},
        "n_studies_unlabelled": len(study_rows) - len(per_study),
        "unlabelled_by_reason": {reason: reasons[reason] for reason in UNLABELLED_REASONS},
        "labels_per_study_mean": round(len(labels) / len(per_study), 3) if per_study else 0.0,
        "labels_by_category": dict(Counter(lab["category_norm"] for lab in labels).most_common()),
        "example_texts": [v[0] for _, v in sorted(texts.items())[:3]],
    }
    return label_table, text_table, summary


@pytest.fixture(scope="module")
def vocabulary():
    return load_vocabulary()


@pytest.fixture(scope="module")
def explanations(vocabulary):
    found, _ = knowledge_base(KnowledgeParams(), vocabulary)
    return {c: e.text for c, e in found.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("deduplicate", [True, False])
def test_normalize_equals_row_by_row(vocabulary, seed, deduplicate):
    raw = synthetic_findings(3000, seed, vocabulary, rows_per_study=4)["triplets_raw"]
    fast, fast_summary = normalize_triplets(raw, vocabulary, deduplicate, top_oov=5)
    slow, slow_summary = slow_normalize_triplets(raw, vocabulary, deduplicate, top_oov=5)
    assert fast.schema == slow.schema
    assert fast.to_pylist() == slow.to_pylist()
    assert list(fast_summary.items()) == list(slow_summary.items())  # same JSON, key and entry order included
    assert list(fast_summary["kept_by_category"]) == list(slow_summary["kept_by_category"])


def test_normalize_without_optional_columns_and_empty(vocabulary):
    raw = pa.table({"study_id": ["a", "a", "b"], "category": ["effusion", "effusions", None]})
    assert normalize_triplets(raw, vocabulary)[0].to_pylist() == slow_normalize_triplets(raw, vocabulary)[0].to_pylist()
    empty = raw.slice(0, 0)
    fast, fast_summary = normalize_triplets(empty, vocabulary)
    slow, slow_summary = slow_normalize_triplets(empty, vocabulary)
    assert fast.schema == slow.schema and fast.num_rows == 0 and fast_summary == slow_summary


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("params", [
    ExplainParams(),
    ExplainParams(include_negated=True),
    ExplainParams(mode="triplet", normal_label=None),
    ExplainParams(mode="category", include_negated=True),
    ExplainParams(mode="report"),
], ids=["explanation", "negated", "triplet-no-normal", "category", "report"])
def test_build_labels_equals_row_by_row(vocabulary, explanations, seed, params):
    tables = synthetic_findings(3000, seed, vocabulary, rows_per_study=4)
    triplets, _ = normalize_triplets(tables["triplets_raw"], vocabulary)
    args = (triplets, tables["studies"], tables["extractions"], explanations, params)
    fast = build_labels(*args, extract=ExtractParams())
    slow = slow_build_labels(*args, extract=ExtractParams())
    for f, s in zip(fast[:2], slow[:2]):
        assert f.schema == s.schema
        assert f.to_pylist() == s.to_pylist()
    assert list(fast[2].items()) == list(slow[2].items())
    assert list(fast[2]["labels_by_category"]) == list(slow[2]["labels_by_category"])
    assert fast[0].num_rows > 0

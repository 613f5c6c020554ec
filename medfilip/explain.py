"""The explain stage (IKI): each kept finding -> one structured label text with its explanation.

``explain.mode`` selects the paper's ablation rows: the whole report, the category
alone, the fine-grained triplet, or the triplet plus the knowledge dictionary's
explanation (MedFILIP). Each unique text gets a stable ``text_id`` (hash of the text),
so the embed stage embeds it once however many studies share it.

The normal label (``explain.normal_label``) comes from the report, never from silence: a
study without a kept positive finding gets it for an explicit normal statement
(``data/knowledge/normal_statements.txt``, or the normal category reported by the extractor)
or for findings that are all certain negations -- in both cases only when nothing was
dropped. Every study left without a label is counted by reason in ``reports/explain.json``.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

import pyarrow as pa

from medfilip.config import ExplainParams, ExtractParams
from medfilip.extract.text import report_text
from medfilip.normal import NormalStatements, load_normal_statements
from medfilip.normalize import DUPLICATE


class ExplainError(ValueError):
    """A template or dictionary that cannot render a label: names the field or category."""


LABEL_SCHEMA = pa.schema(
    [
        ("study_id", pa.string()),
        ("text_id", pa.string()),
        ("category_norm", pa.string()),
        ("negated", pa.bool_()),
        ("severity_norm", pa.string()),
        ("location_norm", pa.string()),
        # Hedged ("possible pneumonia"): the trainer applies train.uncertain (positive | negative | ignore).
        ("uncertain", pa.bool_()),
    ]
)
TEXT_SCHEMA = pa.schema([("text_id", pa.string()), ("text", pa.string()), ("category_norm", pa.string())])
TEMPLATE_FIELDS = {"severity", "location", "category", "explanation"}


def text_id(text: str) -> str:
    """Stable id of a label text: the same text gets the same id in every run and project."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_template(template: str) -> None:
    """Refuse a template with unknown or no fields before rendering anything."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    unknown = fields - TEMPLATE_FIELDS
    if unknown:
        raise ExplainError(
            f"explain.template uses unknown field(s) {sorted(unknown)}; allowed: {sorted(TEMPLATE_FIELDS)}"
        )
    if "category" not in fields:
        raise ExplainError("explain.template must contain {category}")


def _tidy(text: str) -> str:
    # Empty severity/location leave double spaces and " ," behind.
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\s+([,.;:])", r"\1", text)


def render_label(category: str, severity: str | None, location: str | None, negated: bool,
                 params: ExplainParams, explanations: Mapping[str, str]) -> str:
    """The label text of one finding in ``params.mode`` (not ``report``, which is per study)."""
    prefix = "no " if negated else ""
    if params.mode == "category":
        return f"{prefix}{category}"
    if params.mode == "triplet":
        parts = [category] if negated else [severity, location, category]
        return prefix + _tidy(" ".join(p for p in parts if p))
    if category not in explanations:
        raise ExplainError(
            f"category '{category}' has no explanation in the knowledge dictionary "
            "(add it to data/knowledge/dictionary.yaml)"
        )
    # A negated finding has no severity or location worth stating: "no pneumothorax, where ...".
    text = params.template.format(
        severity="" if negated else (severity or ""),
        location="" if negated else (location or ""),
        category=category,
        explanation=explanations[category],
    )
    return prefix + _tidy(text)


def study_text(row: Mapping) -> str:
    """The report text a study is labelled with in ``report`` mode: FINDINGS + IMPRESSION, else all."""
    parts = [row.get("findings"), row.get("impression")]
    text = " ".join(p for p in parts if p) or (row.get("report") or "")
    return _tidy(text)


# Why a study ends up with no label at all (reports/explain.json: unlabelled_by_reason).
FAILED_EXTRACTION = "failed_extraction"  # no ok extraction: its findings are unknown, not absent
EMPTY_REPORT = "empty_report"  # nothing to read in the text the extractor saw
FINDINGS_DROPPED = "findings_dropped"  # no positive finding kept, but some dropped (out of vocabulary, no category)
UNCERTAIN_NEGATION = "uncertain_negation"  # only hedged negations ("pneumonia unlikely"), no normal statement
NO_NORMAL_STATEMENT = "no_normal_statement"  # no finding and no normal statement ("Stable appearance.")
NORMAL_LABEL_DISABLED = "normal_label_disabled"  # normal by the report, but explain.normal_label is null
UNLABELLED_REASONS = (FAILED_EXTRACTION, EMPTY_REPORT, FINDINGS_DROPPED, UNCERTAIN_NEGATION, NO_NORMAL_STATEMENT,
                      NORMAL_LABEL_DISABLED)


@dataclass
class _StudyFindings:
    """What normalize kept and dropped for one study, as far as the normal label cares."""

    positive: bool = False  # a kept, non-negated finding (hedged or not): the study is not normal
    negated: int = 0  # kept certain negations
    negated_uncertain: int = 0  # kept hedged negations
    dropped: int = 0  # findings lost to out_of_vocabulary / no_category (duplicates have a kept twin)
    stated_normal: bool = False  # the extractor itself reported the normal category


def _normal_evidence(found: _StudyFindings, text: str, statements: NormalStatements) -> str:
    """Why a study without a positive finding is normal, or the reason it cannot be called normal.

    The rule: an explicit normal statement, or findings that are all certain negations -- and in
    both cases nothing dropped, since a dropped finding may be the abnormal one.
    Returns ``normal_statement``, ``all_negated`` or one of :data:`UNLABELLED_REASONS`.
    """
    if found.dropped:
        return FINDINGS_DROPPED
    if found.stated_normal or statements.find(text) is not None:
        return "normal_statement"
    if found.negated and not found.negated_uncertain:
        return "all_negated"
    return UNCERTAIN_NEGATION if found.negated_uncertain else NO_NORMAL_STATEMENT


def build_labels(triplets: pa.Table, studies: pa.Table, extractions: pa.Table,
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

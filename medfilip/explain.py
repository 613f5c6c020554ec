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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medfilip.config import ExplainParams, ExtractParams
from medfilip.errors import UserError
from medfilip.extract.text import report_text
from medfilip.normal import NormalStatements, load_normal_statements
from medfilip.normalize import DUPLICATE, bool_column, column_codes, first_seen, merge_codes, most_common


class ExplainError(UserError, ValueError):
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


def _finding_labels(triplets: pa.Table, ok_mask: np.ndarray, params: ExplainParams,
                    explanations: Mapping[str, str]) -> tuple[dict, pa.Table, dict[str, tuple[str, str | None]]]:
    """Per-study evidence for the normal label, the findings' labels and their texts, from arrays.

    Each distinct (category, severity, location, negated) is rendered once and each distinct
    (study, text) becomes one label: no Python runs per finding row.
    Returns ``found`` (per-study arrays of :class:`_StudyFindings`' fields, the last entry a study
    without findings, and their ``study_id``), the labels (first mention's columns,
    ``uncertain`` only when every mention was hedged) and text_id -> (text, category).
    """
    normal_category = params.normal_label
    n = triplets.num_rows
    rows = np.flatnonzero(ok_mask)
    study_codes, study_values = column_codes(triplets.column("study_id"))
    study_codes = study_codes[rows]
    negated = bool_column(triplets, "negated")[rows]
    uncertain = bool_column(triplets, "uncertain")[rows]
    kept = bool_column(triplets, "kept")[rows]
    reason = triplets.column("drop_reason") if "drop_reason" in triplets.column_names else pa.nulls(n, pa.string())
    not_duplicate = pc.fill_null(pc.not_equal(reason, DUPLICATE), True).to_numpy(zero_copy_only=False)[rows]
    cat_codes, cat_values = column_codes(triplets.column("category_norm"))
    cat_codes = cat_codes[rows]
    is_normal = np.zeros(len(rows), dtype=bool)
    if normal_category is not None and normal_category in cat_values:
        is_normal = kept & (cat_codes == cat_values.index(normal_category))
    finding = kept & ~is_normal

    n_studies = len(study_values)

    def per_study(mask: np.ndarray) -> np.ndarray:  # one count per study, and a trailing zero for "none"
        return np.append(np.bincount(study_codes[mask], minlength=n_studies), 0)

    found = {
        "study_id": pa.array(study_values, pa.string()),
        "positive": per_study(finding & ~negated) > 0,
        "negated": per_study(finding & negated & ~uncertain),
        "negated_uncertain": per_study(finding & negated & uncertain),
        "dropped": per_study(~kept & not_duplicate),
        "stated_normal": per_study(is_normal & ~(negated | uncertain)) > 0,
    }

    labelled = finding & (~negated | params.include_negated)
    sel = np.flatnonzero(labelled)
    sev_codes, sev_values = column_codes(triplets.column("severity_norm"))
    loc_codes, loc_values = column_codes(triplets.column("location_norm"))
    sev_codes, loc_codes = sev_codes[rows][sel], loc_codes[rows][sel]
    combo = merge_codes([cat_codes[sel], sev_codes, loc_codes, negated[sel].astype(np.int64)])
    inverse, first = first_seen(combo)
    texts: dict[str, tuple[str, str | None]] = {}
    combo_text = np.empty(len(first), dtype=np.int64)
    text_ids: list[str] = []
    text_index: dict[str, int] = {}
    for c in range(len(first)):  # first-mention order: the same error as row by row
        f = first[c]

        def value(values, codes):
            return values[codes[f]] if codes[f] >= 0 else None

        category = cat_values[cat_codes[sel[f]]]
        text = render_label(category, value(sev_values, sev_codes), value(loc_values, loc_codes),
                            bool(negated[sel[f]]), params, explanations)
        tid = text_id(text)
        texts.setdefault(tid, (text, category))
        combo_text[c] = text_index.setdefault(tid, len(text_ids))
        if combo_text[c] == len(text_ids):
            text_ids.append(tid)
    label_text = combo_text[inverse]
    key = merge_codes([study_codes[sel], label_text])
    label_of, first_label = first_seen(key)
    certain = np.bincount(label_of[~uncertain[sel]], minlength=len(first_label)) > 0
    picked = rows[sel[first_label]]
    labels = pa.table({
        "study_id": triplets.column("study_id").take(picked).cast(pa.string()),
        "text_id": pa.array([text_ids[t] for t in label_text[first_label]], pa.string()),
        "category_norm": triplets.column("category_norm").take(picked).cast(pa.string()),
        "negated": pa.array(negated[sel[first_label]], pa.bool_()),
        "severity_norm": triplets.column("severity_norm").take(picked).cast(pa.string()),
        "location_norm": triplets.column("location_norm").take(picked).cast(pa.string()),
        "uncertain": pa.array(~certain, pa.bool_()),
    })
    return found, labels, texts


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
    status = extractions.select(["study_id", "status"]).filter(pc.equal(extractions.column("status"), "ok"))
    ok_ids = pc.unique(status.column("study_id"))
    ok = set(ok_ids.to_pylist())
    n_failed = int((~pc.is_in(studies.column("study_id"), value_set=ok_ids).to_numpy(zero_copy_only=False)).sum())
    reasons: Counter[str] = Counter()
    evidence: Counter[str] = Counter()
    texts: dict[str, tuple[str, str | None]] = {}
    extra: list[dict] = []  # labels added study by study (report mode, the normal label)
    if params.mode == "report":
        label_table = LABEL_SCHEMA.empty_table()
        for s in studies.to_pylist():
            text = study_text(s)
            if s["study_id"] not in ok:
                reasons[FAILED_EXTRACTION] += 1
            elif not text:
                reasons[EMPTY_REPORT] += 1
            else:
                extra.append({"study_id": s["study_id"], "text": text, "category_norm": None})
    else:
        normal_category = params.normal_label
        ok_mask = pc.is_in(triplets.column("study_id"), value_set=ok_ids).to_numpy(zero_copy_only=False)
        found, label_table, texts = _finding_labels(triplets, ok_mask, params, explanations)

        def study_codes(ids) -> np.ndarray:  # row of each study in found's arrays; -1 (the last) for none
            return pc.index_in(ids, value_set=found["study_id"]).fill_null(-1).to_numpy(zero_copy_only=False)

        # Findings the extract stage dropped for want of a category never reached normalize.
        dropped_elsewhere: Counter[str] = Counter()  # ok studies without a finding row
        if "n_dropped" in extractions.column_names:
            n_dropped = extractions.column("n_dropped").fill_null(0).to_numpy(zero_copy_only=False)
            is_ok = pc.is_in(extractions.column("study_id"), value_set=ok_ids).to_numpy(zero_copy_only=False)
            rows = np.flatnonzero((n_dropped > 0) & is_ok)
            codes = study_codes(extractions.column("study_id").take(rows))
            np.add.at(found["dropped"], codes[codes >= 0], n_dropped[rows][codes >= 0])
            for i in rows[codes < 0]:
                dropped_elsewhere[extractions.column("study_id")[int(i)].as_py()] += int(n_dropped[i])

        normal_text = None
        if normal_category is not None:
            normal_text = render_label(normal_category, None, None, False, params, explanations)
        statements = normal_statements if normal_statements is not None else load_normal_statements()
        labelled = set(pc.unique(label_table.column("study_id")).to_pylist())
        # Only studies without a positive finding read their report (a study row's text is large).
        codes = study_codes(studies.column("study_id"))
        study_ok = pc.is_in(studies.column("study_id"), value_set=ok_ids).to_numpy(zero_copy_only=False)
        unlabelled = np.flatnonzero(~(study_ok & found["positive"][codes]))
        for i, s in zip(unlabelled, studies.take(pa.array(unlabelled, pa.int64())).to_pylist()):
            sid, c = s["study_id"], codes[i]
            f = _StudyFindings(bool(found["positive"][c]), int(found["negated"][c]),
                               int(found["negated_uncertain"][c]),
                               int(found["dropped"][c]) + dropped_elsewhere[sid], bool(found["stated_normal"][c]))
            if sid not in ok:
                outcome = FAILED_EXTRACTION
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
                extra.append({"study_id": sid, "text": normal_text, "category_norm": normal_category})
                evidence[outcome] += 1

    if extra:
        seen = set()
        if params.mode != "report" and text_id(extra[0]["text"]) in texts:  # a finding rendered the same text
            tid = text_id(extra[0]["text"])
            clash = pc.equal(label_table.column("text_id"), tid).to_numpy(zero_copy_only=False)
            normal = pc.is_in(label_table.column("study_id"), value_set=pa.array([e["study_id"] for e in extra]))
            clash &= normal.to_numpy(zero_copy_only=False)
            seen = {(sid, tid) for sid in np.asarray(label_table.column("study_id").to_pylist(), dtype=object)[clash]}
            # the certain (normal) mention decides, as in a row-by-row add
            uncertain = label_table.column("uncertain").to_numpy(zero_copy_only=False) & ~clash
            label_table = label_table.set_column(6, LABEL_SCHEMA.field(6), pa.array(uncertain, pa.bool_()))
        rows = []
        for e in extra:
            tid = text_id(e["text"])
            texts.setdefault(tid, (e["text"], e["category_norm"]))
            if (e["study_id"], tid) in seen:
                continue
            seen.add((e["study_id"], tid))
            rows.append({"study_id": e["study_id"], "text_id": tid, "category_norm": e["category_norm"],
                         "negated": False, "uncertain": False, "severity_norm": None, "location_norm": None})
        label_table = pa.concat_tables([label_table.cast(LABEL_SCHEMA),
                                        pa.Table.from_pylist(rows, schema=LABEL_SCHEMA)])
    label_table = label_table.cast(LABEL_SCHEMA).sort_by([("study_id", "ascending"), ("text_id", "ascending")])
    label_table = label_table.combine_chunks()
    text_table = pa.Table.from_pylist(
        [{"text_id": k, "text": v[0], "category_norm": v[1]} for k, v in sorted(texts.items())], schema=TEXT_SCHEMA
    )
    n_labels = label_table.num_rows
    n_labelled = len(pc.unique(label_table.column("study_id")))
    cat_codes, cat_values = column_codes(label_table.column("category_norm"))
    cat_codes = np.where(cat_codes < 0, len(cat_values), cat_codes)
    summary = {
        "mode": params.mode,
        "include_negated": params.include_negated,
        "n_labels": n_labels,
        "n_labels_uncertain": int(pc.sum(label_table.column("uncertain").cast(pa.int64())).as_py() or 0),
        "n_unique_texts": len(texts),
        "n_studies": studies.num_rows,
        "n_studies_labelled": n_labelled,
        "n_studies_failed_extraction": n_failed,
        "n_studies_normal_label": sum(evidence.values()),
        "normal_label_evidence": {"normal_statement": evidence["normal_statement"],
                                  "all_negated": evidence["all_negated"]},
        "n_studies_unlabelled": studies.num_rows - n_labelled,
        "unlabelled_by_reason": {reason: reasons[reason] for reason in UNLABELLED_REASONS},
        "labels_per_study_mean": round(n_labels / n_labelled, 3) if n_labelled else 0.0,
        "labels_by_category": dict(most_common(cat_codes, cat_values + [None])),
        "example_texts": [v[0] for _, v in sorted(texts.items())[:3]],
    }
    return label_table, text_table, summary

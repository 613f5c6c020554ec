"""The explain stage (IKI): each kept finding -> one structured label text with its explanation.

``explain.mode`` selects the paper's ablation rows: the whole report, the category
alone, the fine-grained triplet, or the triplet plus the knowledge dictionary's
explanation (MedFILIP). Each unique text gets a stable ``text_id`` (hash of the text),
so the embed stage embeds it once however many studies share it.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections import Counter
from typing import Mapping

import pyarrow as pa

from medfilip.config import ExplainParams


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


def build_labels(triplets: pa.Table, studies: pa.Table, extractions: pa.Table,
                 explanations: Mapping[str, str], params: ExplainParams) -> tuple[pa.Table, pa.Table, dict]:
    """labels (study_id, text_id, category_norm, negated, ...) and unique texts (text_id, text, category_norm).

    Studies whose extraction failed get no label (their findings are unknown, not normal);
    with ``explain.normal_label`` set, studies with no kept finding get that label.
    """
    check_template(params.template)
    failed = {r["study_id"] for r in extractions.select(["study_id", "status"]).to_pylist() if r["status"] != "ok"}
    texts: dict[str, tuple[str, str | None]] = {}
    labels: list[dict] = []
    seen: set[tuple[str, str]] = set()

    def add(study_id: str, text: str, category: str | None, negated: bool, severity=None, location=None) -> None:
        tid = text_id(text)
        texts.setdefault(tid, (text, category))
        if (study_id, tid) not in seen:
            seen.add((study_id, tid))
            labels.append({"study_id": study_id, "text_id": tid, "category_norm": category,
                           "negated": negated, "severity_norm": severity, "location_norm": location})

    study_rows = studies.to_pylist()
    if params.mode == "report":
        for s in study_rows:
            text = study_text(s)
            if s["study_id"] not in failed and text:
                add(s["study_id"], text, None, False)
    else:
        for t in triplets.to_pylist():
            if not t["kept"] or t["study_id"] in failed:
                continue
            if t["negated"] and not params.include_negated:
                continue
            text = render_label(t["category_norm"], t["severity_norm"], t["location_norm"], bool(t["negated"]),
                                params, explanations)
            add(t["study_id"], text, t["category_norm"], bool(t["negated"]), t["severity_norm"], t["location_norm"])

    positive = {lab["study_id"] for lab in labels if not lab["negated"]}
    n_normal = 0
    if params.normal_label and params.mode != "report":
        normal_category = params.normal_label
        normal_text = render_label(normal_category, None, None, False, params, explanations)
        for s in study_rows:
            if s["study_id"] not in failed and s["study_id"] not in positive:
                add(s["study_id"], normal_text, normal_category, False)
                n_normal += 1

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
        "n_unique_texts": len(texts),
        "n_studies": len(study_rows),
        "n_studies_labelled": len(per_study),
        "n_studies_failed_extraction": len(failed),
        "n_studies_normal_label": n_normal,
        "labels_per_study_mean": round(len(labels) / len(per_study), 3) if per_study else 0.0,
        "labels_by_category": dict(Counter(lab["category_norm"] for lab in labels).most_common()),
        "example_texts": [v[0] for _, v in sorted(texts.items())[:3]],
    }
    return label_table, text_table, summary

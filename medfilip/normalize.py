"""The normalize stage: raw extracted findings -> the controlled vocabulary.

Every raw row stays in the output with its canonical values, ``kept`` and a
``drop_reason``; nothing is dropped silently.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

from medfilip.vocab import Vocabulary, normalize_text

NO_CATEGORY = "no_category"
OUT_OF_VOCABULARY = "out_of_vocabulary"
DUPLICATE = "duplicate"
DROP_REASONS = (NO_CATEGORY, OUT_OF_VOCABULARY, DUPLICATE)

NORM_FIELDS = [
    ("category_norm", pa.string()),
    ("severity_norm", pa.string()),
    ("location_norm", pa.string()),
    ("group", pa.string()),
    ("kept", pa.bool_()),
    ("drop_reason", pa.string()),
]


def _dedup_key(row: dict) -> tuple:
    """Rows that say exactly the same thing about one study: only these merge."""
    return (row["study_id"], row["category_norm"], row["severity_norm"], row["location_norm"],
            bool(row.get("negated")), bool(row.get("uncertain")))


def normalize_triplets(raw: pa.Table, vocabulary: Vocabulary, deduplicate: bool = True,
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

"""The normalize stage: raw extracted findings -> the controlled vocabulary.

Every raw row stays in the output with its canonical values, ``kept`` and a
``drop_reason``; nothing is dropped silently.
"""

from __future__ import annotations

import numpy as np
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


def column_codes(column) -> tuple[np.ndarray, list]:
    """Dictionary codes of an Arrow column (-1 for null) and its unique values: map these, not rows."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], type=column.type)
    encoded = column.dictionary_encode()
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, encoded.dictionary.to_pylist()


def _column(table: pa.Table, name: str, n: int):
    """A column, or all nulls when the table lacks it (``row.get`` on a missing key)."""
    return table.column(name) if name in table.column_names else pa.nulls(n, pa.string())


def bool_column(table: pa.Table, name: str) -> np.ndarray:
    """``bool(row.get(name))`` for every row, as a numpy bool array (null -> False)."""
    if name not in table.column_names:
        return np.zeros(table.num_rows, dtype=bool)
    return table.column(name).cast(pa.bool_()).fill_null(False).to_numpy(zero_copy_only=False).astype(bool)


def first_seen(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes of equal keys numbered in first-seen order, and the row where each code first occurs."""
    codes = pa.array(key).dictionary_encode().indices.to_numpy(zero_copy_only=False).astype(np.int64)
    earlier = np.maximum.accumulate(np.concatenate([[-1], codes[:-1]])) if len(codes) else codes
    return codes, np.flatnonzero(codes > earlier)  # a new code is one more than any seen before


def _pair_codes(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique (a, b) code pairs in first-occurrence order, and each row's index into them."""
    codes, first = first_seen((a + 1) * (int(b.max(initial=-1)) + 2) + (b + 1))
    return first, codes


def _strings(values: list, index: np.ndarray) -> pa.Array:
    """``values[index]`` as an Arrow string array; a negative index is null."""
    if len(index) == 0:
        return pa.array([], pa.string())
    return pa.array(values, pa.string()).take(pa.array(index, mask=index < 0))


def most_common(keys: np.ndarray, labels: list, n: int | None = None) -> list[tuple]:
    """``Counter(labels[k] for k in keys).most_common(n)`` over codes: ties in first-seen order."""
    if len(keys) == 0:
        return []
    counts = np.bincount(keys, minlength=len(labels))
    first = np.full(len(labels), len(keys), dtype=np.int64)
    np.minimum.at(first, keys, np.arange(len(keys)))
    seen = np.flatnonzero(counts)
    order = seen[np.lexsort((first[seen], -counts[seen]))]
    return [(labels[i], int(counts[i])) for i in order[:n]]


def merge_codes(codes: list[np.ndarray]) -> np.ndarray:
    """One int64 key per row from several code columns (-1 = null allowed); equal rows, equal keys."""
    key = np.zeros(len(codes[0]), dtype=np.int64)
    for c in codes:
        base = int(c.max(initial=-1)) + 2
        if int(key.max(initial=0)) * base + base >= 2**62:  # too wide for one int64: re-rank first
            key = np.unique(key, return_inverse=True)[1].reshape(-1).astype(np.int64)
        key = key * base + (c + 1)
    return key


def normalize_triplets(raw: pa.Table, vocabulary: Vocabulary, deduplicate: bool = True,
                       top_oov: int = 25) -> tuple[pa.Table, dict]:
    """Add canonical category/severity/location, ``kept`` and ``drop_reason`` to every raw finding.

    With ``deduplicate`` only exact duplicates merge -- same study, canonical category, severity
    and location, negation and uncertainty (FINDINGS repeated in IMPRESSION): the first is kept,
    the others are dropped as ``duplicate``. "right upper lobe nodule" and "left lower lobe
    nodule" in one report stay two findings, and "possible pneumonia" stays apart from "pneumonia".

    The vocabulary is asked once per unique raw value (or value-category pair), never per row:
    a MIMIC-sized table has ~700k rows but a few thousand distinct strings.
    """
    n = raw.num_rows
    # category: raw string -> canonical, once per unique string
    cat_codes, cat_values = column_codes(_column(raw, "category", n))
    stripped = [(v or "").strip() for v in cat_values]
    canonical = [vocabulary.category_of(s) if s else None for s in stripped]
    categories = list(dict.fromkeys(c for c in canonical if c is not None))
    cat_index = {c: i for i, c in enumerate(categories)}
    unique_norm = np.array([cat_index[c] if c is not None else -1 for c in canonical] + [-1], dtype=np.int64)
    unique_empty = np.array([not s for s in stripped] + [True], dtype=bool)
    norm = unique_norm[cat_codes]  # code -1 (null) picks the trailing sentinel
    empty = unique_empty[cat_codes]
    has_cat = norm >= 0
    groups = [vocabulary.group_of(c) for c in categories]

    def per_category(field: str, lookup) -> tuple[np.ndarray, list, np.ndarray, list]:
        # (raw value, canonical category) pairs -> canonical value, once per pair
        codes, values = column_codes(_column(raw, field, n))
        rows = np.flatnonzero(has_cat)
        out = np.full(n, -1, dtype=np.int64)
        results: list = []
        if len(rows):
            first, which = _pair_codes(codes[rows], norm[rows])
            mapped = [lookup(values[codes[rows[f]]] if codes[rows[f]] >= 0 else None, categories[norm[rows[f]]])
                      for f in first]
            results = list(dict.fromkeys(m for m in mapped if m is not None))
            result_index = {m: i for i, m in enumerate(results)}
            out[rows] = np.array([result_index[m] if m is not None else -1 for m in mapped], dtype=np.int64)[which]
        return out, results, codes, values

    sev, sev_values, sev_raw, sev_raw_values = per_category("severity", vocabulary.severity_of)
    loc, loc_values, loc_raw, loc_raw_values = per_category("location", vocabulary.location_of)

    kept = has_cat.copy()
    reason = np.where(empty, 0, np.where(has_cat, -1, 1))  # index into DROP_REASONS, -1 = kept
    negated, uncertain = bool_column(raw, "negated"), bool_column(raw, "uncertain")
    study_codes, _ = column_codes(_column(raw, "study_id", n))
    if deduplicate and kept.any():
        rows = np.flatnonzero(kept)
        key = merge_codes([study_codes[rows], norm[rows], sev[rows], loc[rows],
                            negated[rows].astype(np.int64), uncertain[rows].astype(np.int64)])
        _, first = first_seen(key)
        duplicate = np.ones(len(rows), dtype=bool)
        duplicate[first] = False
        kept[rows[duplicate]] = False
        reason[rows[duplicate]] = 2

    added = {
        "category_norm": _strings(categories, norm),
        "severity_norm": _strings(sev_values, sev),
        "location_norm": _strings(loc_values, loc),
        "group": _strings(groups, norm),
        "kept": pa.array(kept, pa.bool_()),
        "drop_reason": _strings(list(DROP_REASONS), reason),
    }
    table = raw
    for name, typ in NORM_FIELDS:
        if name in table.column_names:
            i = table.column_names.index(name)
            table = table.set_column(i, table.schema.field(i), added[name].cast(table.schema.field(i).type))
        else:
            table = table.append_column(pa.field(name, typ), added[name])

    def unmapped(raw_codes: np.ndarray, raw_values: list, mapped: np.ndarray) -> list[tuple]:
        # kept by category, raw text present but no canonical value
        truthy = np.array([bool(v) for v in raw_values] + [False], dtype=bool)
        rows = np.flatnonzero(has_cat & truthy[raw_codes] & (mapped < 0))
        terms = [normalize_text(v) if v else "" for v in raw_values]
        return most_common(*_term_codes(raw_codes[rows], terms), top_oov)

    oov_rows = np.flatnonzero(~empty & ~has_cat)
    oov_terms = [normalize_text(s) for s in stripped]
    kept_rows = np.flatnonzero(kept)
    reason_counts = np.bincount(reason[reason >= 0], minlength=len(DROP_REASONS))
    n_kept = int(kept.sum())
    summary = {
        "n_rows": n,
        "n_kept": n_kept,
        "n_dropped": n - n_kept,
        "dropped_by_reason": {r: int(reason_counts[i]) for i, r in enumerate(DROP_REASONS)},
        "n_studies_with_kept": int(len(np.unique(study_codes[kept_rows]))),
        "kept_by_category": dict(most_common(norm[kept_rows], categories)),
        "kept_negated": int(negated[kept_rows].sum()),
        "kept_uncertain": int(uncertain[kept_rows].sum()),
        "kept_with_severity": int((sev[kept_rows] >= 0).sum()),
        "kept_with_location": int((loc[kept_rows] >= 0).sum()),
        "top_oov_terms": [{"term": t, "count": c}
                          for t, c in most_common(*_term_codes(cat_codes[oov_rows], oov_terms), top_oov)],
        "top_unmapped_severity": [{"term": t, "count": c} for t, c in unmapped(sev_raw, sev_raw_values, sev)],
        "top_unmapped_location": [{"term": t, "count": c} for t, c in unmapped(loc_raw, loc_raw_values, loc)],
    }
    return table, summary


def _term_codes(value_codes: np.ndarray, terms: list[str]) -> tuple[np.ndarray, list[str]]:
    """Rows' raw-value codes -> codes of their normalised terms (several raw spellings, one term)."""
    term_list = list(dict.fromkeys(terms))
    term_index = {t: i for i, t in enumerate(term_list)}
    lookup = np.array([term_index[t] for t in terms] + [0], dtype=np.int64)
    return lookup[value_codes], term_list

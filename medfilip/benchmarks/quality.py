"""How well an extractor reads reports, measured against independent labels.

Two references:

* **Open-i** -- 3,955 real reports whose MeSH tags were assigned by human indexers
  (``Opacity/lung/base/left/mild``); ``data/knowledge/mesh_map.yaml`` maps them onto the
  vocabulary's categories, the qualifiers onto side/zone and severity. The rules were
  written while reading these reports, so :func:`split_half` cuts them by a hash of the
  study id into a ``tuning`` half (look at these) and a ``held_out`` half (only score them).
* **the phantom** -- the synthetic benchmark's truth table (what each image shows).

:func:`score_extraction` compares positive (study, category) pairs -- or (study, group)
pairs for the coarse umbrella groups -- and, on the pairs both sides agree on, the
location and severity, twice: ``in_scope`` counts only what the reference can express,
``strict`` counts every other positive prediction as a false positive.
:func:`keyword_baseline` is the floor every extractor must clear: a vocabulary keyword
scan with sentence-level negation.

``dvc repro score`` writes every number to ``reports/quality.json``;
``medfilip score --openi --phantom data/raw/phantom --provider ...`` prints them for another extractor.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

# The mapping ingest uses for Open-i's reference labels (one copy; re-exported for the tests).
from medfilip.data.mesh import DEFAULT_MESH_MAP, NO_FINDING, MeshMapError, load_mesh_map, map_mesh_term  # noqa: F401
from medfilip.extract.schema import Finding
from medfilip.vocab import SIDES, Vocabulary, load_vocabulary, normalize_text

HALVES = ("tuning", "held_out")
SPLIT_RULE = "lowest bit of SHA-256(UTF-8 study_id): 0 -> tuning, 1 -> held_out"

TRUTH_SCHEMA = pa.schema([
    ("study_id", pa.string()), ("category", pa.string()), ("group", pa.string()),
    ("severity", pa.string()), ("location", pa.string()), ("mesh", pa.string()),
])
PRED_SCHEMA = pa.schema([
    ("study_id", pa.string()), ("category", pa.string()), ("severity", pa.string()),
    ("location", pa.string()), ("negated", pa.bool_()), ("uncertain", pa.bool_()),
    ("evidence", pa.string()),
])


def openi_truth(reports: Sequence[Any], mesh_map_path: str | Path = DEFAULT_MESH_MAP,
                vocabulary: Vocabulary | None = None) -> pa.Table:
    """Positive findings of every usable Open-i study, from its human-assigned MeSH tags.

    A study counts when at least one tag maps to a category or says ``normal``; a normal
    study gets a single ``no finding`` row (so it is scored, with no positives). Tags with
    no mapping are counted in the table's metadata (``unmapped``), never silently dropped.
    Indexed studies none of whose tags maps (all unmapped or ignored) get no row; the metadata
    lists them (:func:`unmapped_studies`) for the strict score. ``No Indexing`` studies have no
    reference at all and are only counted (``n_not_indexed``).
    """
    vocabulary = vocabulary or load_vocabulary()
    mesh_map = load_mesh_map(mesh_map_path, vocabulary)
    rows: list[dict[str, Any]] = []
    unmapped: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    no_mapped_tag: list[str] = []
    not_indexed = 0
    for report in reports:
        mapped = [(term, map_mesh_term(term, mesh_map, vocabulary)) for term in report.mesh_major]
        for term, m in mapped:
            counts[m.kind] += 1
            if m.kind == "unmapped":
                unmapped[term] += 1
        findings = [(t, m) for t, m in mapped if m.kind == "finding"]
        if findings:
            for term, m in findings:
                rows.append({"study_id": report.uid, "category": m.category,
                             "group": vocabulary.group_of(m.category), "severity": m.severity,
                             "location": m.location, "mesh": term})
        elif any(m.kind == "normal" for _, m in mapped):
            rows.append({"study_id": report.uid, "category": NO_FINDING, "group": vocabulary.group_of(NO_FINDING),
                         "severity": None, "location": None, "mesh": "normal"})
        elif all(m.kind == "unusable" for _, m in mapped):
            not_indexed += 1
        else:
            no_mapped_tag.append(report.uid)
    table = pa.Table.from_pylist(rows, schema=TRUTH_SCHEMA)
    meta = {
        "unmapped": json.dumps(dict(unmapped.most_common())),
        "term_counts": json.dumps(dict(counts)),
        "n_reports": str(len(reports)),
        "labels": json.dumps(sorted(mesh_map.categories)),
        "unmapped_studies": json.dumps(no_mapped_tag),
        "n_not_indexed": str(not_indexed),
    }
    return table.replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()})


def unmapped_terms(truth: pa.Table) -> dict[str, int]:
    """The MeSH tags :func:`openi_truth` could not map, with their counts."""
    meta = truth.schema.metadata or {}
    return json.loads(meta.get(b"unmapped", b"{}"))


def unmapped_studies(truth: pa.Table) -> list[str]:
    """Indexed studies :func:`openi_truth` left without a row because none of their tags maps."""
    meta = truth.schema.metadata or {}
    return json.loads(meta.get(b"unmapped_studies", b"[]"))


def split_half(study_id: str) -> str:
    """``tuning`` or ``held_out``: the lowest bit of the SHA-256 of the UTF-8 study id (0: tuning).

    A function of the id alone, so every machine, Python version and subset of the data
    puts a study in the same half (Python's ``hash`` is salted per process; this is not).
    """
    return HALVES[hashlib.sha256(study_id.encode("utf-8")).digest()[-1] & 1]


def truth_labels(truth: pa.Table) -> set[str]:
    """The label space :func:`openi_truth` recorded: every category a MeSH tag can become."""
    meta = truth.schema.metadata or {}
    if b"labels" not in meta:
        raise ValueError("this truth table records no label space (it was not made by openi_truth)")
    return set(json.loads(meta[b"labels"]))


def openi_studies(reports: Sequence[Any]) -> pa.Table:
    """``study_id``, ``report`` (FINDINGS + IMPRESSION with headings): the text any extractor reads."""
    return pa.table({"study_id": [r.uid for r in reports], "report": [r.text for r in reports]},
                    schema=pa.schema([("study_id", pa.string()), ("report", pa.string())]))


def phantom_studies(root: str | Path, extract_params: Any = None) -> tuple[pa.Table, pa.Table]:
    """(studies, truth) of a phantom dataset folder.

    Each report is reduced exactly as the extract stage does it with ``extract_params``
    (default: ``extract.text: sections``), so scoring re-uses the answers ``dvc repro extract``
    cached and pays for nothing twice.
    """
    from medfilip.config import ExtractParams
    from medfilip.data.sections import findings_and_impression
    from medfilip.extract.text import report_text

    root = Path(root)
    studies = pq.read_table(root / "studies.parquet", columns=["study_id", "report"]).to_pylist()
    params = extract_params if extract_params is not None else ExtractParams(text="sections")
    texts = []
    for s in studies:
        findings, impression = findings_and_impression(s["report"])
        texts.append(report_text({"report": s["report"], "findings": findings, "impression": impression}, params)[0])
    table = pa.table({"study_id": [s["study_id"] for s in studies], "report": texts})
    truth = pq.read_table(root / "truth.parquet", columns=["study_id", "category", "severity", "location"])
    return table, truth


def phantom_labels() -> frozenset[str]:
    """The phantom benchmark's categories: the label space of its truth table."""
    from medfilip.data.phantom_findings import CATEGORIES

    return frozenset(CATEGORIES)


# --------------------------------------------------------------------------- running extractors


def extract_table(extract: Callable[[str], list[Finding]], studies: pa.Table) -> pa.Table:
    """Run a synchronous extractor over ``studies`` (study_id, report) into a prediction table."""
    rows = []
    for sid, report in zip(studies.column("study_id").to_pylist(), studies.column("report").to_pylist()):
        for f in extract(report or ""):
            rows.append({"study_id": sid, "category": f.category, "severity": f.severity,
                         "location": f.location, "negated": f.negated, "uncertain": f.uncertain,
                         "evidence": f.evidence})
    return pa.Table.from_pylist(rows, schema=PRED_SCHEMA)


_BASELINE_NEGATION = re.compile(r"\b(?:no|not|without|negative for|free of)\b")


def keyword_baseline(report: str, vocabulary: Vocabulary | None = None) -> list[Finding]:
    """The floor: vocabulary keywords per sentence, negated when a negation word precedes them."""
    vocabulary = vocabulary or load_vocabulary()
    table, longest = vocabulary.mention_phrases, 6
    found: dict[str, Finding] = {}
    for sentence in re.split(r"[.!?\n]+", report or ""):
        words = normalize_text(sentence).split()
        i = 0
        while i < len(words):
            n = next((n for n in range(min(longest, len(words) - i), 0, -1)
                      if " ".join(words[i:i + n]) in table), 0)
            if n == 0:
                i += 1
                continue
            category = table[" ".join(words[i:i + n])]
            negated = bool(_BASELINE_NEGATION.search(" ".join(words[:i])))
            if category not in found or (found[category].negated and not negated):
                found[category] = Finding(category, vocabulary.severity_of(sentence, category),
                                          vocabulary.location_of(sentence, category), negated, False,
                                          sentence.strip())
            i += n
    return list(found.values())


# --------------------------------------------------------------------------- scoring


def _prf(tp: int, fp: int, fn: int) -> dict[str, float | int]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def _side(location: str | None) -> str | None:
    if not location:
        return None
    first = location.split()[0]
    return first if first in SIDES else None


def score_extraction(pred: pa.Table, truth: pa.Table, vocabulary: Vocabulary,
                     level: Literal["category", "group"] = "category", *,
                     studies: Iterable[str] | None = None, labels: Iterable[str] | None = None,
                     unmapped: Iterable[str] = ()) -> dict[str, Any]:
    """Micro/macro P/R/F1 of positive (study, label) pairs, and location/severity agreement.

    ``pred``: study_id, category, severity, location, negated, uncertain (raw extractor output;
    categories go through ``vocabulary.category_of``). ``truth``: study_id, category, severity,
    location (positive findings; a ``no finding`` row only marks a study as scored).
    A prediction is positive unless negated; uncertain ones count (``uncertain_excluded``
    gives the variant without them). ``studies``: the scored studies (default: those in
    ``truth``). ``labels``: the categories the reference can express (default: the whole
    vocabulary); at the group level, their groups. Macro F1 averages the labels with truth
    support. Agreement is measured on true-positive pairs where the truth states a
    location/severity: exact canonical string, and side alone.

    ``micro`` is the in-scope score: predictions outside ``labels`` are only counted
    (``pred_out_of_scope``, rows). ``strict`` counts every positive (study, label) pair the
    truth lacks as a false positive: labels outside ``labels`` (``fp_out_of_scope``, by label in
    ``out_of_scope_labels``), categories the vocabulary cannot read, and every prediction in
    the ``unmapped`` studies (indexed, but no tag maps: left out of the in-scope score, scored
    here as having no positives; ``fp_unmapped_studies``). With the truth inside ``labels``,
    strict has the in-scope TP and FN and ``fp = micro.fp + fp_out_of_scope + fp_unmapped_studies``.
    """
    if level not in ("category", "group"):
        raise ValueError(f"level must be 'category' or 'group', got {level!r}")
    study_set = set(studies) if studies is not None else set(truth.column("study_id").to_pylist())
    strict_set = study_set | set(unmapped)
    categories = set(labels) if labels is not None else set(vocabulary.categories)
    categories.discard(NO_FINDING)

    def label_of(category: str) -> str:
        return category if level == "category" else vocabulary.group_of(category)

    label_space = {label_of(c) for c in categories}

    truth_loc: dict[tuple[str, str], set] = {}
    truth_sev: dict[tuple[str, str], set] = {}
    strict_truth: set[tuple[str, str]] = set()
    for row in truth.select(["study_id", "category", "severity", "location"]).to_pylist():
        category = vocabulary.category_of(row["category"]) if row["category"] else None
        if row["study_id"] not in strict_set or category is None or category == NO_FINDING:
            continue
        strict_truth.add((row["study_id"], label_of(category)))
        key = (row["study_id"], label_of(category))
        if row["study_id"] not in study_set or key[1] not in label_space:
            continue
        truth_loc.setdefault(key, set())
        truth_sev.setdefault(key, set())
        if row.get("location"):
            truth_loc[key].add(vocabulary.location_of(row["location"], category))
        if row.get("severity"):
            truth_sev[key].add(vocabulary.severity_of(row["severity"], category))

    pred_all: dict[tuple[str, str], dict[str, set]] = {}
    pred_certain: set[tuple[str, str]] = set()
    strict_pred: set[tuple[str, str]] = set()
    unknown: Counter[str] = Counter()
    out_of_scope = 0
    columns = set(pred.column_names)
    for row in pred.to_pylist():
        if row["study_id"] not in strict_set or row.get("negated"):
            continue
        category = vocabulary.category_of(row.get("category"))
        if category is None:
            strict_pred.add((row["study_id"], f"unknown: {row.get('category')}"))
            if row["study_id"] in study_set:
                unknown[str(row.get("category"))] += 1
            continue
        if category == NO_FINDING:
            continue
        key = (row["study_id"], label_of(category))
        strict_pred.add(key)
        if row["study_id"] not in study_set:
            continue
        if key[1] not in label_space:
            out_of_scope += 1
            continue
        entry = pred_all.setdefault(key, {"location": set(), "severity": set()})
        if "location" in columns and row.get("location"):
            entry["location"].add(vocabulary.location_of(row["location"], category))
        if "severity" in columns and row.get("severity"):
            entry["severity"].add(vocabulary.severity_of(row["severity"], category))
        if not row.get("uncertain"):
            pred_certain.add(key)

    truth_pairs = set(truth_loc)
    pred_pairs = set(pred_all)
    tp_pairs = truth_pairs & pred_pairs
    micro = _prf(len(tp_pairs), len(pred_pairs - truth_pairs), len(truth_pairs - pred_pairs))
    certain = _prf(len(truth_pairs & pred_certain), len(pred_certain - truth_pairs), len(truth_pairs - pred_certain))
    strict_fp = strict_pred - strict_truth
    out_of_scope_fp = Counter(label for _, label in strict_fp if label not in label_space)
    strict = {
        **_prf(len(strict_pred & strict_truth), len(strict_fp), len(strict_truth - strict_pred)),
        "n_studies": len(strict_set),
        "fp_out_of_scope": sum(out_of_scope_fp.values()),
        "fp_unmapped_studies": sum(1 for sid, label in strict_fp if label in label_space and sid not in study_set),
        "out_of_scope_labels": dict(out_of_scope_fp.most_common()),
    }

    per_label: dict[str, dict[str, float | int]] = {}
    for label in sorted(label_space):
        t = {k for k in truth_pairs if k[1] == label}
        p = {k for k in pred_pairs if k[1] == label}
        if not t and not p:
            continue
        stats = _prf(len(t & p), len(p - t), len(t - p))
        stats["support"] = len(t)
        per_label[label] = stats
    supported = [s["f1"] for s in per_label.values() if s["support"]]
    macro_f1 = sum(supported) / len(supported) if supported else 0.0

    def agreement(truth_values: dict, field: str) -> dict[str, Any]:
        n = exact = side_n = side_ok = 0
        for key in tp_pairs:
            want = {v for v in truth_values[key] if v}
            if not want:
                continue
            got = {v for v in pred_all[key][field] if v}
            n += 1
            exact += bool(want & got)
            if field == "location":
                sides = {_side(v) for v in want} - {None}
                if sides:
                    side_n += 1
                    side_ok += bool(sides & {_side(v) for v in got})
        out: dict[str, Any] = {"n": n, "exact": exact / n if n else None}
        if field == "location":
            out.update(side_n=side_n, side=side_ok / side_n if side_n else None)
        return out

    result: dict[str, Any] = {
        "level": level,
        "n_studies": len(study_set),
        "n_truth_pairs": len(truth_pairs),
        "n_pred_pairs": len(pred_pairs),
        "micro": micro,
        "macro_f1": macro_f1,
        "uncertain_excluded": certain,
        "strict": strict,
        "per_label": per_label,
        "location_agreement": agreement(truth_loc, "location"),
        "severity_agreement": agreement(truth_sev, "severity"),
        "pred_out_of_scope": out_of_scope,
        "pred_unknown_category": dict(unknown.most_common()),
    }
    if truth.schema.metadata and b"unmapped" in truth.schema.metadata:
        result["unmapped_truth_terms"] = unmapped_terms(truth)
    return result


# --------------------------------------------------------------------------- the report


def _r4(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def _summary(score: dict[str, Any], top_out_of_scope: int = 10) -> dict[str, Any]:
    """The report's figures of one score: ``in_scope`` and ``strict`` P/R/F1, then agreement."""
    m, s = score["micro"], score["strict"]
    location, severity = score["location_agreement"], score["severity_agreement"]
    return {
        "in_scope": {
            "precision": _r4(m["precision"]), "recall": _r4(m["recall"]), "f1": _r4(m["f1"]),
            "f1_uncertain_excluded": _r4(score["uncertain_excluded"]["f1"]), "macro_f1": _r4(score["macro_f1"]),
            "tp": m["tp"], "fp": m["fp"], "fn": m["fn"], "n_studies": score["n_studies"],
            "pred_out_of_scope": score["pred_out_of_scope"],
        },
        "strict": {
            "precision": _r4(s["precision"]), "recall": _r4(s["recall"]), "f1": _r4(s["f1"]),
            "tp": s["tp"], "fp": s["fp"], "fn": s["fn"], "n_studies": s["n_studies"],
            "fp_out_of_scope": s["fp_out_of_scope"], "fp_unmapped_studies": s["fp_unmapped_studies"],
            "out_of_scope_labels": dict(list(s["out_of_scope_labels"].items())[:top_out_of_scope]),
        },
        "location_exact": _r4(location["exact"]), "location_side": _r4(location["side"]), "location_n": location["n"],
        "severity_exact": _r4(severity["exact"]), "severity_n": severity["n"],
    }


Subsets = dict[str, tuple[Sequence[str], Sequence[str]]]  # name -> (scored studies, unmapped studies)


def score_subsets(pred: pa.Table, truth: pa.Table, vocabulary: Vocabulary, labels: Iterable[str],
                  subsets: Subsets) -> dict[str, Any]:
    """``{subset: {level: summary}}`` of one prediction table, for each subset of the studies."""
    labels = set(labels)
    return {
        name: {level: _summary(score_extraction(pred, truth, vocabulary, level, studies=scored, labels=labels,
                                                unmapped=unmapped))
               for level in ("category", "group")}
        for name, (scored, unmapped) in subsets.items()
    }


def halves(scored: Sequence[str], unmapped: Sequence[str] = ()) -> Subsets:
    """``all``, ``tuning`` and ``held_out`` (:func:`split_half`) of the scored and unmapped studies."""
    out: Subsets = {"all": (list(scored), list(unmapped))}
    for half in HALVES:
        out[half] = ([s for s in scored if split_half(s) == half], [s for s in unmapped if split_half(s) == half])
    return out


def evaluate(studies: pa.Table, truth: pa.Table, vocabulary: Vocabulary, labels: Iterable[str],
             extractors: dict[str, Callable[[str], list[Finding]]], subsets: Subsets) -> dict[str, Any]:
    """Score each synchronous extractor on each subset at both levels; time each over all reports."""
    out: dict[str, Any] = {}
    for name, extract in extractors.items():
        start = time.perf_counter()
        pred = extract_table(extract, studies)
        seconds = time.perf_counter() - start
        out[name] = {"reports_per_s": round(studies.num_rows / seconds, 1) if seconds else None,
                     **score_subsets(pred, truth, vocabulary, labels, subsets)}
    return out


def outcomes_table(outcomes: Sequence[Any]) -> pa.Table:
    """Prediction table (study_id, category, severity, location, negated, uncertain) of extract outcomes."""
    rows = [
        {"study_id": o.study_id, "category": f.category, "severity": f.severity, "location": f.location,
         "negated": f.negated, "uncertain": f.uncertain}
        for o in outcomes for f in o.findings
    ]
    return pa.Table.from_pylist(rows, schema=pa.schema(
        [("study_id", pa.string()), ("category", pa.string()), ("severity", pa.string()),
         ("location", pa.string()), ("negated", pa.bool_()), ("uncertain", pa.bool_())]))


def score_datasets(llm: Any, extract_params: Any, openi: bool, phantom_dir: str | Path | None,
                   baseline: bool = True, openi_archive: str | Path | None = None) -> dict[str, Any]:
    """Score ``llm`` (any provider, through the extract cache) and the keyword baseline.

    Datasets: the Open-i reports (gold from MeSH tags; ``all`` and its :func:`halves`) and/or
    a phantom folder (truth.parquet; ``all``). ``openi_archive``: default torchxrayvision's copy.
    """
    import dataclasses

    from medfilip.extract.run import extract_studies

    if llm.provider == "openai":
        from medfilip.extract.client import resolve_api_key

        resolve_api_key(llm)  # a missing key is one sentence now, not a failure per report later
    vocabulary = load_vocabulary()
    datasets: dict[str, tuple] = {}
    if openi:  # first: a missing torchxrayvision stops the run before anything is extracted
        from medfilip.data.openi import read_openi_reports

        reports = read_openi_reports(openi_archive)
        truth = openi_truth(reports, vocabulary=vocabulary)
        scored = sorted(set(truth.column("study_id").to_pylist()))
        meta = truth.schema.metadata
        info = {"n_reports": len(reports), "split": SPLIT_RULE,
                "n_not_indexed": int(meta[b"n_not_indexed"]), "n_unmapped_studies": len(unmapped_studies(truth)),
                "unmapped_mesh_terms": unmapped_terms(truth)}
        datasets["openi"] = (openi_studies(reports), truth, truth_labels(truth),
                             halves(scored, unmapped_studies(truth)), info)
    if phantom_dir is not None:
        studies, truth = phantom_studies(phantom_dir, extract_params)
        scored = studies.column("study_id").to_pylist()
        datasets["phantom"] = (studies, truth, phantom_labels(), {"all": (scored, [])}, {"n_reports": len(scored)})
    name = f"{llm.provider}:{llm.model}"
    params = dataclasses.replace(extract_params, text="report")  # the texts above are already reduced
    results: dict[str, Any] = {}
    for dataset, (studies, truth, labels, subsets, info) in datasets.items():
        outcomes, _, summary = extract_studies(studies, llm, params)
        pred = outcomes_table([o for o in outcomes if o.status == "ok"])
        entry: dict[str, Any] = {
            "extract": {k: summary[k] for k in ("n_reports", "n_ok", "n_failed", "llm_calls", "cache_hits",
                                                 "seconds", "reports_per_s", "prompt_tokens", "completion_tokens")},
            **score_subsets(pred, truth, vocabulary, labels, subsets),
        }
        results[dataset] = {**info, name: entry}
        if baseline:
            results[dataset].update(evaluate(studies, truth, vocabulary, labels,
                                             {"keyword": lambda r: keyword_baseline(r, vocabulary)}, subsets))
    return results

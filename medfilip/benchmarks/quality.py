"""How well an extractor reads reports, measured against independent labels.

Two references:

* **Open-i** -- 3,955 real reports whose MeSH tags were assigned by human indexers
  (``Opacity/lung/base/left/mild``); ``data/knowledge/mesh_map.yaml`` maps them onto the
  vocabulary's categories, the qualifiers onto side/zone and severity.
* **the phantom** -- the synthetic benchmark's truth table (what each image shows).

:func:`score_extraction` compares positive (study, category) pairs -- or (study, group)
pairs for the coarse umbrella groups -- and, on the pairs both sides agree on, the
location and severity. :func:`keyword_baseline` is the floor every extractor must clear:
a vocabulary keyword scan with sentence-level negation.

``medfilip score --openi --phantom data/raw/phantom`` prints every number.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from medfilip.errors import UserError
from medfilip.extract.schema import Finding
from medfilip.vocab import SIDES, Vocabulary, load_vocabulary, normalize_text

DEFAULT_MESH_MAP = Path(__file__).resolve().parents[2] / "data" / "knowledge" / "mesh_map.yaml"
NO_FINDING = "no finding"

TRUTH_SCHEMA = pa.schema([
    ("study_id", pa.string()), ("category", pa.string()), ("group", pa.string()),
    ("severity", pa.string()), ("location", pa.string()), ("mesh", pa.string()),
])
PRED_SCHEMA = pa.schema([
    ("study_id", pa.string()), ("category", pa.string()), ("severity", pa.string()),
    ("location", pa.string()), ("negated", pa.bool_()), ("uncertain", pa.bool_()),
    ("evidence", pa.string()),
])


class MeshMapError(UserError, ValueError):
    """A malformed MeSH map (names the file and the heading)."""


# --------------------------------------------------------------------------- MeSH -> categories


@dataclass(frozen=True)
class MeshRule:
    default: str | None
    has_default: bool  # False: the heading only maps through its qualifiers
    when: tuple[tuple[str, str | None], ...]


@dataclass(frozen=True)
class MeshMap:
    path: Path
    normal: frozenset[str]
    unusable: frozenset[str]
    terms: dict[str, MeshRule]  # lower-case heading -> rule

    @property
    def categories(self) -> frozenset[str]:
        """Every category a MeSH tag can become: the label space of the Open-i reference."""
        out = set()
        for rule in self.terms.values():
            out.update(c for c in (rule.default, *(c for _, c in rule.when)) if c)
        return frozenset(out)


def _heading_key(text: str) -> str:
    return " ".join(text.split()).lower()


def load_mesh_map(path: str | Path = DEFAULT_MESH_MAP, vocabulary: Vocabulary | None = None) -> MeshMap:
    """Read and check the MeSH map; every category it names must be in the vocabulary."""
    path = Path(path)
    vocabulary = vocabulary or load_vocabulary()
    if not path.exists():
        raise MeshMapError(f"{path}: MeSH map not found (the default ships under data/knowledge/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise MeshMapError(f"{path}: not valid YAML: {exc}") from None

    def check(category: Any, where: str) -> str | None:
        if category is not None and category not in vocabulary.info:
            raise MeshMapError(f"{path}: {where}: '{category}' is not a category of {vocabulary.path}")
        return category

    terms: dict[str, MeshRule] = {}
    for heading, spec in (data.get("terms") or {}).items():
        where = f"terms.{heading}"
        if spec is None or isinstance(spec, str):
            rule = MeshRule(check(spec, where), True, ())
        elif isinstance(spec, dict) and set(spec) <= {"category", "when"}:
            when = spec.get("when") or {}
            if not isinstance(when, dict):
                raise MeshMapError(f"{path}: {where}.when must map qualifier -> category")
            rule = MeshRule(check(spec.get("category"), f"{where}.category"), "category" in spec,
                            tuple((_heading_key(str(q)), check(c, f"{where}.when.{q}")) for q, c in when.items()))
        else:
            raise MeshMapError(f"{path}: {where} must be a category, null, or {{category, when}}")
        key = _heading_key(str(heading))
        if key in terms:
            raise MeshMapError(f"{path}: {where} is listed twice (headings are case-insensitive)")
        terms[key] = rule
    return MeshMap(path, frozenset(_heading_key(t) for t in data.get("normal") or ()),
                   frozenset(_heading_key(t) for t in data.get("unusable") or ()), terms)


@dataclass(frozen=True)
class MeshFinding:
    kind: Literal["finding", "normal", "ignored", "unusable", "unmapped"]
    category: str | None = None
    severity: str | None = None
    location: str | None = None


def map_mesh_term(term: str, mesh_map: MeshMap, vocabulary: Vocabulary) -> MeshFinding:
    """One MeSH tag -> a finding (category, severity, location) or why it is not one."""
    heading, *qualifiers = [_heading_key(p) for p in term.split("/")]
    qualifiers = [q for q in qualifiers if q]
    if heading in mesh_map.normal:
        return MeshFinding("normal")
    if heading in mesh_map.unusable:
        return MeshFinding("unusable")
    rule = mesh_map.terms.get(heading)
    if rule is None:
        return MeshFinding("unmapped")
    for qualifier, category in rule.when:
        if qualifier in qualifiers:
            break
    else:
        if not rule.has_default:
            return MeshFinding("unmapped")
        category = rule.default
    if category is None:
        return MeshFinding("ignored")
    words = " ".join(qualifiers)
    return MeshFinding("finding", category, vocabulary.severity_of(words, category),
                       vocabulary.location_of(words, category))


def openi_truth(reports: Sequence[Any], mesh_map_path: str | Path = DEFAULT_MESH_MAP,
                vocabulary: Vocabulary | None = None) -> pa.Table:
    """Positive findings of every usable Open-i study, from its human-assigned MeSH tags.

    A study counts when at least one tag maps to a category or says ``normal``; a normal
    study gets a single ``no finding`` row (so it is scored, with no positives). Tags with
    no mapping are counted in the table's metadata (``unmapped``), never silently dropped.
    """
    vocabulary = vocabulary or load_vocabulary()
    mesh_map = load_mesh_map(mesh_map_path, vocabulary)
    rows: list[dict[str, Any]] = []
    unmapped: Counter[str] = Counter()
    counts: Counter[str] = Counter()
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
    table = pa.Table.from_pylist(rows, schema=TRUTH_SCHEMA)
    meta = {
        "unmapped": json.dumps(dict(unmapped.most_common())),
        "term_counts": json.dumps(dict(counts)),
        "n_reports": str(len(reports)),
        "labels": json.dumps(sorted(mesh_map.categories)),
    }
    return table.replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()})


def unmapped_terms(truth: pa.Table) -> dict[str, int]:
    """The MeSH tags :func:`openi_truth` could not map, with their counts."""
    meta = truth.schema.metadata or {}
    return json.loads(meta.get(b"unmapped", b"{}"))


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


def phantom_studies(root: str | Path) -> tuple[pa.Table, pa.Table]:
    """(studies, truth) of a phantom dataset folder.

    Each report is reduced exactly as the extract stage does it (``extract.text: sections``),
    so scoring re-uses the answers ``dvc repro extract`` cached and pays for nothing twice.
    """
    from medfilip.config import ExtractParams
    from medfilip.data.sections import findings_and_impression
    from medfilip.extract.text import report_text

    root = Path(root)
    studies = pq.read_table(root / "studies.parquet", columns=["study_id", "report"]).to_pylist()
    sections = ExtractParams(text="sections")
    texts = []
    for s in studies:
        findings, impression = findings_and_impression(s["report"])
        texts.append(report_text({"report": s["report"], "findings": findings, "impression": impression}, sections)[0])
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
                     studies: Iterable[str] | None = None, labels: Iterable[str] | None = None) -> dict[str, Any]:
    """Micro/macro P/R/F1 of positive (study, label) pairs, and location/severity agreement.

    ``pred``: study_id, category, severity, location, negated, uncertain (raw extractor output;
    categories go through ``vocabulary.category_of``). ``truth``: study_id, category, severity,
    location (positive findings; a ``no finding`` row only marks a study as scored).
    A prediction is positive unless negated; uncertain ones count (``uncertain_excluded``
    gives the variant without them). ``studies``: the scored studies (default: those in
    ``truth``). ``labels``: the categories the reference can express (default: the whole
    vocabulary); predictions outside it are counted as ``pred_out_of_scope``, not as errors.
    Macro F1 averages the labels with truth support. Agreement is measured on true-positive
    pairs where the truth states a location/severity: exact canonical string, and side alone.
    """
    if level not in ("category", "group"):
        raise ValueError(f"level must be 'category' or 'group', got {level!r}")
    study_set = set(studies) if studies is not None else set(truth.column("study_id").to_pylist())
    categories = set(labels) if labels is not None else set(vocabulary.categories)
    categories.discard(NO_FINDING)

    def label_of(category: str) -> str:
        return category if level == "category" else vocabulary.group_of(category)

    label_space = {label_of(c) for c in categories}

    truth_loc: dict[tuple[str, str], set] = {}
    truth_sev: dict[tuple[str, str], set] = {}
    for row in truth.select(["study_id", "category", "severity", "location"]).to_pylist():
        category = vocabulary.category_of(row["category"]) if row["category"] else None
        if row["study_id"] not in study_set or category is None or category == NO_FINDING:
            continue
        if category not in categories:
            continue
        key = (row["study_id"], label_of(category))
        truth_loc.setdefault(key, set())
        truth_sev.setdefault(key, set())
        if row.get("location"):
            truth_loc[key].add(vocabulary.location_of(row["location"], category))
        if row.get("severity"):
            truth_sev[key].add(vocabulary.severity_of(row["severity"], category))

    pred_all: dict[tuple[str, str], dict[str, set]] = {}
    pred_certain: set[tuple[str, str]] = set()
    unknown: Counter[str] = Counter()
    out_of_scope = 0
    columns = set(pred.column_names)
    for row in pred.to_pylist():
        if row["study_id"] not in study_set or row.get("negated"):
            continue
        category = vocabulary.category_of(row.get("category"))
        if category is None:
            unknown[str(row.get("category"))] += 1
            continue
        if category == NO_FINDING:
            continue
        if category not in categories:
            out_of_scope += 1
            continue
        key = (row["study_id"], label_of(category))
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
    strict = _prf(len(truth_pairs & pred_certain), len(pred_certain - truth_pairs), len(truth_pairs - pred_certain))

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
        "uncertain_excluded": strict,
        "per_label": per_label,
        "location_agreement": agreement(truth_loc, "location"),
        "severity_agreement": agreement(truth_sev, "severity"),
        "pred_out_of_scope": out_of_scope,
        "pred_unknown_category": dict(unknown.most_common()),
    }
    if truth.schema.metadata and b"unmapped" in truth.schema.metadata:
        result["unmapped_truth_terms"] = unmapped_terms(truth)
    return result


# --------------------------------------------------------------------------- the command


def _summary(score: dict[str, Any]) -> dict[str, Any]:
    m = score["micro"]
    return {
        "precision": round(m["precision"], 4), "recall": round(m["recall"], 4), "f1": round(m["f1"], 4),
        "f1_uncertain_excluded": round(score["uncertain_excluded"]["f1"], 4),
        "macro_f1": round(score["macro_f1"], 4),
        "location_exact": score["location_agreement"]["exact"], "location_side": score["location_agreement"]["side"],
        "location_n": score["location_agreement"]["n"],
        "severity_exact": score["severity_agreement"]["exact"], "severity_n": score["severity_agreement"]["n"],
        "n_studies": score["n_studies"], "pred_out_of_scope": score["pred_out_of_scope"],
    }


def evaluate(studies: pa.Table, truth: pa.Table, vocabulary: Vocabulary, labels: Iterable[str],
             extractors: dict[str, Callable[[str], list[Finding]]], scored: Iterable[str] | None = None,
             ) -> dict[str, Any]:
    """Score each extractor at both levels; time each over all reports."""
    labels = set(labels)
    out: dict[str, Any] = {}
    for name, extract in extractors.items():
        start = time.perf_counter()
        pred = extract_table(extract, studies)
        seconds = time.perf_counter() - start
        out[name] = {"reports_per_s": round(studies.num_rows / seconds, 1) if seconds else None}
        for level in ("category", "group"):
            score = score_extraction(pred, truth, vocabulary, level, studies=scored, labels=labels)
            out[name][level] = _summary(score)
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
                   baseline: bool = True) -> dict[str, Any]:
    """Score ``llm`` (any provider, through the extract cache) and the keyword baseline.

    Datasets: the Open-i reports (gold from MeSH tags) and/or a phantom folder (truth.parquet).
    """
    import dataclasses

    from medfilip.extract.run import extract_studies

    vocabulary = load_vocabulary()
    datasets: dict[str, tuple] = {}
    if openi:
        from medfilip.data.openi import read_openi_reports

        reports = read_openi_reports()
        truth = openi_truth(reports, vocabulary=vocabulary)
        datasets["openi"] = (openi_studies(reports), truth, truth_labels(truth), None)
    if phantom_dir is not None:
        studies, truth = phantom_studies(phantom_dir)
        datasets["phantom"] = (studies, truth, phantom_labels(), studies.column("study_id").to_pylist())
    name = f"{llm.provider}:{llm.model}"
    params = dataclasses.replace(extract_params, text="report")
    results: dict[str, Any] = {}
    for dataset, (studies, truth, labels, scored) in datasets.items():
        outcomes, _, summary = extract_studies(studies, llm, params)
        pred = outcomes_table([o for o in outcomes if o.status == "ok"])
        entry: dict[str, Any] = {
            "extract": {k: summary[k] for k in ("n_reports", "n_ok", "n_failed", "llm_calls", "cache_hits",
                                                 "seconds", "reports_per_s", "prompt_tokens", "completion_tokens")},
        }
        for level in ("category", "group"):
            entry[level] = _summary(score_extraction(pred, truth, vocabulary, level, studies=scored, labels=labels))
        results[dataset] = {name: entry}
        if baseline:
            results[dataset].update(evaluate(studies, truth, vocabulary, labels,
                                             {"keyword": lambda r: keyword_baseline(r, vocabulary)}, scored=scored))
        if dataset == "openi":
            results[dataset]["unmapped_mesh_terms"] = unmapped_terms(truth)
    return results

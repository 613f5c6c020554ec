"""Open-i MeSH tags -> findings in our vocabulary, through ``data/knowledge/mesh_map.yaml``.

Open-i's human indexers tag each report with MeSH terms such as
``Opacity/lung/base/left/mild``: a heading, then qualifiers. The map (data, reviewed like
code) sends a heading to a vocabulary category, or to one chosen by its qualifiers; the
qualifiers also give the side/zone and severity, read by the vocabulary's own phrase tables
(base -> lower zone, borderline -> mild). ``normal`` says the study has no abnormality;
``No Indexing`` that it was never indexed. A tag without a mapping is reported as
unmapped, never silently dropped.

The importer (:mod:`medfilip.data.importers.openi`) builds Open-i's reference labels with
this module, and the extraction benchmarks score against the same mapping.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml

from medfilip.errors import UserError
from medfilip.vocab import Vocabulary, load_vocabulary

DEFAULT_MESH_MAP = Path(__file__).resolve().parents[2] / "data" / "knowledge" / "mesh_map.yaml"
NO_FINDING = "no finding"


class MeshMapError(UserError, ValueError):
    """A malformed MeSH map (names the file and the heading)."""


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
    if not isinstance(data, dict):
        raise MeshMapError(f"{path}: must be a mapping with 'normal', 'unusable' and 'terms'")

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


StudyStatus = Literal["findings", "normal", "not_indexed", "no_mapped_tag"]


@dataclass(frozen=True)
class MeshStudy:
    """What one study's MeSH tags say as a whole, and each tag mapped (in the order given)."""

    status: StudyStatus
    terms: tuple[tuple[str, MeshFinding], ...]

    @property
    def findings(self) -> list[tuple[str, MeshFinding]]:
        """The (tag, finding) pairs that are positive findings in our vocabulary."""
        return [(t, m) for t, m in self.terms if m.kind == "finding"]


def map_study_terms(terms: Iterable[str], mesh_map: MeshMap, vocabulary: Vocabulary) -> MeshStudy:
    """A study's tags -> its status: ``findings`` as soon as one tag maps to a category; else
    ``normal`` when one says so; ``not_indexed`` when every tag says the study was not indexed
    (or it has none); else ``no_mapped_tag`` (indexed, but no tag maps: nothing can be said)."""
    mapped = tuple((term, map_mesh_term(term, mesh_map, vocabulary)) for term in terms)
    kinds = {m.kind for _, m in mapped}
    if "finding" in kinds:
        status: StudyStatus = "findings"
    elif "normal" in kinds:
        status = "normal"
    elif kinds <= {"unusable"}:
        status = "not_indexed"
    else:
        status = "no_mapped_tag"
    return MeshStudy(status, mapped)

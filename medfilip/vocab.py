"""The controlled vocabulary of chest X-ray findings (``data/knowledge/vocabulary.yaml``).

One object answers the questions every later stage asks of free text: which canonical
category does "Pleural efusions" name (``category_of``), which severity is "trace"
(``severity_of``), where is "at the left base" (``location_of``) and which umbrella group
does a category belong to (``group_of``). Everything is a dict lookup over normalised
word sequences; an edit-distance fallback catches misspellings.

Canonical forms: categories as spelled in the YAML; severities ``mild``/``moderate``/``severe``;
locations ``"<side> <zone> zone"`` ("left lower zone"), ``"<side>"`` ("left"),
``"<zone> zone"`` ("lower zone"), with the perihilar zone written ``"<side> perihilar"``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from medfilip.errors import UserError

DEFAULT_VOCABULARY = Path(__file__).resolve().parents[1] / "data" / "knowledge" / "vocabulary.yaml"

SEVERITIES = ("mild", "moderate", "severe")
SIDES = ("left", "right", "bilateral")
ZONES = ("upper", "middle", "lower", "perihilar")
LOCATION_DETAILS = ("zone", "side", "none")
CHANGES = ("new", "stable", "improved", "worsened", "resolved")

_NON_WORD = re.compile(r"[^a-z0-9]+")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(mm|cm|millimeters?|centimeters?)\b")


class VocabularyError(UserError, ValueError):
    """A vocabulary file that cannot be used: names the file and the key."""


def normalize_text(text: str) -> str:
    """Lower-case, punctuation to spaces, single spaces: the form every phrase is matched in."""
    return " ".join(_NON_WORD.split(text.lower())).strip()


def plural_forms(phrase: str) -> tuple[str, ...]:
    """Regular English plurals of a phrase's last word (atelectasis -> atelectases, opacity -> opacities)."""
    head, _, last = phrase.rpartition(" ")
    if len(last) < 3 or last[-1].isdigit():
        return ()
    if last.endswith("sis"):
        forms = [last[:-2] + "es"]
    elif last.endswith("ax"):
        forms = [last[:-1] + "ces", last + "es"]  # thorax -> thoraces / thoraxes
    elif re.search(r"[^aeiou]y$", last):
        forms = [last[:-1] + "ies"]
    elif last.endswith(("s", "sh", "ch", "x", "z")):
        forms = [last + "es"]
    elif last.endswith("ma"):
        forms = [last + "s", last + "ta"]  # granulomas, granulomata
    else:
        forms = [last + "s"]
    return tuple(f"{head} {f}" if head else f for f in forms)


def _edit_distance(a: str, b: str, limit: int) -> int:
    """Levenshtein distance, giving up (returning limit + 1) once it must exceed ``limit``."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i] + [0] * len(b)
        best = i
        for j, cb in enumerate(b, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb))
            best = min(best, current[j])
        if best > limit:
            return limit + 1
        previous = current
    return previous[-1]


def _bigrams(text: str) -> set[str]:
    return {text[i:i + 2] for i in range(len(text) - 1)}


def _typo_budget(text: str) -> int:
    """How many edits a misspelling of a phrase this long may have (none for short words)."""
    n = len(text)
    return 0 if n < 5 else 1 if n < 9 else 2


@dataclass(frozen=True)
class Place:
    """A side and/or a lung zone; ``canonical`` is the location string used everywhere."""

    side: str | None = None
    zone: str | None = None

    @property
    def canonical(self) -> str | None:
        if self.zone is None:
            return self.side
        zone = "perihilar" if self.zone == "perihilar" else f"{self.zone} zone"
        return f"{self.side} {zone}" if self.side else zone

    def at_detail(self, detail: str) -> "Place":
        """The place as finely as a category is located (``zone``, ``side`` or ``none``)."""
        if detail == "none":
            return Place()
        if detail == "side":
            return Place(self.side)
        return self


@dataclass(frozen=True)
class CategoryInfo:
    name: str
    group: str
    abnormal: bool
    location_detail: str  # zone | side | none
    synonyms: tuple[str, ...]  # normalised, as written (no generated plurals)
    severity_words: Mapping[str, str]  # normalised word -> level, this category only
    size_mm: tuple[float, float] | None  # below [0] mild, above [1] severe


def combine_places(places: Iterable[Place]) -> Place:
    """One place from several mentions: left + right is bilateral; the first zone named wins."""
    sides: list[str] = []
    zone = None
    for p in places:
        if p.side and p.side not in sides:
            sides.append(p.side)
        if zone is None and p.zone:
            zone = p.zone
    if not sides:
        side = None
    elif "bilateral" in sides or ("left" in sides and "right" in sides):
        side = "bilateral"
    else:
        side = sides[0]
    return Place(side, zone)


class Vocabulary:
    """Canonical categories, their synonyms and groups, and the severity/change/location words."""

    def __init__(self, data: Mapping[str, Any], path: Path, text: str):
        self.path = path
        self.fingerprint = hashlib.sha256(text.encode()).hexdigest()
        where = str(path)
        cats = data.get("categories")
        if not isinstance(cats, dict) or not cats:
            raise VocabularyError(f"{where}: 'categories' must be a non-empty mapping of category -> entry")
        self.info: dict[str, CategoryInfo] = {}
        # explicit phrase -> category first, so a generated plural never overrides a listed synonym
        explicit: dict[str, str] = {}
        for name, entry in cats.items():
            info = _parse_category(str(name), entry, where)
            self.info[info.name] = info
            for phrase in info.synonyms:
                owner = explicit.setdefault(phrase, info.name)
                if owner != info.name:
                    raise VocabularyError(
                        f"{where}: synonym '{phrase}' is claimed by both categories.{owner} and "
                        f"categories.{info.name}; keep it in one of them"
                    )
        self.categories: tuple[str, ...] = tuple(self.info)
        self.groups: tuple[str, ...] = tuple(dict.fromkeys(i.group for i in self.info.values()))
        self.mention_phrases: dict[str, str] = dict(explicit)
        for phrase, category in explicit.items():
            for plural in plural_forms(phrase):
                self.mention_phrases.setdefault(plural, category)

        self.severity_phrases = _parse_levels(data.get("severity"), "severity", SEVERITIES, where)
        self.change_phrases = _parse_levels(data.get("change"), "change", CHANGES, where)
        self.location_phrases = _parse_locations(data.get("locations"), where)
        self._by_length: dict[int, list[str]] = {}
        for phrase in self.mention_phrases:
            self._by_length.setdefault(len(phrase), []).append(phrase)
        self._gram_index: dict[str, list[str]] = {}
        for phrase in self.mention_phrases:
            if len(phrase) >= 5:
                for g in _bigrams(phrase):
                    self._gram_index.setdefault(g, []).append(phrase)
        self._max_words = max(len(p.split()) for p in self.mention_phrases)
        self._max_location_words = max(len(p.split()) for p in self.location_phrases)
        self._max_severity_words = max(
            [len(p.split()) for p in self.severity_phrases]
            + [len(p.split()) for i in self.info.values() for p in i.severity_words]
        )
        self._category_cache: dict[str, str | None] = {}

    # ------------------------------------------------------------------ categories

    def group_of(self, category: str) -> str:
        """The umbrella group of a category (canonical name, or any text ``category_of`` knows)."""
        info = self.info.get(category)
        if info is None:
            canonical = self.category_of(category)
            if canonical is None:
                raise KeyError(f"'{category}' is not a category of {self.path}")
            info = self.info[canonical]
        return info.group

    def is_abnormal(self, category: str) -> bool:
        return self.info[category].abnormal

    def location_detail(self, category: str) -> str:
        return self.info[category].location_detail

    def category_of(self, text: str | None) -> str | None:
        """Free text (an LLM's category field) -> canonical category, or None if nothing fits.

        Tries, in order: the exact phrase (synonyms and their plurals), a misspelling of a whole
        phrase, the longest known phrase inside the text, a misspelled word or two inside it.
        """
        if not text:
            return None
        cached = self._category_cache.get(text)
        if cached is not None or text in self._category_cache:
            return cached
        norm = normalize_text(text)
        result = self._lookup(norm) if norm else None
        if len(self._category_cache) < 100_000:
            self._category_cache[text] = result
        return result

    def _lookup(self, norm: str) -> str | None:
        if norm in self.mention_phrases:
            return self.mention_phrases[norm]
        words = norm.split()
        if len(words) <= 3:  # a misspelt phrase ("calcifed granuloma") before a shorter phrase inside it
            fuzzy = self._fuzzy(norm)
            if fuzzy is not None:
                return fuzzy
        best: tuple[int, int, str] | None = None  # (-words, start, category)
        for start in range(len(words)):
            for n in range(min(self._max_words, len(words) - start), 0, -1):
                cat = self.mention_phrases.get(" ".join(words[start : start + n]))
                if cat is not None:
                    if best is None or (-n, start) < best[:2]:
                        best = (-n, start, cat)
                    break
        if best is not None:
            return best[2]
        for n in (3, 2, 1):
            for start in range(len(words) - n + 1):
                fuzzy = self._fuzzy(" ".join(words[start : start + n]))
                if fuzzy is not None:
                    return fuzzy
        return None

    def _fuzzy(self, norm: str) -> str | None:
        """The category of the one closest phrase within the typo budget (None if tied across categories)."""
        budget = _typo_budget(norm)
        if budget == 0:
            return None
        best_distance, found = budget + 1, set()
        grams = _bigrams(norm)
        # q-gram filter: one edit removes at most two of the text's distinct bigrams
        shared: dict[str, int] = {}
        for g in grams:
            for phrase in self._gram_index.get(g, ()):
                shared[phrase] = shared.get(phrase, 0) + 1
        need = len(grams) - 2 * budget
        for phrase, count in shared.items():
            if count >= need and abs(len(phrase) - len(norm)) <= budget:
                d = _edit_distance(norm, phrase, best_distance)
                if d < best_distance:
                    best_distance, found = d, {self.mention_phrases[phrase]}
                elif d == best_distance and d <= budget:
                    found.add(self.mention_phrases[phrase])
        return next(iter(found)) if best_distance <= budget and len(found) == 1 else None

    # ------------------------------------------------------------------ severity, change, location

    def severity_words(self, category: str | None = None) -> dict[str, str]:
        """Severity phrase -> level: the global scale, overridden by the category's own words."""
        words = dict(self.severity_phrases)
        if category in self.info:
            words.update(self.info[category].severity_words)
        return words

    def severity_of(self, text: str | None, category: str | None = None) -> str | None:
        """The canonical severity a text states ("trace" -> mild, "large" -> severe), or None.

        With a category, its own words count too ("complete" atelectasis is severe) and a stated
        size ("8 mm") is graded by the category's ``size_mm``.
        """
        if not text:
            return None
        norm = normalize_text(text)
        if norm in SEVERITIES:
            return norm
        level = scan_first(norm.split(), self.severity_words(category), self._max_severity_words)
        if level is None and category is not None:
            level = self.severity_from_size(text, category)
        return level

    def severity_from_size(self, text: str, category: str) -> str | None:
        """Grade a size written in the text ("8 mm", "1.6 cm") by the category's ``size_mm`` bounds."""
        info = self.info.get(category)
        if info is None or info.size_mm is None:
            return None
        sizes = [float(v) * (10.0 if u.startswith("c") else 1.0) for v, u in _SIZE.findall(text.lower())]
        if not sizes:
            return None
        return grade_size(max(sizes), info.size_mm)

    def change_of(self, text: str | None) -> str | None:
        """The change versus a prior study a text states (new/stable/improved/worsened/resolved), or None."""
        if not text:
            return None
        return scan_first(normalize_text(text).split(), self.change_phrases, 4)

    def place_of(self, text: str | None) -> Place:
        """The side and zone named in a text (``Place()`` when none)."""
        if not text:
            return Place()
        words = normalize_text(text).split()
        places = []
        i = 0
        while i < len(words):
            for n in range(min(self._max_location_words, len(words) - i), 0, -1):
                place = self.location_phrases.get(" ".join(words[i : i + n]))
                if place is not None:
                    places.append(place)
                    i += n
                    break
            else:
                i += 1
        return combine_places(places)

    def location_of(self, text: str | None, category: str | None = None) -> str | None:
        """The canonical location a text names ("left base" -> "left lower zone"), or None.

        With a category, the location is cut to how finely that category is located
        (a pleural effusion has a side, cardiomegaly no location at all).
        """
        place = self.place_of(text)
        if category in self.info:
            place = place.at_detail(self.info[category].location_detail)
        return place.canonical


def grade_size(size_mm: float, bounds: tuple[float, float]) -> str:
    """mild below ``bounds[0]`` mm, severe above ``bounds[1]``, moderate between."""
    return "mild" if size_mm < bounds[0] else "severe" if size_mm > bounds[1] else "moderate"


def scan_first(words: list[str], table: Mapping[str, str], max_words: int) -> str | None:
    """The value of the first (longest at its position) phrase of ``table`` in the words."""
    for i in range(len(words)):
        for n in range(min(max_words, len(words) - i), 0, -1):
            value = table.get(" ".join(words[i : i + n]))
            if value is not None:
                return value
    return None


def _string_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise VocabularyError(f"{where} must be a list of non-empty strings")
    return [normalize_text(v) for v in value]


def _parse_category(name: str, entry: Any, file: str) -> CategoryInfo:
    where = f"{file}: categories.{name}"
    if not isinstance(entry, dict):
        raise VocabularyError(f"{where} must be a mapping with 'group' and 'synonyms'")
    unknown = set(entry) - {"group", "abnormal", "location", "synonyms", "severity", "size_mm"}
    if unknown:
        raise VocabularyError(f"{where}.{sorted(unknown)[0]}: unknown key")
    if name != normalize_text(name) and name != name.lower().strip():
        raise VocabularyError(f"{where}: category names are lower-case")
    group = entry.get("group")
    if not isinstance(group, str) or not group:
        raise VocabularyError(f"{where}.group: missing (every category needs an umbrella group)")
    abnormal = entry.get("abnormal", True)
    if not isinstance(abnormal, bool):
        raise VocabularyError(f"{where}.abnormal must be true or false")
    detail = entry.get("location", "zone")
    if detail not in LOCATION_DETAILS:
        raise VocabularyError(f"{where}.location must be one of {', '.join(LOCATION_DETAILS)}; got {detail!r}")
    synonyms = _string_list(entry.get("synonyms", []), f"{where}.synonyms")
    synonyms = list(dict.fromkeys([normalize_text(name), *synonyms]))
    severity: dict[str, str] = {}
    for level, words in (entry.get("severity") or {}).items():
        if level not in SEVERITIES:
            raise VocabularyError(f"{where}.severity.{level}: severity levels are {', '.join(SEVERITIES)}")
        for w in _string_list(words, f"{where}.severity.{level}"):
            severity[w] = level
    size = entry.get("size_mm")
    if size is not None:
        if (not isinstance(size, list) or len(size) != 2 or not all(isinstance(v, (int, float)) for v in size)
                or size[0] > size[1]):
            raise VocabularyError(f"{where}.size_mm must be [mild_below, severe_above] in mm; got {size!r}")
        size = (float(size[0]), float(size[1]))
    return CategoryInfo(name, group, abnormal, detail, tuple(synonyms), severity, size)


def _parse_levels(section: Any, key: str, levels: tuple[str, ...], file: str) -> dict[str, str]:
    if not isinstance(section, dict):
        raise VocabularyError(f"{file}: '{key}' must be a mapping of {' / '.join(levels)} -> words")
    table: dict[str, str] = {}
    for level, words in section.items():
        if level not in levels:
            raise VocabularyError(f"{file}: {key}.{level}: levels are {', '.join(levels)}")
        for w in _string_list(words, f"{file}: {key}.{level}"):
            if table.setdefault(w, level) != level:
                raise VocabularyError(f"{file}: {key}: '{w}' is listed under both {table[w]} and {level}")
    return table


def _parse_locations(section: Any, file: str) -> dict[str, Place]:
    if not isinstance(section, dict):
        raise VocabularyError(f"{file}: 'locations' must be a mapping with sides, zones, lobes, structures")
    sides: dict[str, str | None] = {}
    zones: dict[str, str | None] = {}

    def claim(table: dict[str, str | None], phrase: str, value: str | None, where: str) -> None:
        if value is None:
            table.setdefault(phrase, None)
            return
        old = table.get(phrase)
        if old is not None and old != value:
            raise VocabularyError(f"{file}: {where}: '{phrase}' already means {old}, cannot also mean {value}")
        table[phrase] = value

    for part, table, allowed in (("sides", sides, SIDES), ("zones", zones, ZONES)):
        entries = section.get(part)
        if not isinstance(entries, dict):
            raise VocabularyError(f"{file}: locations.{part} must be a mapping of {' / '.join(allowed)} -> words")
        for value, words in entries.items():
            if value not in allowed:
                raise VocabularyError(f"{file}: locations.{part}.{value}: allowed are {', '.join(allowed)}")
            for w in _string_list(words, f"{file}: locations.{part}.{value}"):
                claim(table, w, value, f"locations.{part}.{value}")
    for part in ("lobes", "structures"):
        for phrase, spec in (section.get(part) or {}).items():
            where = f"locations.{part}.{phrase}"
            spec = spec or {}
            if not isinstance(spec, dict) or set(spec) - {"side", "zone"}:
                raise VocabularyError(f"{file}: {where} must be a mapping with optional side and zone")
            if spec.get("side") not in (None, *SIDES) or spec.get("zone") not in (None, *ZONES):
                raise VocabularyError(f"{file}: {where}: side must be one of {SIDES}, zone one of {ZONES}")
            norm = normalize_text(str(phrase))
            claim(sides, norm, spec.get("side"), where)
            claim(zones, norm, spec.get("zone"), where)
    return {p: Place(sides.get(p), zones.get(p)) for p in {*sides, *zones}}


_LOADED: dict[tuple[str, str], Vocabulary] = {}


def load_vocabulary(path: str | Path = DEFAULT_VOCABULARY) -> Vocabulary:
    """Read and check a vocabulary file; a malformed one is a :class:`VocabularyError` naming file and key."""
    path = Path(path)
    if not path.exists():
        raise VocabularyError(f"{path}: vocabulary file not found (the default ships under data/knowledge/)")
    text = path.read_text()
    key = (str(path.resolve()), hashlib.sha256(text.encode()).hexdigest())
    if key in _LOADED:
        return _LOADED[key]
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise VocabularyError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise VocabularyError(f"{path}: expected a mapping with 'categories', 'severity', 'change', 'locations'")
    vocabulary = Vocabulary(data, path, text)
    _LOADED[key] = vocabulary
    return vocabulary

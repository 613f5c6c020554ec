"""The ``rules`` extractor: a deterministic lexicon + negation/uncertainty reader of reports.

The offline baseline every LLM is compared to. How it reads a report:

1. Sections whose heading is listed in ``skip_sections.txt`` (INDICATION, COMPARISON, ...)
   are dropped; the rest is cut into sentences.
2. Each sentence is tokenised into words and commas/semicolons, and scanned once, longest
   phrase first, against one table holding the vocabulary's mention phrases
   (``data/knowledge/vocabulary.yaml``), the trigger lists (``data/extract/rules/*.txt``) and the
   severity and location words. ``patterns.yaml`` adds mentions a phrase cannot express
   ("the cardiac silhouette is mildly enlarged", "heart size is normal").
3. Terminators ("but", "however", "which", ...) and semicolons cut a sentence into clauses.
   Within a clause, a pre-trigger ("no", "possible", "evaluate for") reaches the mentions after
   it, chaining over a list ("No pneumothorax, effusion, or consolidation"); a post-trigger
   ("is not seen", "cannot be excluded") reaches back the same way. The nearest trigger
   decides, except that a negation beats a hedge it spans ("no line to suggest pneumothorax").
   Hypothetical mentions ("evaluate for pneumonia") are not findings and are left out.
4. Severity and location come from the words around a mention, up to the next comma or
   conjunction. Mentions of one finding share them: coordinated ones ("left base
   atelectasis/infiltrate") their location, a diagnosis joined by a link ("opacity ...,
   concerning for pneumonia") or a colon the finding's location and severity.
5. One finding per mention (GPT-IE's decoupling of repeated occurrences): two nodules in two
   lobes are two findings, each with its own sentence's place and severity. Only a restatement
   is folded into the finding it repeats: same category, same place or none named (FINDINGS and
   IMPRESSION repeat each other); there a stated mention beats a hedged one and a stated or
   hedged one beats a negation (``_merge``).
6. A size grades severity only through the category's ``size_mm`` rule in
   ``data/knowledge/vocabulary.yaml`` (documented in ``data/extract/rules/README.md``); a count
   ("two nodules") grades nothing, and no rule means no severity.

Quality on Open-i and the phantom is measured by ``medfilip/benchmarks/quality.py``.
"""

from __future__ import annotations

import hashlib
import re
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medfilip.errors import UserError
from medfilip.extract.base import Answer
from medfilip.extract.schema import Finding, findings_to_json
from medfilip.vocab import Place, Vocabulary, combine_places, grade_size, load_vocabulary, normalize_text

DEFAULT_RULES_DIR = Path(__file__).resolve().parents[2] / "data" / "extract" / "rules"
# Editing how reports are read changes the answers as much as editing the phrase lists.
_CODE = (Path(__file__).resolve(), Path(__file__).resolve().parents[1] / "vocab.py")

TRIGGER_FILES = {
    "neg_pre": "negation_pre.txt",
    "neg_post": "negation_post.txt",
    "unc_pre": "uncertainty_pre.txt",
    "unc_post": "uncertainty_post.txt",
    "hyp_pre": "hypothetical_pre.txt",
    "hyp_post": "hypothetical_post.txt",
    "pseudo": "pseudo.txt",
    "term": "terminators.txt",
    "link": "links.txt",
}
DEFAULT_WINDOW = {"neg_pre": 8, "unc_pre": 8, "hyp_pre": 8, "neg_post": 8, "unc_post": 8, "hyp_post": 8}
PRE_KINDS = ("neg_pre", "unc_pre", "hyp_pre")
POST_KINDS = ("neg_post", "unc_post", "hyp_post")
LINK_REACH = 3  # words between a link phrase and the diagnosis it introduces
EVIDENCE_CHARS = 400  # longer sentences are quoted around the mention only
MAX_LIST = 12  # mentions one trigger may reach through a list (keeps a run-on 100 KB "sentence" linear)
# Words that end the stretch of text whose severity/location words belong to a mention.
SEPARATORS = frozenset({",", ";", ":", "and", "or", "nor", "with", "without", "plus", "but", "also", "however",
                        "although", "though", "which", "whereas", "while", "except"})
# Words that may stand between two mentions of one finding ("atelectasis versus infiltrate").
COORDINATORS = frozenset({"and", "or", "nor", "versus", "vs", "either", "xxxx"})
LIST_WORDS = frozenset({"or", "nor"})
CONJUNCTIONS = frozenset({"and", "or", "nor"})

_TOKEN = re.compile(r"[a-z0-9]+|[,;:]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")
# An upper-case heading and its colon, at the start of a line or after a sentence ("... FINDINGS: ...").
_HEADING = re.compile(r"(?:^|(?<=[\s.;]))([A-Z][A-Z/&() -]{2,40}?):(?=\s|$)")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(mm|cm)\b")
_WINDOW = re.compile(r"\|\s*window\s*=\s*(\d+)\s*$")


class RulesError(UserError, ValueError):
    """A rules folder with a missing or malformed file (names the file and line)."""


# --------------------------------------------------------------------------- the rule files


@dataclass(frozen=True)
class Trigger:
    kind: str  # neg_pre | neg_post | unc_pre | unc_post | hyp_pre | hyp_post | pseudo | term | link
    window: int | None


@dataclass(frozen=True)
class Pattern:
    category: str | None  # None: an `ignore` pattern that only swallows what it matches
    regex: re.Pattern
    negated: bool


@dataclass(frozen=True)
class RuleSet:
    """The phrase lists and patterns of one rules folder, with the text they came from."""

    triggers: dict[str, list[Trigger]]  # normalised phrase -> triggers
    patterns: tuple[Pattern, ...]
    skip_sections: frozenset[str]
    texts: dict[str, str]  # file name -> text (for the identity hash)


def _read_phrase_file(path: Path) -> list[tuple[str, int | None]]:
    if not path.exists():
        raise RulesError(f"{path}: rules phrase file not found (see {path.parent / 'README.md'})")
    entries = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        window = None
        m = _WINDOW.search(line)
        if m:
            window = int(m.group(1))
            line = line[: m.start()].strip()
        elif "|" in line:
            raise RulesError(f"{path}:{n}: expected 'phrase' or 'phrase | window=N', got {raw!r}")
        phrase = normalize_text(line)
        if not phrase:
            raise RulesError(f"{path}:{n}: empty phrase")
        entries.append((phrase, window))
    return entries


def load_rules(rules_dir: str | Path, vocabulary: Vocabulary) -> RuleSet:
    """Read and check a rules folder against the vocabulary its patterns name."""
    rules_dir = Path(rules_dir)
    texts: dict[str, str] = {}
    triggers: dict[str, list[Trigger]] = {}
    for kind, name in TRIGGER_FILES.items():
        path = rules_dir / name
        for phrase, window in _read_phrase_file(path):
            triggers.setdefault(phrase, []).append(Trigger(kind, window))
        texts[name] = path.read_text()
    skip_path = rules_dir / "skip_sections.txt"
    skip = frozenset(p.upper() for p, _ in _read_phrase_file(skip_path))
    texts[skip_path.name] = skip_path.read_text()
    pattern_path = rules_dir / "patterns.yaml"
    if not pattern_path.exists():
        raise RulesError(f"{pattern_path}: rules pattern file not found")
    texts[pattern_path.name] = pattern_path.read_text()
    try:
        spec = yaml.safe_load(texts[pattern_path.name]) or {}
    except yaml.YAMLError as exc:
        raise RulesError(f"{pattern_path}: not valid YAML: {exc}") from None
    shorthands = spec.get("shorthands") or {}
    patterns = []
    for i, entry in enumerate(spec.get("patterns") or []):
        where = f"{pattern_path}: patterns[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("pattern"), str):
            raise RulesError(f"{where} needs 'category' (or 'ignore: true') and 'pattern'")
        unknown = set(entry) - {"category", "pattern", "negated", "ignore"}
        if unknown:
            raise RulesError(f"{where}.{sorted(unknown)[0]}: unknown key")
        category = entry.get("category")
        if entry.get("ignore"):
            if category is not None:
                raise RulesError(f"{where}: an 'ignore' pattern names no category")
        elif category not in vocabulary.info:
            raise RulesError(f"{where}.category: '{category}' is not a category of {vocabulary.path}")
        source = entry["pattern"]
        for key, value in shorthands.items():
            source = source.replace("{" + key + "}", value)
        try:
            regex = re.compile(source)
        except re.error as exc:
            raise RulesError(f"{where}.pattern: not a valid regular expression ({exc})") from None
        patterns.append(Pattern(category, regex, bool(entry.get("negated", False))))
    return RuleSet(triggers, tuple(patterns), skip, texts)


# --------------------------------------------------------------------------- one sentence


@dataclass
class _Span:
    """A run of tokens ``[start, end)`` that the phrase table (or a pattern) recognised."""

    start: int
    end: int
    category: str | None = None  # a mention of this category
    negated: bool = False  # a pattern stating normality
    triggers: tuple[Trigger, ...] = ()
    severity: dict[str | None, str] = field(default_factory=dict)  # category (None: any) -> level
    place: Place | None = None
    size_mm: float | None = None


@dataclass
class _Context:
    """What the words around one mention say about it (``[lo, hi)``: those words' tokens)."""

    severity: str | None
    place: Place
    lo: int
    hi: int
    graders: list  # spans with a severity word or a size, nearest first
    severity_before: bool  # the severity word came before the mention ("mild A and B")


@dataclass
class _Mention:
    category: str
    order: tuple[int, int]  # (sentence, token) for stable output order
    negated: bool
    uncertain: bool
    severity: str | None
    place: Place
    evidence: str


class _Table:
    """Phrase -> what it is (mention, trigger, severity word, location word), for one longest-match scan."""

    def __init__(self, vocabulary: Vocabulary, rules: RuleSet):
        entries: dict[str, dict[str, Any]] = {}

        def entry(phrase: str) -> dict[str, Any]:
            return entries.setdefault(phrase, {"category": None, "triggers": [], "severity": {}, "place": None})

        for phrase, category in vocabulary.mention_phrases.items():
            if vocabulary.info[category].group == "no finding":
                continue  # "no acute disease" must leave its "no" to the negation of what follows
            entry(phrase)["category"] = category
        for phrase, triggers in rules.triggers.items():
            entry(phrase)["triggers"].extend(triggers)
        for phrase, level in vocabulary.severity_phrases.items():
            entry(phrase)["severity"][None] = level
        for name, info in vocabulary.info.items():
            for phrase, level in info.severity_words.items():
                entry(phrase)["severity"][name] = level
        for phrase, place in vocabulary.location_phrases.items():
            entry(phrase)["place"] = place
        for phrase, e in entries.items():
            if e["category"] is not None and e["place"] is None:
                # "prominent hila", "bibasilar atelectasis": a mention phrase keeps the place it names
                place = vocabulary.place_of(phrase)
                e["place"] = place if place.canonical else None
        self.entries = entries
        self.max_words = max(len(p.split()) for p in entries)


def _tokenise(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(text)]


class RulesExtractor:
    """Deterministic lexicon + negation/uncertainty extractor (``llm.provider: rules``)."""

    provider = "rules"

    def __init__(self, model: str = "rules-v1", vocabulary: Vocabulary | None = None,
                 rules_dir: Path = DEFAULT_RULES_DIR):
        self.model = model
        self.vocabulary = vocabulary if vocabulary is not None else load_vocabulary()
        self.rules_dir = Path(rules_dir)
        self.rules = load_rules(self.rules_dir, self.vocabulary)
        self._table = _Table(self.vocabulary, self.rules)

    # ------------------------------------------------------------------ protocol

    def identity(self) -> dict[str, Any]:
        """Provider, model and a hash of the vocabulary, every rules file and this code (the cache key)."""
        digest = hashlib.sha256(self.vocabulary.fingerprint.encode())
        for code in _CODE:
            digest.update(code.read_bytes())
        for name in sorted(self.rules.texts):
            digest.update(name.encode() + b"\0" + self.rules.texts[name].encode() + b"\0")
        return {"provider": self.provider, "model": self.model, "rules_sha256": digest.hexdigest()}

    async def extract(self, report: str) -> Answer:
        start = time.perf_counter()
        findings = self.extract_report(report)
        return Answer(findings=findings, raw_text=findings_to_json(findings),
                      latency_s=time.perf_counter() - start)

    async def aclose(self) -> None:
        return None

    # ------------------------------------------------------------------ the work

    def extract_report(self, report: str) -> list[Finding]:
        """All findings of one report, one per mention, restatements folded in (the module docstring)."""
        mentions: list[_Mention] = []
        for k, sentence in enumerate(self.sentences(report)):
            mentions.extend(self._read_sentence(sentence, k))
        return self._merge(mentions)

    def sentences(self, report: str | None) -> list[str]:
        """The sentences of the report's readable sections, in order.

        Headings are found anywhere (``INDICATION: ... FINDINGS: ...`` on one line too);
        the text under a heading of ``skip_sections.txt`` is not read.
        """
        if not report or not report.strip():
            return []
        out = []
        heading, pos = "", 0
        bodies = []
        for m in _HEADING.finditer(report):
            name = " ".join(m.group(1).split())
            if name == "XXXX":  # Open-i's anonymisation token, not a heading
                continue
            bodies.append((heading, report[pos:m.start()]))
            heading, pos = name, m.end()
        bodies.append((heading, report[pos:]))
        for heading, body in bodies:
            if heading in self.rules.skip_sections:
                continue
            for sentence in _SENTENCE_END.split(body):
                sentence = " ".join(sentence.split())
                if sentence.strip(" .;,"):
                    out.append(sentence)
        return out

    def _scan(self, tokens: list[tuple[str, int, int]]) -> list[_Span]:
        table, max_words = self._table.entries, self._table.max_words
        spans = []
        i, n = 0, len(tokens)
        while i < n:
            if not tokens[i][0][0].isalnum():
                i += 1
                continue
            words = []
            match = None
            for j in range(i, min(n, i + max_words)):
                w = tokens[j][0]
                if not w[0].isalnum():
                    break
                words.append(w)
                e = table.get(" ".join(words))
                if e is not None:
                    match = (j + 1, e)
            if match is None:
                i += 1
                continue
            end, e = match
            spans.append(_Span(i, end, e["category"], False, tuple(e["triggers"]), dict(e["severity"]), e["place"]))
            i = end
        return spans

    def _apply_patterns(self, lowered: str, tokens: list[tuple[str, int, int]], spans: list[_Span]) -> list[_Span]:
        starts = [t[1] for t in tokens]
        found = []
        for pattern in self.rules.patterns:
            for m in pattern.regex.finditer(lowered):
                a = _first_token_at_or_after(starts, m.start())
                b = _first_token_at_or_after(starts, m.end())
                if b > a:
                    found.append(_Span(a, b, pattern.category, pattern.negated))
        if not found:
            return spans
        found_mentions = [p for p in found if p.category is not None]
        kept = []
        for s in spans:
            # a statement of normality only stands in for its own category ("lungs are hyperexpanded
            # and clear" keeps its hyperinflation); any other pattern owns every word it matched
            if any(s.start < p.end and p.start < s.end and (not p.negated or s.category == p.category)
                   for p in found):
                if s.severity or s.place is not None:  # words inside a pattern still grade and place it
                    kept.append(_Span(s.start, s.end, None, False, (), s.severity, s.place))
                continue
            kept.append(s)
        return sorted(kept + found_mentions, key=lambda s: (s.start, s.end))

    def _read_sentence(self, sentence: str, k: int) -> list[_Mention]:
        lowered = sentence.lower()
        tokens = _tokenise(lowered)
        if not tokens:
            return []
        spans = self._apply_patterns(lowered, tokens, self._scan(tokens))
        starts = [t[1] for t in tokens]
        for m in _SIZE.finditer(lowered):
            unit = 10.0 if m.group(2) == "cm" else 1.0
            at = _first_token_at_or_after(starts, m.start())
            spans.append(_Span(at, at + 1, size_mm=float(m.group(1)) * unit))
        spans.sort(key=lambda s: (s.start, s.end))
        mentions = [s for s in spans if s.category is not None]
        if not mentions:
            return []

        # clause of every token: a new clause at each semicolon/colon and terminator phrase
        clause = [0] * (len(tokens) + 1)
        cuts = {i for i, t in enumerate(tokens) if t[0] in (";", ":")}
        cuts.update(s.start for s in spans if any(t.kind == "term" for t in s.triggers))
        c = 0
        for i in range(len(tokens)):
            if i in cuts:
                c += 1
            clause[i] = c
        clause[len(tokens)] = c + 1
        words_between = _word_counter(tokens)

        mention_starts = [m.start for m in mentions]
        last_list: dict[int, int] = {}
        for i, t in enumerate(tokens):
            if t[0] in LIST_WORDS:
                last_list[clause[i]] = i
        pre: dict[int, tuple[int, str]] = {}  # mention index -> (trigger end, kind) of the nearest pre-trigger
        post: dict[int, tuple[int, str]] = {}
        for span in spans:
            for trig in span.triggers:
                if trig.kind in PRE_KINDS:
                    self._reach_forward(span, trig, mentions, mention_starts, tokens, clause, words_between,
                                        last_list, pre)
                elif trig.kind in POST_KINDS:
                    self._reach_backward(span, trig, mentions, mention_starts, tokens, clause, words_between, post)

        span_starts = [s.start for s in spans]
        contexts = [self._context(m, idx, mentions, spans, span_starts, tokens) for idx, m in enumerate(mentions)]
        self._share_attributes(mentions, contexts, spans, span_starts, tokens, words_between)
        severities = [c.severity for c in contexts]
        places = [c.place for c in contexts]

        out: list[_Mention] = []
        for idx, m in enumerate(mentions):
            kinds = {pre[idx][1][:3]} if idx in pre else set()
            if idx in post:
                kinds.add(post[idx][1][:3])
            if "hyp" in kinds and not m.negated:
                continue  # "evaluate for pneumonia": a question, not a finding of this patient
            uncertain = "unc" in kinds
            negated = m.negated or ("neg" in kinds and not uncertain)
            out.append(_Mention(m.category, (k, m.start), negated, uncertain and not m.negated,
                                severities[idx], places[idx], _evidence(sentence, tokens, m)))
        return out

    def _share_attributes(self, mentions, contexts, spans, span_starts, tokens, words_between) -> None:
        """Let mentions that describe one finding share what only one of them states.

        Coordinated or apposed mentions ("left base atelectasis/infiltrate", "opacity at the
        left base, atelectasis versus pneumonia") share a location both ways, and a severity
        word before the first of "A and B" grades both. A diagnosis introduced by a link
        ("multifocal opacities, consistent with COVID-19") or a colon takes the finding's
        location and severity words, graded on its own scale.
        """
        info = self.vocabulary.info
        n = len(mentions)
        gaps = [()] + [tuple(t[0] for t in tokens[contexts[i - 1].hi:contexts[i].lo]) for i in range(1, n)]
        coordinated = [False] + [all(not w[0].isalnum() or w in COORDINATORS for w in gaps[i]) for i in range(1, n)]
        linked = [False] + [self._linked(mentions[i], spans, span_starts, words_between) or gaps[i] == (":",)
                            for i in range(1, n)]
        for i in range(1, n):
            c, prev = contexts[i], contexts[i - 1]
            if linked[i]:
                if c.severity is None:
                    c.severity = next((lvl for p in reversed(contexts[:i])
                                       if (lvl := self._grade(p.graders, mentions[i].category))), None)
                if c.place.canonical is None:
                    source = next((p.place for p in reversed(contexts[:i]) if p.place.canonical), Place())
                    c.place = source.at_detail(info[mentions[i].category].location_detail)
            elif coordinated[i]:
                if c.place.canonical is None:
                    c.place = prev.place.at_detail(info[mentions[i].category].location_detail)
                if c.severity is None and prev.severity_before and gaps[i] in (("and",), ("or",)):
                    c.severity = self._grade(prev.graders, mentions[i].category)
        for i in range(n - 1, 0, -1):
            c, prev = contexts[i], contexts[i - 1]
            if (coordinated[i] or gaps[i] == (":",)) and prev.place.canonical is None:
                prev.place = c.place.at_detail(info[mentions[i - 1].category].location_detail)
            if gaps[i] == (":",) and prev.severity is None:
                prev.severity = self._grade(c.graders, mentions[i - 1].category)

    def _reach_forward(self, span, trig, mentions, starts, tokens, clause, words_between, last_list, found) -> None:
        window = trig.window if trig.window is not None else DEFAULT_WINDOW[trig.kind]
        c = clause[span.start]
        # A first hop may cross a comma in a list ("no A, B, or C") or after a lone adjective
        # ("no acute, displaced fracture"), not after a whole object ("no acute abnormality, scoliosis").
        list_ok = last_list.get(c, -1) >= span.end
        if not list_ok:
            comma = next((i for i in range(span.end, min(len(tokens), span.end + 3)) if not tokens[i][0][0].isalnum()),
                         None)
            list_ok = comma is not None and words_between(span.end, comma)[0] <= 1
        cursor, first = span.end, True
        first_idx = bisect_left(starts, span.end)
        for idx in range(first_idx, min(len(mentions), first_idx + MAX_LIST)):
            m = mentions[idx]
            if clause[m.start] != c:
                break
            gap_words, gap_punct = words_between(cursor, m.start)
            if gap_words > window or (gap_punct and first and not list_ok):
                break
            if idx not in found or _outranks((span.end, trig.kind), found[idx]):
                found[idx] = (span.end, trig.kind)
            cursor, first = m.end, False

    def _reach_backward(self, span, trig, mentions, starts, tokens, clause, words_between, found) -> None:
        window = trig.window if trig.window is not None else DEFAULT_WINDOW[trig.kind]
        c = clause[span.start]
        cursor, first, conj_seen = span.start, True, False
        last_idx = bisect_left(starts, span.start) - 1
        for idx in range(last_idx, max(-1, last_idx - MAX_LIST), -1):
            m = mentions[idx]
            if m.end > span.start:
                continue
            if clause[m.start] != c:
                break
            gap_words, gap_punct = words_between(m.end, cursor)
            # "A, B and C are not seen": commas are crossed only once a conjunction showed a list
            conj_seen = conj_seen or any(tokens[i][0] in CONJUNCTIONS for i in range(m.end, cursor))
            if gap_words > window or (gap_punct and (first or not conj_seen)):
                break
            if idx not in found or found[idx][0] > span.start:
                found[idx] = (span.start, trig.kind)
            cursor, first = m.start, False

    def _context(self, m: _Span, idx: int, mentions: list[_Span], spans: list[_Span], span_starts: list[int],
                  tokens: list[tuple[str, int, int]]) -> "_Context":
        """Severity and place from the words around a mention, up to the next separator or mention."""
        lo = mentions[idx - 1].end if idx > 0 else 0
        i = m.start
        while i > lo and tokens[i - 1][0] not in SEPARATORS:
            i -= 1
        hi = mentions[idx + 1].start if idx + 1 < len(mentions) else len(tokens)
        j = m.end
        while j < hi and tokens[j][0] not in SEPARATORS:
            j += 1
        near = spans[bisect_left(span_starts, i):bisect_left(span_starts, j)]
        inside = [s for s in near if m.start <= s.start < m.end and s is not m]
        before = [s for s in near if s.start < m.start]
        after = [s for s in near if s.start >= m.end]
        # nearest first: inside the mention, then the words just before it, then after it
        graders = [s for s in inside + before[::-1] + after if s.severity or s.size_mm is not None]
        severity = self._grade(graders, m.category)
        if severity is None and self.vocabulary.info[m.category].size_mm is not None:
            # "multiple nodules ..., the largest measuring 1.3 cm": a size anywhere in the sentence
            # grades the only size-graded mention in it
            graded = [x for x in mentions if self.vocabulary.info[x.category].size_mm is not None]
            if len(graded) == 1:
                severity = self._grade([s for s in spans if s.size_mm is not None], m.category)
        place = combine_places(s.place for s in [m] + inside + before + after if s.place is not None)
        severity_before = severity is not None and any(
            (s.severity.get(m.category) or s.severity.get(None)) for s in before)
        return _Context(severity, place.at_detail(self.vocabulary.info[m.category].location_detail), i, j,
                        graders, severity_before)

    def _grade(self, graders: list[_Span], category: str) -> str | None:
        """The first severity word that grades ``category``, else the largest size it grades by."""
        for s in graders:
            level = s.severity.get(category) or s.severity.get(None)
            if level:
                return level
        bounds = self.vocabulary.info[category].size_mm
        sizes = [s.size_mm for s in graders if s.size_mm is not None]
        return grade_size(max(sizes), bounds) if bounds is not None and sizes else None

    @staticmethod
    def _linked(m: _Span, spans: list[_Span], span_starts: list[int], words_between) -> bool:
        """Whether a link phrase ("consistent with", "due to") comes just before this mention."""
        lo = bisect_left(span_starts, m.start - LINK_REACH - 4)
        for s in spans[lo:bisect_left(span_starts, m.start)]:
            if s.end <= m.start and any(t.kind == "link" for t in s.triggers):
                if words_between(s.end, m.start)[0] <= LINK_REACH:
                    return True
        return False

    def _merge(self, mentions: list[_Mention]) -> list[Finding]:
        """One finding per mention, in report order; a mention that restates a kept one is folded in.

        A stated or hedged mention restates a kept finding of its category, stated or hedged,
        when both name the same place or one names none (the IMPRESSION's "two pulmonary
        nodules" after two located nodules): the kept finding takes what it lacked (a place, a
        severity, certainty) and keeps its own evidence; places meet when side and zone each agree
        or are unnamed on one side ("perihilar" and "bilateral perihilar"). Mentions at different places stay
        separate findings ("a nodule in the right upper lobe ... a second nodule in the left lower
        lobe"). A negation yields to a stated or hedged mention of its category at the same place
        or with no place on either side ("no effusion ... small effusion": the finding stands), and
        stays a finding of its own elsewhere ("no right effusion; small left effusion").
        """
        kept: list[dict[str, Any]] = []
        for m in sorted(mentions, key=lambda m: m.order):
            rank = _rank(m)
            same = [f for f in kept if f["category"] == m.category and _places_meet(f["place"], m.place)]
            if rank == 2:
                if not same:
                    kept.append(_kept(m))
                continue
            for f in [f for f in same if f["rank"] == 2]:
                kept.remove(f)  # a stated finding overrules a negation of the same place
            stated = [f for f in same if f["rank"] < 2]
            if not stated:
                kept.append(_kept(m))
                continue
            exact = [f for f in stated if f["place"] == m.place]
            f = (exact or stated)[0]
            if len(stated) == 1 or exact:  # one finding it can restate: it may make that one more precise
                f["place"] = Place(f["place"].side or m.place.side, f["place"].zone or m.place.zone)
                f["severity"] = f["severity"] or m.severity
            if rank < f["rank"]:  # the hedge is confirmed: the finding now rests on this mention
                f["rank"], f["evidence"] = rank, _squeeze(m.evidence)
        return [Finding(category=f["category"], severity=f["severity"], location=f["place"].canonical,
                        negated=f["rank"] == 2, uncertain=f["rank"] == 1, evidence=f["evidence"])
                for f in kept]


def _kept(m: _Mention) -> dict[str, Any]:
    return {"category": m.category, "severity": m.severity, "place": m.place, "rank": _rank(m),
            "evidence": _squeeze(m.evidence)}


def _squeeze(text: str) -> str:
    return " ".join(text.split())


def _places_meet(a: Place, b: Place) -> bool:
    """Whether two mentions may be one finding by place: side and zone each the same or unnamed on
    one side ("perihilar edema" and "bilateral perihilar edema"; "a nodule" and "a right upper lobe nodule")."""
    return all(x is None or y is None or x == y for x, y in ((a.side, b.side), (a.zone, b.zone)))


def _outranks(new: tuple[int, str], old: tuple[int, str]) -> bool:
    """Which of two pre-triggers reaching a mention decides it: a negation over a hedge it spans
    ("no developing opacity or pneumothorax", "no pleural line to suggest pneumothorax"), else the nearest."""
    if new[1] == "neg_pre" and old[1] == "unc_pre":
        return True
    if new[1] == "unc_pre" and old[1] == "neg_pre":
        return False
    return new[0] > old[0]


def _evidence(sentence: str, tokens: list[tuple[str, int, int]], m: _Span) -> str:
    """The sentence, or a window of it around the mention when a run-on "sentence" is very long."""
    if len(sentence) <= EVIDENCE_CHARS:
        return sentence
    a = max(0, tokens[m.start][1] - EVIDENCE_CHARS // 2)
    return sentence[a:tokens[m.end - 1][2] + EVIDENCE_CHARS // 2]


def _rank(m: _Mention) -> int:
    """0: stated, 1: hedged, 2: negated -- the lowest wins when a category is mentioned twice."""
    return 2 if m.negated else 1 if m.uncertain else 0


def _first_token_at_or_after(starts: list[int], char: int) -> int:
    lo, hi = 0, len(starts)
    while lo < hi:
        mid = (lo + hi) // 2
        if starts[mid] < char:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _word_counter(tokens: list[tuple[str, int, int]]):
    """(words, has punctuation) between two token positions, in O(1) via prefix sums."""
    words = [0]
    punct = [0]
    for t in tokens:
        is_word = t[0][0].isalnum()
        words.append(words[-1] + is_word)
        punct.append(punct[-1] + (not is_word))

    def between(a: int, b: int) -> tuple[int, bool]:
        if b <= a:
            return 0, False
        return words[b] - words[a], punct[b] > punct[a]

    return between

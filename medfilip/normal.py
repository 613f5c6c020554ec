"""Explicit normal statements ("No acute cardiopulmonary process.", "Normal chest.") in report text.

Extractors leave such statements out of their findings, yet they are what entitles a study
with no finding to the normal label. The phrases live in
``data/knowledge/normal_statements.txt`` and are matched with the vocabulary's phrase scanner,
sentence by sentence, in the text the extractor read (:func:`medfilip.extract.text.report_text`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from medfilip.errors import UserError
from medfilip.vocab import normalize_text, scan_first

DEFAULT_NORMAL_STATEMENTS = Path(__file__).resolve().parents[1] / "data" / "knowledge" / "normal_statements.txt"

_SENTENCE_END = re.compile(r"[.!?\n]+")


class NormalStatementsError(UserError, ValueError):
    """A normal-statement phrase file that cannot be used: names the file and line."""


@dataclass(frozen=True)
class NormalStatements:
    """The phrases that declare a study normal, ready for a longest-match scan."""

    path: Path
    phrases: dict[str, str]  # normalised phrase -> itself (the scanner returns the match)
    max_words: int

    def find(self, text: str | None) -> str | None:
        """The first normal statement in ``text`` (normalised), or None; sentences never run together."""
        for sentence in _SENTENCE_END.split(text or ""):
            match = scan_first(normalize_text(sentence).split(), self.phrases, self.max_words)
            if match is not None:
                return match
        return None


def load_normal_statements(path: str | Path = DEFAULT_NORMAL_STATEMENTS) -> NormalStatements:
    """Read a phrase file: one phrase a line, ``#`` comments; an empty file is refused."""
    path = Path(path)
    if not path.exists():
        raise NormalStatementsError(
            f"{path}: normal-statement phrase file not found (explain.normal_statements; "
            "the default ships as data/knowledge/normal_statements.txt)"
        )
    phrases: dict[str, str] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        phrase = normalize_text(line)
        if not phrase:
            raise NormalStatementsError(f"{path}:{n}: {raw!r} has no words left after normalising")
        phrases[phrase] = phrase
    if not phrases:
        raise NormalStatementsError(f"{path}: no phrases; without them only all-negated studies get the normal label")
    return NormalStatements(path, phrases, max(len(p.split()) for p in phrases))

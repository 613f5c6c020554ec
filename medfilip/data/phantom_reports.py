"""Free-text radiology reports for phantom studies, written from the study's findings.

Wording comes from ``data/phantom/report_phrases.yaml`` (synonyms, severity words,
location phrasings, sentence frames); this module only decides which phrase to use and
in what order, so that an extractor meets the variety of real reports: synonyms,
hedges, negations, comparisons with a prior study, several findings in one sentence.

Invariants the truth table relies on: every finding is stated with its severity and
side; uncertain findings are hedged (and still rendered, mildly); negations name only
categories that are absent; covid-19 wording appears only in reports of covid-19 studies.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import yaml

from medfilip.data.phantom_findings import Finding, StudyPlan
from medfilip.errors import UserError

DEFAULT_PHRASES = Path(__file__).resolve().parents[2] / "data" / "phantom" / "report_phrases.yaml"
_REQUIRED = ("severity", "locations", "categories", "lobes", "devices", "frames", "normal", "headers", "numbers")

# Categories a "No ..." sentence may name when they are absent (ordered as radiologists list them).
_NEGATABLE = ("consolidation", "pleural effusion", "pneumothorax", "pulmonary edema")
_LUNG = ("pleural effusion", "pneumothorax", "consolidation", "pulmonary edema", "atelectasis", "nodule",
         "emphysema", "covid-19")


class PhraseError(UserError, ValueError):
    """The report phrase file is missing or malformed (names the file and the key)."""


@functools.lru_cache(maxsize=4)
def load_phrases(path: str | Path = DEFAULT_PHRASES) -> dict:
    """Read and check the phrase tables (cached: reports are written by the thousand)."""
    path = Path(path)
    if not path.exists():
        raise PhraseError(f"{path}: report phrase file not found (it ships with medfilip under data/phantom/)")
    data = yaml.safe_load(path.read_text()) or {}
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise PhraseError(f"{path}: missing top-level key '{missing[0]}' (expected {', '.join(_REQUIRED)})")
    from medfilip.data.phantom_findings import CATEGORIES

    for cat in CATEGORIES:
        if cat != "support device" and cat not in data["categories"]:
            raise PhraseError(f"{path}: categories.{cat} is missing")
    return data


def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(next_word: str) -> str:
    w = next_word.lower()
    if w[:1].isdigit():  # "an 8 mm", "an 11 mm", "a 1.6 cm"
        return "an" if re.match(r"(8|11|18)(\D|$)|8\d", w) else "a"
    return "an" if w[:1] in "aeiou" else "a"


def _tidy(text: str) -> str:
    """Collapse blanks left by empty phrases, fix articles and spacing before punctuation."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([.,;:])", r"\1", text)

    def art(m: re.Match) -> str:
        a = _article(m.group(2))
        return (a.capitalize() if m.group(1).isupper() else a) + " " + m.group(2)

    text = re.sub(r"\{([aAb])\} (\S+)", art, text)
    return text


def _articles(text: str, first: bool, second: bool) -> str:
    """Drop the {a}/{A} ({b}) article slot of a mass-noun (or plural) phrase."""
    if not first:
        text = text.replace("{a} ", "").replace("{A} ", "")
    if not second:
        text = text.replace("{b} ", "")
    return text


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _size_text(mm: float) -> str:
    return f"{round(mm)} mm" if mm < 10 else f"{mm / 10:.1f} cm"


class ReportWriter:
    """Writes one report per study from phrase tables; all choices come from ``rng``."""

    def __init__(self, phrases: dict, rng: np.random.Generator):
        self.p = phrases
        self.rng = rng
        self.has_prior = False

    def pick(self, options):
        return _choice(self.rng, options)

    # ------------------------------------------------------------------ noun phrases
    def _vars(self, f: Finding, with_severity: bool = True) -> dict:
        sev_table = self.p["severity"].get(f.category, {})
        default = self.p["severity"]["default"]
        v = {"sev": "", "adv": "", "loc": "", "pp": "", "side": f.side or "", "size": "", "count": "", "lobe": ""}
        if f.severity and with_severity:
            words = {**default[f.severity], **sev_table.get(f.severity, {})}
            v["sev"] = self.pick(words["adj"])
            v["adv"] = self.pick(words.get("adv", default[f.severity]["adv"]))
        if f.location:
            loc = self.p["locations"][f.location]
            v["loc"], v["pp"] = self.pick(loc["loc"]), self.pick(loc["pp"])
            v["lobe"] = self.p["lobes"].get(f.location, "")
        if f.size_mm:
            v["size"] = _size_text(f.size_mm)
            v["count"] = self.p["numbers"][min(f.count, len(self.p["numbers"]) - 1)]
        return v

    def _usable(self, template: str, f: Finding) -> bool:
        if "{side}" in template and f.side not in ("left", "right"):
            return False
        if "{lobe}" in template and not self.p["lobes"].get(f.location):
            return False
        return True

    def _templates(self, f: Finding, key: str) -> list[str]:
        entry = self.p["categories"][f.category]
        by_sev = entry.get(f"{key}_by_severity", {})
        if key == "np":
            if f.category == "nodule" and f.count > 1:
                return entry["multiple_np"]
            if f.side == "bilateral" and "bilateral_np" in entry:
                return entry["bilateral_np"]
        options = by_sev.get(f.severity, entry.get(key, []))
        return [t for t in options if self._usable(t, f)]

    def noun_phrase(self, f: Finding, with_severity: bool = True) -> str:
        template = self.pick(self._templates(f, "np"))
        return _tidy(template.format(**self._vars(f, with_severity)))

    # ------------------------------------------------------------------ sentences
    def countable(self, f: Finding) -> bool:
        entry = self.p["categories"][f.category]
        return bool(entry.get("countable")) and f.side != "bilateral" and f.count == 1

    def _fitting(self, frames: list[str], np_text: str) -> list[str]:
        """A phrase with its own comma ('…, the largest measuring 1.3 cm') must end the sentence."""
        if "," not in np_text:
            return frames
        return [t for t in frames if t.endswith(("{np}.", "{NP}."))] or ["{NP}."]

    def _frame(self, frame: str, f: Finding, np_text: str, f2: Finding | None = None, np2: str = "") -> str:
        text = frame.replace("{NP}", _cap(np_text)).replace("{np}", np_text).replace("{np2}", np2)
        return _cap(_tidy(_articles(text, self.countable(f), f2 is not None and self.countable(f2))))

    def finding_sentence(self, f: Finding) -> str:
        """The FINDINGS statement of one finding: hedged, compared with the prior, or plain."""
        frames = self.p["frames"]
        np_text = self.noun_phrase(f)
        if f.uncertain:
            return self._frame(self.pick(self._fitting(frames["uncertain"], np_text)), f, np_text)
        if f.change in ("unchanged", "increased", "decreased") and self.rng.random() < 0.8:
            return self._frame(self.pick(self._fitting(frames[f.change], np_text)), f, np_text)
        if f.change is None and self.has_prior and self.rng.random() < 0.3:
            return self._frame(self.pick(self._fitting(frames["new"], np_text)), f, np_text)
        sentences = self._templates(f, "sentences")
        if sentences and self.rng.random() < 0.35:
            v = self._vars(f)
            text = self.pick(sentences).replace("{Sev}", _cap(v["sev"]))
            return _cap(_tidy(_articles(text.format(**v, A="{A}", a="{a}"), self.countable(f), False)))
        return self._frame(self.pick(self._fitting(frames["positive"], np_text)), f, np_text)

    def pair_sentence(self, f1: Finding, f2: Finding) -> str:
        np1, np2 = self.noun_phrase(f1), self.noun_phrase(f2)
        if "," in np1 + np2:
            return self._frame("{NP}. {np2}.", f1, np1, f2, _cap(np2))
        return self._frame(self.pick(self.p["frames"]["positive_pair"]), f1, np1, f2, np2)

    def impression_item(self, f: Finding) -> str:
        if f.category == "support device":
            dev = self.p["devices"]
            if len(f.devices) == 1 and self.rng.random() < 0.6:
                return self.pick(dev[f.devices[0]]["impression"])
            return self.pick(dev["any_impression"])
        np_text = self.noun_phrase(f)
        if f.uncertain:
            return self._frame(self.pick(self._fitting(self.p["frames"]["uncertain"], np_text)), f, np_text)
        if f.change in ("increased", "decreased") and self.rng.random() < 0.5:
            return self._frame(self.pick(self._fitting(self.p["frames"][f.change], np_text)), f, np_text)
        template = self.pick(self.p["categories"][f.category]["impression"])
        return self._frame(template, f, np_text)

    def device_sentences(self, f: Finding) -> list[str]:
        out = []
        for device in f.devices:
            text = self.pick(self.p["devices"][device]["findings"])
            out.append(text.format(cm=int(self.rng.integers(3, 7))))
        return out

    def negation(self, absent: list[str], tail: bool = False) -> str:
        """'No A, B or C.' over absent categories (tail: ' without A or B.' to end a sentence)."""
        names = [self.pick(self.p["categories"][c]["negated"]) for c in absent]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        key = "negative_tail" if tail else "negative_list"
        return self.pick(self.p["frames"][key]).replace("{list}", listed)

    def resolved_sentence(self, f: Finding) -> str:
        np_text = self.noun_phrase(f, with_severity=False)
        return self._frame(self.pick(self._fitting(self.p["frames"]["resolved"], np_text)), f, np_text)

    # ------------------------------------------------------------------ the report
    def write(self, plan: StudyPlan) -> str:
        rng, p = self.rng, self.p
        findings = list(plan.findings)
        cats = {f.category for f in findings}
        has_prior = self.has_prior = plan.study_index > 1

        body: list[str] = []
        technique = self.pick(p["headers"]["technique"])
        devices = [f for f in findings if f.category == "support device"]
        for f in devices:
            body.extend(self.device_sentences(f))
        heart = [f for f in findings if f.category == "cardiomegaly"]
        if heart:
            body.append(self.finding_sentence(heart[0]))
        elif rng.random() < 0.85:
            body.append(self.pick(p["normal"]["heart"]))
        if rng.random() < 0.25 and not any("mediastin" in b for b in body):
            body.append(self.pick(p["normal"]["mediastinum"]))

        lung = [f for f in findings if f.category in _LUNG]
        order = rng.permutation(len(lung))
        lung = [lung[i] for i in order]
        absent = [c for c in _NEGATABLE if c not in cats]
        negs = [c for c in absent if rng.random() < 0.7]
        statements: list[str] = []
        i = 0
        while i < len(lung):
            f = lung[i]
            plain = not f.uncertain and f.change is None
            if i + 1 < len(lung) and plain and lung[i + 1].change is None and not lung[i + 1].uncertain \
                    and rng.random() < 0.3:
                statements.append(self.pair_sentence(f, lung[i + 1]))
                i += 2
                continue
            statements.append(self.finding_sentence(f))
            i += 1
        if statements and negs and rng.random() < 0.35:
            # "… without pneumothorax." closes the last positive sentence: negation after the positives.
            k = 1 + int(rng.integers(min(len(negs), 2)))
            statements[-1] = statements[-1].rstrip(".") + self.negation(negs[:k], tail=True)
            if not statements[-1].endswith("."):
                statements[-1] += "."
            negs = negs[k:]
        if has_prior and statements and "prior" not in statements[0] and rng.random() < 0.5:
            lead = self.pick(p["headers"]["prior_lead"])
            if lead:
                statements[0] = lead + statements[0][:1].lower() + statements[0][1:]
        body.extend(statements)
        if not lung and rng.random() < 0.85:
            body.append(self.pick(p["normal"]["lungs"]))
        if negs:
            cut = int(rng.integers(len(negs) + 1)) if len(negs) > 1 else len(negs)
            for part in (negs[:cut], negs[cut:]):
                if part:
                    body.append(self.negation(part))
        for f in plan.resolved:
            body.append(self.resolved_sentence(f))
        if rng.random() < 0.5:
            body.append(self.pick(p["normal"]["bones"]))
        if rng.random() < 0.25:  # some radiologists dictate in a different order
            body = [body[i] for i in rng.permutation(len(body))]
        if technique:
            body.insert(0, technique)

        items = [self.impression_item(f) for f in findings if f.category != "support device" or rng.random() < 0.5]
        if not findings or not items:
            items = [self.pick(p["normal"]["impression"])]
        elif "pneumothorax" not in cats and rng.random() < 0.2:
            items.append("No pneumothorax.")
        if len(items) > 1 and rng.random() < 0.4:
            impression = "\n".join(f"{k}. {t}" for k, t in enumerate(items, 1))
        else:
            impression = " ".join(items)

        lines = []
        pre = self.pick(p["headers"]["preamble"])
        if pre:
            lines += [pre, ""]
        if rng.random() < 0.5:
            lines.append(self.pick(p["headers"]["examination"]))
        if rng.random() < 0.6:
            lines.append("INDICATION: " + self.pick(p["headers"]["indication"]))
        if rng.random() < 0.5:
            key = "comparison_prior" if has_prior else "comparison_first"
            lines.append("COMPARISON: " + self.pick(p["headers"][key]))
        if len(lines) > (2 if pre else 0):
            lines.append("")
        lines += ["FINDINGS:", " ".join(body), "", "IMPRESSION:", impression]
        return "\n".join(lines)


def write_report(plan: StudyPlan, rng: np.random.Generator, phrases: dict | None = None) -> str:
    """The radiology report of one planned study."""
    return ReportWriter(phrases if phrases is not None else load_phrases(), rng).write(plan)

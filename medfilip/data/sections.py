"""Split a free-text radiology report into its headed sections (FINDINGS, IMPRESSION, ...)."""

from __future__ import annotations

import re

# A heading is an upper-case phrase at the start of a line followed by a colon,
# e.g. "FINDINGS:", "IMPRESSION:", "COMPARISON:" (MIMIC-CXR, Open-i and most PACS exports).
_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z /&()-]{2,40}):", re.MULTILINE)

FINDINGS_HEADINGS = ("FINDINGS", "FINDING", "FINDINGS AND IMPRESSION")
IMPRESSION_HEADINGS = ("IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS", "SUMMARY")


def split_sections(report: str) -> dict[str, str]:
    """Map each heading (upper-case, stripped) to its text; text before any heading is ''."""
    sections: dict[str, str] = {}
    matches = list(_HEADING.finditer(report))
    if not matches:
        return {"": report.strip()} if report.strip() else {}
    preamble = report[: matches[0].start()].strip()
    if preamble:
        sections[""] = preamble
    for m, nxt in zip(matches, matches[1:] + [None]):
        end = nxt.start() if nxt is not None else len(report)
        name = " ".join(m.group(1).split())
        body = " ".join(report[m.end() : end].split())
        # A repeated heading (addenda) is appended rather than overwritten.
        sections[name] = f"{sections[name]} {body}".strip() if name in sections else body
    return sections


def findings_and_impression(report: str) -> tuple[str | None, str | None]:
    """The FINDINGS and IMPRESSION text of a report, None where the section is absent or empty."""
    sections = split_sections(report)

    def first(names: tuple[str, ...]) -> str | None:
        for name in names:
            if sections.get(name):
                return sections[name]
        return None

    return first(FINDINGS_HEADINGS), first(IMPRESSION_HEADINGS)

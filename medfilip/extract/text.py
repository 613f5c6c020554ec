"""The one text of a study that is extracted, scored and scanned for normal statements.

Several builders would give one report several cache keys (and let the explain stage look at
other words than the extractor read), so every stage calls :func:`report_text`.
"""

from __future__ import annotations

from medfilip.config import ExtractParams


def report_text(row: dict, params: ExtractParams) -> tuple[str, bool]:
    """The text sent for one study and whether it was cut to ``extract.max_report_chars``."""
    text = row.get("report") or ""
    if params.text == "sections":
        parts = [row.get("findings"), row.get("impression")]
        if any(parts):
            text = "\n".join(
                f"{name}: {body}" for name, body in zip(("FINDINGS", "IMPRESSION"), parts) if body
            )
    text = text.strip()
    if len(text) > params.max_report_chars:
        return text[: params.max_report_chars], True
    return text, False

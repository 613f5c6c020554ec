"""The LLM answer schema (ARCHITECTURE.md) and the validator every answer goes through."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Finding:
    """One (severity, location, category) finding of a report, as the extractor stated it."""

    category: str
    severity: str | None = None
    location: str | None = None
    negated: bool = False
    uncertain: bool = False
    evidence: str | None = None

    def to_dict(self) -> dict[str, Any]:
        # Plain dict, not dataclasses.asdict: this runs once per finding per cache write.
        return {
            "severity": self.severity,
            "location": self.location,
            "category": self.category,
            "negated": self.negated,
            "uncertain": self.uncertain,
            "evidence": self.evidence,
        }


_NULLABLE_STRING = {"type": ["string", "null"]}

ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "findings": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "severity": _NULLABLE_STRING,
                    "location": _NULLABLE_STRING,
                    "category": _NULLABLE_STRING,
                    "negated": {"type": "boolean"},
                    "uncertain": {"type": "boolean"},
                    "evidence": _NULLABLE_STRING,
                },
                "required": ["severity", "location", "category", "negated", "uncertain", "evidence"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["findings"],
    "additionalProperties": False,
}

SCHEMA_VERSION = hashlib.sha256(json.dumps(ANSWER_SCHEMA, sort_keys=True).encode()).hexdigest()[:12]


class AnswerError(ValueError):
    """An answer that is not valid JSON of the answer schema (the extractor re-asks)."""


def _opt_str(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise AnswerError(f"{where} must be a string or null, got {type(value).__name__}")
    value = " ".join(value.split())
    return value or None


def _bool(value: Any, where: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise AnswerError(f"{where} must be true or false, got {value!r}")


def validate_answer(payload: Any) -> tuple[list[Finding], int]:
    """Check a decoded answer; return its findings and how many were dropped for lacking a category."""
    if not isinstance(payload, dict) or "findings" not in payload:
        raise AnswerError("answer must be a JSON object with a 'findings' list")
    items = payload["findings"]
    if not isinstance(items, list):
        raise AnswerError("'findings' must be a list")
    findings: list[Finding] = []
    dropped = 0
    for i, item in enumerate(items):
        where = f"findings[{i}]"
        if not isinstance(item, dict):
            raise AnswerError(f"{where} must be an object, got {type(item).__name__}")
        category = _opt_str(item.get("category"), f"{where}.category")
        if category is None:
            dropped += 1
            continue
        findings.append(
            Finding(
                category=category.lower(),
                severity=(_opt_str(item.get("severity"), f"{where}.severity") or None),
                location=(_opt_str(item.get("location"), f"{where}.location") or None),
                negated=_bool(item.get("negated"), f"{where}.negated"),
                uncertain=_bool(item.get("uncertain"), f"{where}.uncertain"),
                evidence=_opt_str(item.get("evidence"), f"{where}.evidence"),
            )
        )
    return findings, dropped


def parse_answer(text: str | None) -> tuple[list[Finding], int]:
    """Decode and validate an answer's text; truncated or non-JSON text is an :class:`AnswerError`."""
    if text is None or not text.strip():
        raise AnswerError("empty answer")
    body = text.strip()
    if body.startswith("```"):  # models like to fence JSON even when asked not to
        body = body.strip("`")
        body = body[4:] if body.lower().startswith("json") else body
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as exc:
        raise AnswerError(f"answer is not valid JSON ({exc.msg} at char {exc.pos}): {body[:80]!r}") from None
    return validate_answer(payload)


def findings_to_json(findings: list[Finding]) -> str:
    """The canonical JSON text of findings (what the cache stores)."""
    return json.dumps({"findings": [f.to_dict() for f in findings]}, sort_keys=True)

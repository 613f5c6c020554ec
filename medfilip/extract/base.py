"""What every extractor (openai, llamacpp, rules) promises the extract stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from medfilip.extract.schema import Finding


@dataclass
class Answer:
    """A validated answer for one report, with what it cost."""

    findings: list[Finding]
    n_dropped: int = 0  # findings the model gave without a category
    raw_text: str = ""  # the model's text (for the audit trail)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    attempts: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class ExtractionFailed(Exception):
    """A report that still has no valid answer after every retry; the message says why."""

    def __init__(self, message: str, attempts: int = 1, latency_s: float = 0.0):
        super().__init__(message)
        self.attempts = attempts
        self.latency_s = latency_s


class Extractor(Protocol):
    provider: str
    model: str

    def identity(self) -> dict[str, Any]:
        """Everything that determines the answer (never a secret): part of the cache key."""

    async def extract(self, report: str) -> Answer:
        """Findings of one report; raises :class:`ExtractionFailed` once retries are spent."""

    async def aclose(self) -> None:
        """Release connections or servers."""

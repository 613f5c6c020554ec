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
    """A report that still has no valid answer after every retry; the message says why.

    ``prompt_tokens``/``completion_tokens`` are what the failed attempts cost (they are
    paid all the same); ``truncated_at`` is the ``llm.max_tokens`` that cut the last
    answer short, when that is why the report failed.
    """

    def __init__(
        self,
        message: str,
        attempts: int = 1,
        latency_s: float = 0.0,
        *,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        truncated_at: int | None = None,
    ):
        super().__init__(message)
        self.attempts = attempts
        self.latency_s = latency_s
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.truncated_at = truncated_at


class Extractor(Protocol):
    """``max_tokens`` (optional; ``None`` or absent: no limit) is the answer-length limit.

    It is not part of :meth:`identity`: a complete answer does not depend on the limit, so
    raising it re-asks only the reports whose answer it cut short.
    """

    provider: str
    model: str

    def identity(self) -> dict[str, Any]:
        """Everything that determines a complete answer (never a secret, never the token limit): the cache key."""

    async def extract(self, report: str) -> Answer:
        """Findings of one report; raises :class:`ExtractionFailed` once retries are spent."""

    async def aclose(self) -> None:
        """Release connections or servers."""

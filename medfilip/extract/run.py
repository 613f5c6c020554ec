"""The extract stage: every report through one extractor, concurrently, cached by content.

Each answer is written to the cache the moment it arrives, so an interrupted run
resumes where it stopped and never pays for an answer twice. Identical report
texts are sent once. Failures are recorded per study, never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from medfilip.config import ExtractParams, LLMParams
from medfilip.extract.base import Answer, ExtractionFailed, Extractor
from medfilip.extract.cache import LLMCache, cache_key
from medfilip.extract.schema import Finding
from medfilip.extract.text import report_text


class ExtractStageFailed(RuntimeError):
    """More reports failed than ``extract.max_failure_fraction`` allows (outputs are saved first)."""


@dataclass
class Outcome:
    """What happened to one study's report."""

    study_id: str
    key: str
    status: str = "ok"  # ok | failed
    findings: list[Finding] = field(default_factory=list)
    n_dropped: int = 0
    error: str | None = None
    source: str = "llm"  # llm (paid this run) | cache | duplicate (same text earlier in the run) | empty
    truncated: bool = False
    text_chars: int = 0
    attempts: int = 0
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def cache_hit(self) -> bool:
        return self.source == "cache"


@contextlib.contextmanager
def open_extractor(llm: LLMParams) -> Iterator[Extractor]:
    """The extractor ``llm.provider`` names, set up (a llama.cpp server started) and torn down."""
    if llm.provider == "rules":
        from medfilip.extract.rules import RulesExtractor

        yield RulesExtractor(model=llm.model)
        return
    from medfilip.extract.prompt import load_prompt

    prompt = load_prompt(llm.prompt)
    if llm.provider == "llamacpp":
        from medfilip.extract.server import llamacpp_extractor

        with llamacpp_extractor(llm, prompt) as extractor:
            yield extractor
        return
    from medfilip.extract.client import OpenAIExtractor, resolve_api_key

    yield OpenAIExtractor(llm, prompt, api_key=resolve_api_key(llm), base_url=llm.base_url)


async def extract_all(
    items: list[tuple[str, str, bool]],
    extractor: Extractor,
    cache: LLMCache,
    max_concurrency: int,
    progress: bool = True,
) -> list[Outcome]:
    """Extract findings for ``(study_id, text, truncated)`` items; cached answers are re-used."""
    identity = extractor.identity()
    outcomes = [
        Outcome(study_id=sid, key=cache_key(identity, text), truncated=cut, text_chars=len(text))
        for sid, text, cut in items
    ]
    texts = {o.key: text for o, (_, text, _) in zip(outcomes, items)}
    hits = cache.get_many({o.key for o in outcomes if texts[o.key]})

    to_call: dict[str, Outcome] = {}  # first outcome per uncached key: the one that pays
    for o in outcomes:
        if not texts[o.key]:
            o.source = "empty"  # nothing to read: no findings, no call
        elif o.key in hits:
            hit = hits[o.key]
            o.source, o.findings, o.n_dropped = "cache", list(hit.findings), hit.n_dropped
        elif o.key in to_call:
            o.source = "duplicate"
        else:
            to_call[o.key] = o

    bar = tqdm(total=len(outcomes), desc=f"extract [{extractor.provider}:{extractor.model}]",
               disable=not progress, unit="report")
    counts = Counter(o.source for o in outcomes if o.key not in to_call)
    bar.update(len(outcomes) - len(to_call))
    semaphore = asyncio.Semaphore(max_concurrency)

    async def call(o: Outcome) -> None:
        async with semaphore:
            text = texts[o.key]
            try:
                answer: Answer = await extractor.extract(text)
            except ExtractionFailed as exc:
                o.status, o.error, o.attempts, o.latency_s = "failed", str(exc), exc.attempts, exc.latency_s
                cache.put_failure(o.key, identity, text, o.error, exc.attempts, exc.latency_s, study_id=o.study_id)
                counts["failed"] += 1
            else:
                cache.put_ok(o.key, identity, text, answer, study_id=o.study_id)
                o.findings, o.n_dropped = answer.findings, answer.n_dropped
                o.attempts, o.latency_s = answer.attempts, answer.latency_s
                o.prompt_tokens, o.completion_tokens = answer.prompt_tokens, answer.completion_tokens
                counts["ok"] += 1
        bar.update(1)
        bar.set_postfix(ok=counts["ok"], cached=counts["cache"], failed=counts["failed"], refresh=False)

    try:
        await asyncio.gather(*(call(o) for o in to_call.values()))
    finally:
        bar.close()
    # Studies that share a text share its answer (or its failure).
    for o in outcomes:
        if o.source == "duplicate":
            payer = to_call[o.key]
            o.status, o.error, o.findings, o.n_dropped = payer.status, payer.error, payer.findings, payer.n_dropped
    return outcomes


TRIPLET_SCHEMA = pa.schema(
    [
        ("study_id", pa.string()),
        ("finding_index", pa.int32()),
        ("severity", pa.string()),
        ("location", pa.string()),
        ("category", pa.string()),
        ("negated", pa.bool_()),
        ("uncertain", pa.bool_()),
        ("evidence", pa.string()),
        ("provider", pa.string()),
        ("model", pa.string()),
    ]
)

EXTRACTION_SCHEMA = pa.schema(
    [
        ("study_id", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("n_findings", pa.int32()),
        ("n_dropped", pa.int32()),
        ("cache_hit", pa.bool_()),
        ("source", pa.string()),
        ("cache_key", pa.string()),
        ("report_sha256", pa.string()),
        ("truncated", pa.bool_()),
        ("text_chars", pa.int64()),
        ("attempts", pa.int32()),
        ("latency_s", pa.float64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
    ]
)


def triplets_table(outcomes: list[Outcome], provider: str, model: str) -> pa.Table:
    rows = [
        {**f.to_dict(), "study_id": o.study_id, "finding_index": i, "provider": provider, "model": model}
        for o in outcomes
        for i, f in enumerate(o.findings)
    ]
    return pa.Table.from_pylist(rows, schema=TRIPLET_SCHEMA)


def extractions_table(outcomes: list[Outcome], texts: list[str]) -> pa.Table:
    rows = [
        {
            "study_id": o.study_id,
            "status": o.status,
            "error": o.error,
            "n_findings": len(o.findings),
            "n_dropped": o.n_dropped,
            "cache_hit": o.cache_hit,
            "source": o.source,
            "cache_key": o.key,
            "report_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "truncated": o.truncated,
            "text_chars": o.text_chars,
            "attempts": o.attempts,
            "latency_s": o.latency_s,
            "prompt_tokens": o.prompt_tokens,
            "completion_tokens": o.completion_tokens,
        }
        for o, text in zip(outcomes, texts)
    ]
    return pa.Table.from_pylist(rows, schema=EXTRACTION_SCHEMA)


def summarize(outcomes: list[Outcome], llm: LLMParams, seconds: float) -> dict:
    """The numbers of reports/extract.json (contract fields first)."""
    paid = [o for o in outcomes if o.source == "llm"]
    latencies = np.array([o.latency_s for o in paid if o.status == "ok"], dtype=float)
    prompt_tokens = sum(o.prompt_tokens for o in paid)
    completion_tokens = sum(o.completion_tokens for o in paid)
    cost = None
    if llm.price_prompt_per_m is not None and llm.price_completion_per_m is not None:
        cost = (prompt_tokens * llm.price_prompt_per_m + completion_tokens * llm.price_completion_per_m) / 1e6
    errors = Counter(o.error.split(":")[0] for o in outcomes if o.error)
    n = len(outcomes)
    return {
        "n_reports": n,
        "n_ok": sum(o.status == "ok" for o in outcomes),
        "n_failed": sum(o.status == "failed" for o in outcomes),
        "llm_calls": len(paid),
        "llm_requests": sum(o.attempts for o in paid),
        "cache_hits": sum(o.source == "cache" for o in outcomes),
        "duplicate_texts": sum(o.source == "duplicate" for o in outcomes),
        "empty_reports": sum(o.source == "empty" for o in outcomes),
        "truncated_reports": sum(o.truncated for o in outcomes),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cost_usd": cost,
        "n_findings": sum(len(o.findings) for o in outcomes),
        "dropped_without_category": sum(o.n_dropped for o in outcomes),
        "latency_s": {
            f"p{q}": float(np.percentile(latencies, q)) if latencies.size else None for q in (50, 90, 99)
        },
        "failures_by_error": dict(errors.most_common(10)),
        "provider": llm.provider,
        "model": llm.model,
        "seconds": round(seconds, 3),
        "reports_per_s": round(n / seconds, 2) if seconds > 0 else None,
    }


async def _extract_and_close(items, extractor, cache, llm: LLMParams, params: ExtractParams) -> list[Outcome]:
    # The client's connections belong to this event loop: close them inside it.
    try:
        return await extract_all(items, extractor, cache, llm.max_concurrency, progress=params.progress)
    finally:
        await extractor.aclose()


def extract_studies(
    studies: pa.Table, llm: LLMParams, params: ExtractParams, extractor: Extractor | None = None
) -> tuple[list[Outcome], list[str], dict]:
    """Extract every study of a table (study_id, report, [findings, impression]) through the cache.

    Returns the outcomes, the texts sent and the summary; failed reports are recorded
    in their outcome, not raised. An extractor serves one run: it is closed at the end.
    """
    rows = studies.to_pylist()
    items = [(str(r["study_id"]), *report_text(r, params)) for r in rows]
    cache = LLMCache(Path(params.cache))
    start = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            if extractor is None:
                extractor = stack.enter_context(open_extractor(llm))
            outcomes = asyncio.run(_extract_and_close(items, extractor, cache, llm, params))
    finally:
        cache.close()
    summary = summarize(outcomes, llm, time.perf_counter() - start)
    summary["provider"], summary["model"] = extractor.provider, extractor.model
    return outcomes, [text for _, text, _ in items], summary


def run_extract(
    studies: pa.Table,
    llm: LLMParams,
    params: ExtractParams,
    out_dir: Path,
    extractor: Extractor | None = None,
) -> dict:
    """The extract stage: write ``triplets_raw.parquet`` and ``extractions.parquet``, return the summary.

    Failed reports are recorded, not raised; :func:`check_failures` decides whether the stage fails.
    """
    outcomes, texts, summary = extract_studies(studies, llm, params, extractor)
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(triplets_table(outcomes, summary["provider"], summary["model"]), out_dir / "triplets_raw.parquet")
    pq.write_table(extractions_table(outcomes, texts), out_dir / "extractions.parquet")
    return summary


def check_failures(summary: dict, params: ExtractParams, out_dir: Path) -> None:
    """Fail the stage (after its outputs are written) when too many reports failed."""
    if summary["n_reports"] and summary["n_failed"] / summary["n_reports"] > params.max_failure_fraction:
        top = "; ".join(f"{k} ({v})" for k, v in summary["failures_by_error"].items())
        raise ExtractStageFailed(
            f"{summary['n_failed']} of {summary['n_reports']} reports failed "
            f"(> extract.max_failure_fraction={params.max_failure_fraction}): {top}. "
            f"Answers received so far are cached in {params.cache}; re-run to retry only the failures. "
            f"Details: {out_dir / 'extractions.parquet'} (medfilip audit --query failures_by_error)"
        )

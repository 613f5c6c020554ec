"""The extract stage: every report through one extractor, concurrently, cached by content.

Reports stream through a bounded pipeline, so memory stays flat in the number of reports
(ARCHITECTURE.md, "Scale"): a producer reads the studies in chunks, looks each chunk up in
the cache, and feeds the reports still to be asked into a queue of ``llm.max_concurrency``
workers; outcomes leave in input order through a sink (Parquet writers for the stage) as
soon as every earlier report is done. At most :data:`WINDOW` reports are between the
oldest unfinished one and the newest read.

Each answer is written to the cache the moment it arrives, so an interrupted run resumes
where it stopped and never pays for an answer twice. Identical report texts are sent once.
Failures -- including an unexpected exception in a provider or the cache -- are recorded
per study, never dropped, and never abort the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from medfilip.config import ExtractParams, LLMParams
from medfilip.errors import UserError
from medfilip.extract.base import Answer, ExtractionFailed, Extractor
from medfilip.extract.cache import LLMCache, cache_key, redact_secrets
from medfilip.extract.schema import Finding
from medfilip.extract.text import report_text

log = logging.getLogger(__name__)

LOOKUP_CHUNK = 512  # reports looked up in the cache with one query
WINDOW = 8192  # reports read ahead of the oldest unfinished one (bounds memory; >= LOOKUP_CHUNK)
WRITE_BATCH = 4096  # outcomes per Parquet row group


class ExtractStageFailed(UserError, RuntimeError):
    """More reports failed than ``extract.max_failure_fraction`` allows (outputs are saved first)."""


@dataclass(slots=True)
class Outcome:
    """What happened to one study's report."""

    study_id: str
    key: str
    status: str = "ok"  # ok | failed
    findings: list[Finding] = field(default_factory=list)
    n_dropped: int = 0
    error: str | None = None
    # llm (asked this run) | cache | duplicate (same text earlier in the run) | empty
    # | lookup_failed (the cache could not be read: not asked, so nothing is paid blind)
    source: str = "llm"
    truncated: bool = False
    text_chars: int = 0
    attempts: int = 0
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def cache_hit(self) -> bool:
        return self.source == "cache"


Sink = Callable[[Outcome, str], None]


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


class _Pending:
    """One report between being read and being handed to the sink."""

    __slots__ = ("outcome", "text", "done")

    def __init__(self, outcome: Outcome, text: str):
        self.outcome, self.text, self.done = outcome, text, False


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    text = redact_secrets(text) or ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _share(payer: Outcome, dup: Outcome) -> None:
    """Studies that share a text share its answer (or its failure); only the payer paid."""
    dup.status, dup.error, dup.findings, dup.n_dropped = payer.status, payer.error, payer.findings, payer.n_dropped


def _batched(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


async def extract_stream(
    items: Iterable[tuple[str, str, bool]],
    extractor: Extractor,
    cache: LLMCache,
    max_concurrency: int,
    sink: Sink,
    *,
    progress: bool = True,
    total: int | None = None,
    window: int = WINDOW,
) -> None:
    """Extract ``(study_id, text, truncated)`` items; ``sink(outcome, text)`` gets each, in input order.

    Cached answers are re-used; a report whose answer was cut at ``max_tokens`` is re-asked
    only when the extractor's ``max_tokens`` is now larger (see :mod:`medfilip.extract.cache`).
    """
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1; got {max_concurrency}")
    identity = extractor.identity()
    limit = getattr(extractor, "max_tokens", None)
    # Caches written before max_tokens left the key (format 1) hold answers under this key.
    legacy = {**identity, "max_tokens": limit} if limit is not None else None
    started_at = time.time()  # a cache hit created after this was paid by this run: a duplicate
    queue: asyncio.Queue[_Pending | None] = asyncio.Queue(maxsize=2 * max_concurrency)
    slots = asyncio.Semaphore(max(window, LOOKUP_CHUNK))
    pending: deque[_Pending] = deque()
    inflight: dict[str, list[_Pending]] = {}  # key being asked -> duplicates waiting for its answer
    failed_here: dict[str, Outcome] = {}  # texts that failed this run: their duplicates share it
    counts: Counter[str] = Counter()
    bar = tqdm(total=total, desc=f"extract [{extractor.provider}:{extractor.model}]",
               disable=not progress, unit="report")

    def flush() -> None:
        while pending and pending[0].done:
            p = pending.popleft()
            sink(p.outcome, p.text)
            slots.release()
            counts[p.outcome.source if p.outcome.status == "ok" else "failed"] += 1
            bar.update(1)
        bar.set_postfix(ok=counts["llm"], cached=counts["cache"], failed=counts["failed"], refresh=False)

    def classify(chunk: list[tuple[str, str, bool]]) -> list[_Pending]:
        """Decide each report of a chunk; no await in here, so no answer lands in between."""
        entries = [
            _Pending(Outcome(study_id=sid, key=cache_key(identity, text), truncated=cut, text_chars=len(text)), text)
            for sid, text, cut in chunk
        ]
        asked = [p.outcome.key for p in entries if p.text]
        lookup_error = None
        try:
            hits = cache.get_many(asked)
            if legacy is not None:
                old_keys = {cache_key(legacy, p.text): p.outcome.key
                            for p in entries if p.text and p.outcome.key not in hits}
                for old, hit in cache.get_many(old_keys).items():
                    hits[old_keys[old]] = hit
            cut_at = cache.truncated_at(k for k in asked if k not in hits)
        except Exception as exc:  # SQLite busy or damaged: these reports fail, the run goes on
            hits, cut_at = {}, {}
            lookup_error = f"cache lookup failed ({_one_line(exc)}); re-run to retry"
            log.warning("extract: %s", lookup_error)
        payers = []
        for p in entries:
            o, key = p.outcome, p.outcome.key
            pending.append(p)
            p.done = True
            if not p.text:
                o.source = "empty"  # nothing to read: no findings, no call
            elif lookup_error:
                o.source, o.status, o.error = "lookup_failed", "failed", lookup_error
            elif key in hits:
                hit = hits[key]
                o.source = "duplicate" if hit.created_at >= started_at else "cache"
                o.findings, o.n_dropped = list(hit.findings), hit.n_dropped
            elif key in inflight:
                o.source, p.done = "duplicate", False
                inflight[key].append(p)
            elif key in failed_here:
                o.source = "duplicate"
                _share(failed_here[key], o)
            elif key in cut_at and limit is not None and cut_at[key] >= limit:
                # The same limit would cut the same answer again: not worth paying for.
                o.source, o.status = "cache", "failed"
                o.error = (f"truncated answer at llm.max_tokens={cut_at[key]} (cached); "
                           "raise llm.max_tokens to ask this report again")
            else:
                p.done = False
                inflight[key] = []
                payers.append(p)
        return payers

    def record_failure(o: Outcome, text: str, truncated_at: int | None = None) -> None:
        try:
            cache.put_failure(o.key, identity, text, o.error or "", o.attempts, o.latency_s, study_id=o.study_id,
                              prompt_tokens=o.prompt_tokens, completion_tokens=o.completion_tokens,
                              max_tokens=limit, truncated_at=truncated_at)
        except Exception as exc:  # the failure is still in extractions.parquet
            log.warning("extract: could not record the failure of study %s in %s: %s",
                        o.study_id, cache.path, _one_line(exc))

    async def ask(p: _Pending) -> None:
        o, text = p.outcome, p.text
        try:
            answer: Answer = await extractor.extract(text)
        except ExtractionFailed as exc:
            o.status, o.error, o.attempts, o.latency_s = "failed", str(exc), exc.attempts, exc.latency_s
            o.prompt_tokens, o.completion_tokens = exc.prompt_tokens, exc.completion_tokens
            record_failure(o, text, exc.truncated_at)
            return
        except Exception as exc:  # a bug in a provider: this report fails, the others go on
            log.warning("extract: study %s: unexpected error", o.study_id, exc_info=True)
            o.status, o.error = "failed", f"unexpected error: {_one_line(exc)}"
            record_failure(o, text)
            return
        o.attempts, o.latency_s = answer.attempts, answer.latency_s
        o.prompt_tokens, o.completion_tokens = answer.prompt_tokens, answer.completion_tokens
        try:
            cache.put_ok(o.key, identity, text, answer, study_id=o.study_id, max_tokens=limit)
        except Exception as exc:
            # Only cached answers count as done: the audit and the next run rely on it.
            o.status = "failed"
            o.error = f"answer received but not cached ({_one_line(exc)}); re-run to ask again"
            log.warning("extract: study %s: %s", o.study_id, o.error)
            return
        o.findings, o.n_dropped = answer.findings, answer.n_dropped

    def settle(p: _Pending) -> None:
        p.done = True
        o = p.outcome
        if o.status == "failed":
            failed_here[o.key] = o
        for dup in inflight.pop(o.key, ()):
            _share(o, dup.outcome)
            dup.done = True
        flush()

    async def produce() -> None:
        for chunk in _batched(items, LOOKUP_CHUNK):
            for _ in chunk:
                await slots.acquire()
            payers = classify(chunk)
            flush()
            for p in payers:
                await queue.put(p)
        for _ in range(max_concurrency):
            await queue.put(None)

    async def work() -> None:
        while (p := await queue.get()) is not None:
            await ask(p)
            settle(p)

    tasks = [asyncio.create_task(produce())] + [asyncio.create_task(work()) for _ in range(max_concurrency)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        bar.close()
    flush()
    assert not pending and not inflight, "extract: reports left unfinished"


async def extract_all(
    items: list[tuple[str, str, bool]],
    extractor: Extractor,
    cache: LLMCache,
    max_concurrency: int,
    progress: bool = True,
) -> list[Outcome]:
    """:func:`extract_stream` collected into a list (small inputs: scoring, tests)."""
    outcomes: list[Outcome] = []
    await extract_stream(items, extractor, cache, max_concurrency, lambda o, _: outcomes.append(o),
                         progress=progress, total=len(items))
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


# What downstream stages read of an extraction: no timings or cache hits, so the file (a DVC
# output that explain depends on) is byte-identical when a forced re-run finds the same answers.
STATUS_COLUMNS = ["study_id", "status", "n_dropped"]


def _triplet_rows(o: Outcome, provider: str, model: str) -> list[dict]:
    return [{**f.to_dict(), "study_id": o.study_id, "finding_index": i, "provider": provider, "model": model}
            for i, f in enumerate(o.findings)]


def _extraction_row(o: Outcome, text: str) -> dict:
    return {
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


def triplets_table(outcomes: list[Outcome], provider: str, model: str) -> pa.Table:
    rows = [row for o in outcomes for row in _triplet_rows(o, provider, model)]
    return pa.Table.from_pylist(rows, schema=TRIPLET_SCHEMA)


def extractions_table(outcomes: list[Outcome], texts: list[str]) -> pa.Table:
    return pa.Table.from_pylist([_extraction_row(o, t) for o, t in zip(outcomes, texts)], schema=EXTRACTION_SCHEMA)


class _ParquetSink:
    """The stage's three tables, written a row group at a time under temporary names.

    They take their final names only when the run completes, so a killed run leaves no
    half-written output behind (its answers are in the cache).
    """

    def __init__(self, out_dir: Path, provider: str, model: str):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.provider, self.model = provider, model
        self.paths = {name: out_dir / f"{name}.parquet"
                      for name in ("triplets_raw", "extractions", "extraction_status")}
        schemas = {"triplets_raw": TRIPLET_SCHEMA, "extractions": EXTRACTION_SCHEMA,
                   "extraction_status": pa.schema([EXTRACTION_SCHEMA.field(c) for c in STATUS_COLUMNS])}
        self.writers = {name: pq.ParquetWriter(self._partial(path), schemas[name]) for name, path in self.paths.items()}
        self.triplets: list[dict] = []
        self.extractions: list[dict] = []

    @staticmethod
    def _partial(path: Path) -> Path:
        return path.with_name(f".{path.name}.partial")

    def __call__(self, o: Outcome, text: str) -> None:
        self.triplets.extend(_triplet_rows(o, self.provider, self.model))
        self.extractions.append(_extraction_row(o, text))
        if len(self.extractions) >= WRITE_BATCH:
            self._write()

    def _write(self) -> None:
        extractions = pa.Table.from_pylist(self.extractions, schema=EXTRACTION_SCHEMA)
        self.writers["extractions"].write_table(extractions)
        self.writers["extraction_status"].write_table(extractions.select(STATUS_COLUMNS))
        self.writers["triplets_raw"].write_table(pa.Table.from_pylist(self.triplets, schema=TRIPLET_SCHEMA))
        self.triplets, self.extractions = [], []

    def close(self, commit: bool) -> None:
        """Write what is left and give the files their names (``commit``), or remove them."""
        if commit and self.extractions:
            self._write()
        for writer in self.writers.values():
            writer.close()
        for path in self.paths.values():
            if commit:
                self._partial(path).replace(path)
            else:
                self._partial(path).unlink(missing_ok=True)


class _Tally:
    """The running numbers of ``reports/extract.json``, so no outcome has to be kept for them."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.latencies = array("d")  # 8 bytes a paid report

    def add(self, o: Outcome) -> None:
        c = self.counts
        c["n"] += 1
        c[o.status] += 1
        c[o.source] += 1
        c["truncated"] += o.truncated
        c["findings"] += len(o.findings)
        c["dropped"] += o.n_dropped
        if o.error:
            self.errors[o.error.split(":")[0]] += 1
        if o.source == "llm":  # paid this run, answered or not: failed attempts cost tokens too
            c["requests"] += o.attempts
            c["prompt_tokens"] += o.prompt_tokens
            c["completion_tokens"] += o.completion_tokens
            if o.status == "ok":
                self.latencies.append(o.latency_s)

    def summary(self, llm: LLMParams, seconds: float) -> dict:
        c, n = self.counts, self.counts["n"]
        latencies = np.frombuffer(self.latencies, dtype=float) if self.latencies else np.zeros(0)
        cost = None
        if llm.price_prompt_per_m is not None and llm.price_completion_per_m is not None:
            cost = (c["prompt_tokens"] * llm.price_prompt_per_m + c["completion_tokens"] * llm.price_completion_per_m) / 1e6
        return {
            "n_reports": n,
            "n_ok": c["ok"],
            "n_failed": c["failed"],
            "llm_calls": c["llm"],
            "llm_requests": c["requests"],
            "cache_hits": c["cache"],
            "duplicate_texts": c["duplicate"],
            "empty_reports": c["empty"],
            "truncated_reports": c["truncated"],
            "prompt_tokens": c["prompt_tokens"],
            "completion_tokens": c["completion_tokens"],
            "cost_usd": cost,
            "n_findings": c["findings"],
            "dropped_without_category": c["dropped"],
            "latency_s": {
                f"p{q}": float(np.percentile(latencies, q)) if latencies.size else None for q in (50, 90, 99)
            },
            "failures_by_error": dict(self.errors.most_common(10)),
            "provider": llm.provider,
            "model": llm.model,
            "seconds": round(seconds, 3),
            "reports_per_s": round(n / seconds, 2) if seconds > 0 else None,
        }


def summarize(outcomes: Iterable[Outcome], llm: LLMParams, seconds: float) -> dict:
    """The numbers of reports/extract.json (contract fields first); tokens include failed attempts."""
    tally = _Tally()
    for o in outcomes:
        tally.add(o)
    return tally.summary(llm, seconds)


def _items(studies: pa.Table, params: ExtractParams) -> Iterator[tuple[str, str, bool]]:
    """``(study_id, text, cut)`` per study, converted a batch at a time."""
    columns = [c for c in ("study_id", "report", "findings", "impression") if c in studies.column_names]
    for batch in studies.select(columns).to_batches(max_chunksize=4 * LOOKUP_CHUNK):
        for row in batch.to_pylist():
            yield (str(row["study_id"]), *report_text(row, params))


def _extract(studies: pa.Table, llm: LLMParams, params: ExtractParams, extractor: Extractor | None,
             open_sink: Callable[[Extractor], Sink]) -> dict:
    """Run every study through the cache and the extractor into a sink; return the summary."""
    cache = LLMCache(Path(params.cache))
    tally = _Tally()
    start = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            if extractor is None:
                extractor = stack.enter_context(open_extractor(llm))
            sink = open_sink(extractor)

            def emit(o: Outcome, text: str) -> None:
                tally.add(o)
                sink(o, text)

            async def go() -> None:
                # The client's connections belong to this event loop: close them inside it.
                try:
                    await extract_stream(_items(studies, params), extractor, cache, llm.max_concurrency, emit,
                                         progress=params.progress, total=studies.num_rows)
                finally:
                    await extractor.aclose()

            asyncio.run(go())
    finally:
        cache.close()
    summary = tally.summary(llm, time.perf_counter() - start)
    summary["provider"], summary["model"] = extractor.provider, extractor.model
    return summary


def extract_studies(
    studies: pa.Table, llm: LLMParams, params: ExtractParams, extractor: Extractor | None = None
) -> tuple[list[Outcome], list[str], dict]:
    """Extract every study of a table (study_id, report, [findings, impression]) through the cache.

    Returns the outcomes, the texts sent and the summary, all in memory (for scoring and
    tests; the stage streams with :func:`run_extract`). Failed reports are recorded in their
    outcome, not raised. An extractor serves one run: it is closed at the end.
    """
    outcomes: list[Outcome] = []
    texts: list[str] = []

    def collect(o: Outcome, text: str) -> None:
        outcomes.append(o)
        texts.append(text)

    summary = _extract(studies, llm, params, extractor, lambda _: collect)
    return outcomes, texts, summary


def run_extract(
    studies: pa.Table,
    llm: LLMParams,
    params: ExtractParams,
    out_dir: Path,
    extractor: Extractor | None = None,
) -> dict:
    """The extract stage: write ``triplets_raw.parquet``, ``extractions.parquet`` and its timing-free
    ``extraction_status.parquet``; return the summary.

    Outcomes stream to the files as they finish (memory stays flat); the files take their
    names only when every report is done. Failed reports are recorded, not raised;
    :func:`check_failures` decides whether the stage fails.
    """
    sinks: list[_ParquetSink] = []

    def open_sink(extractor: Extractor) -> Sink:
        sinks.append(_ParquetSink(out_dir, extractor.provider, extractor.model))
        return sinks[0]

    try:
        summary = _extract(studies, llm, params, extractor, open_sink)
    except BaseException:
        for sink in sinks:
            sink.close(commit=False)
        raise
    for sink in sinks:
        sink.close(commit=True)
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

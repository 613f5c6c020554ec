"""Extraction throughput against a local OpenAI-compatible stand-in with a set latency."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from medfilip.config import ExtractParams, LLMParams
from medfilip.extract.run import extract_studies
from medfilip.extract.standin import StandinServer

_KEY_ENV = "MEDFILIP_BENCH_KEY"


def _studies(n: int) -> pa.Table:
    # Distinct texts, so every report is a real call (no in-run de-duplication).
    reports = [f"FINDINGS: Report {i}. Small left pleural effusion. No pneumothorax." for i in range(n)]
    return pa.table({"study_id": [f"b{i:07d}" for i in range(n)], "report": reports})


def benchmark(n_reports: int = 200, latency_s: float = 0.05, concurrencies=(1, 8, 64)) -> dict:
    """reports/s through the full path (client, retries, cache) per concurrency, and a cached re-run."""
    os.environ.setdefault(_KEY_ENV, "bench-placeholder")
    studies = _studies(n_reports)
    results: dict = {"n_reports": n_reports, "latency_s": latency_s, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp, StandinServer(latency_s=latency_s) as server:
        for concurrency in concurrencies:
            llm = LLMParams(provider="openai", model=f"standin-c{concurrency}", base_url=server.base_url,
                            api_key_env=_KEY_ENV, max_concurrency=concurrency, max_retries=2, timeout_s=30)
            params = ExtractParams(cache=str(Path(tmp) / f"c{concurrency}.sqlite"), text="report", progress=False)
            start = time.perf_counter()
            _, _, summary = extract_studies(studies, llm, params)
            seconds = time.perf_counter() - start
            assert summary["llm_calls"] == n_reports, summary
            cached_start = time.perf_counter()
            _, _, cached = extract_studies(studies, llm, params)
            cached_s = time.perf_counter() - cached_start
            assert cached["cache_hits"] == n_reports and cached["llm_calls"] == 0
            results["runs"][str(concurrency)] = {
                "seconds": round(seconds, 3),
                "reports_per_s": round(n_reports / seconds, 1),
                "ideal_reports_per_s": round(concurrency / latency_s, 1) if latency_s else None,
                "cached_rerun_s": round(cached_s, 3),
                "cached_reports_per_s": round(n_reports / cached_s, 1),
            }
    return results


def cached_rerun_benchmark(n_reports: int = 100_000) -> dict:
    """Time a fully cached re-run at scale with the rules provider (lookups, not model calls)."""
    studies = _studies(n_reports)
    with tempfile.TemporaryDirectory() as tmp:
        params = ExtractParams(cache=str(Path(tmp) / "rules.sqlite"), text="report", progress=False)
        start = time.perf_counter()
        _, _, first = extract_studies(studies, LLMParams(), params)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        _, _, again = extract_studies(studies, LLMParams(), params)
        again_s = time.perf_counter() - start
        assert again["cache_hits"] == n_reports
    return {
        "n_reports": n_reports,
        "first_run_s": round(first_s, 2),
        "cached_rerun_s": round(again_s, 2),
        "cached_reports_per_s": round(n_reports / again_s, 1),
    }

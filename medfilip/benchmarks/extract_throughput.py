"""Extraction throughput: against a loopback stand-in with a set latency, and on the local llama.cpp server."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from medfilip.config import ExtractParams, LLMParams
from medfilip.extract.run import extract_studies
from medfilip.testing.standin import StandinServer

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


# The measured process: nothing in it but the stage's own work (the stand-in runs in the parent),
# so its peak RSS is the extraction's. Plain text, so it also runs against an older checkout.
_SCALE_CHILD = """
import json, resource, sys, time
from pathlib import Path
import pyarrow as pa
from medfilip.config import ExtractParams, LLMParams
from medfilip.extract.run import run_extract
base_url, n, concurrency, tmp, key_env = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
studies = pa.table({"study_id": [f"b{i:07d}" for i in range(n)],
                    "report": [f"FINDINGS: Report {i}. Small left pleural effusion. No pneumothorax." for i in range(n)]})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
llm = LLMParams(provider="openai", model="standin-scale", base_url=base_url, api_key_env=key_env,
                max_concurrency=concurrency, max_retries=2, timeout_s=60)
params = ExtractParams(cache=str(Path(tmp) / "llm.sqlite"), text="report", progress=False)
start = time.perf_counter()
summary = run_extract(studies, llm, params, Path(tmp) / "out")
seconds = time.perf_counter() - start
print(json.dumps({"n_ok": summary["n_ok"], "llm_calls": summary["llm_calls"], "seconds": seconds,
                  "rss_before_extract_mb": before / 1024,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def scale_benchmark(sizes=(10_000, 200_000), concurrency: int = 64, latency_s: float = 0.01,
                    code_path: str | None = None) -> dict:
    """Peak RSS and reports/s of the extract stage at each size (a fresh process each, all uncached).

    ``code_path``: run the stage from another checkout (e.g. a clone of an older commit) to compare.
    Goal (issue 9): peak RSS flat in the number of reports.
    """
    import json
    import subprocess
    import sys

    env = dict(os.environ)
    env.setdefault(_KEY_ENV, "bench-placeholder")
    if code_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (code_path, env.get("PYTHONPATH")) if p)
    results: dict = {"concurrency": concurrency, "latency_s": latency_s, "code_path": code_path, "sizes": {}}
    with StandinServer(latency_s=latency_s, max_recorded=100) as server:
        for n in sizes:
            with tempfile.TemporaryDirectory() as tmp:
                proc = subprocess.run(
                    [sys.executable, "-c", _SCALE_CHILD, server.base_url, str(n), str(concurrency), tmp, _KEY_ENV],
                    env=env, capture_output=True, text=True, check=False,
                    cwd=code_path or os.getcwd(),  # `python -c` imports from there first; prompts are relative
                )
            if proc.returncode != 0:
                raise RuntimeError(f"extract scale run at n={n} failed:\n{proc.stderr[-3000:]}")
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            assert run["llm_calls"] == n and run["n_ok"] == n, run
            results["sizes"][str(n)] = {
                "reports_per_s": round(n / run["seconds"], 1),
                "seconds": round(run["seconds"], 1),
                "peak_rss_mb": round(run["peak_rss_mb"], 1),
                "rss_before_extract_mb": round(run["rss_before_extract_mb"], 1),
                "rss_growth_mb": round(run["peak_rss_mb"] - run["rss_before_extract_mb"], 1),
            }
    return results


# --------------------------------------------------------------------------- llm.provider: llamacpp

_OPENI_STYLE = (
    "FINDINGS: {i} mm nodule in the right upper lobe. Mild cardiomegaly. No pneumothorax.",
    "IMPRESSION: Small left pleural effusion with adjacent atelectasis, case {i}.",
    "FINDINGS: Lungs are clear, study {i}. Heart size is normal. IMPRESSION: No acute disease.",
    "FINDINGS: Moderate right pleural effusion. Possible left basilar consolidation (report {i}).",
)


def _llamacpp_studies(n: int) -> pa.Table:
    reports = [_OPENI_STYLE[i % len(_OPENI_STYLE)].format(i=i + 3) for i in range(n)]
    return pa.table({"study_id": [f"l{i:07d}" for i in range(n)], "report": reports})


def llamacpp_benchmark(n_reports: int = 16, concurrencies=(1, 4, 8), max_tokens: int = 1024,
                       old_engine_python: str | None = None, gguf: str | None = None) -> dict:
    """reports/s of the extract stage on the local llama.cpp server, per ``llm.max_concurrency``.

    ``engine: xllamacpp`` is the stage's own path (``provider: llamacpp``: the server gets as many
    slots as the concurrency). With ``old_engine_python`` (a Python that has llama-cpp-python[server]
    installed) the same reports also go to ``python -m llama_cpp.server``, the engine before
    issue 15, which serves one request at a time. Every run starts from an empty answer cache, so
    each report is a real model call; ``max_tokens`` caps an answer, as the stage's ``llm.max_tokens``.
    """
    from medfilip.config import LlamaCppParams

    studies = _llamacpp_studies(n_reports)
    llamacpp = LlamaCppParams(gguf=gguf)
    results: dict = {"n_reports": n_reports, "max_tokens": max_tokens, "n_threads": llamacpp.n_threads,
                     "engines": {}}

    def measure(llm: LLMParams, tmp: str, name: str) -> dict:
        params = ExtractParams(cache=str(Path(tmp) / f"{name}.sqlite"), text="report", progress=False)
        start = time.perf_counter()
        _, _, summary = extract_studies(studies, llm, params)
        seconds = time.perf_counter() - start
        tokens = summary.get("completion_tokens") or 0
        # Engines differ in their answers' lengths (the same greedy decoding in other kernels drifts),
        # so tokens/s beside reports/s: reports/s alone would reward the terser model.
        return {"seconds": round(seconds, 2), "reports_per_s": round(n_reports / seconds, 3),
                "n_ok": summary["n_ok"], "n_failed": summary.get("n_failed"),
                "completion_tokens": tokens, "completion_tokens_per_s": round(tokens / seconds, 1)}

    def runs(tmp: str, engine: str) -> dict:
        out = {}
        for concurrency in concurrencies:  # each run starts its own server: the times include that
            llm = LLMParams(provider="llamacpp", model="bench-smollm2", max_concurrency=concurrency,
                            max_retries=1, timeout_s=600, max_tokens=max_tokens, llamacpp=llamacpp)
            out[str(concurrency)] = measure(llm, tmp, f"{engine}-c{concurrency}")
        return out

    with tempfile.TemporaryDirectory() as tmp:
        results["engines"]["xllamacpp"] = runs(tmp, "xllamacpp")
        if old_engine_python:
            with _old_engine(old_engine_python):
                results["engines"]["llama-cpp-python"] = runs(tmp, "llama-cpp-python")
    return results


@contextlib.contextmanager
def _old_engine(python: str):
    """The stage's server class swapped for ``python -m llama_cpp.server`` of another environment."""
    import medfilip.extract.server as server_mod

    class OldEngine(server_mod.LlamaCppServer):
        def _command(self, port: int) -> list[str]:
            p = self.params
            return [python, "-m", "llama_cpp.server", "--model", str(self.gguf), "--model_alias", self.model_alias,
                    "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(p.n_ctx),
                    "--n_threads", str(p.n_threads), "--n_threads_batch", str(p.n_threads),
                    "--n_gpu_layers", str(p.n_gpu_layers)]

    saved = server_mod.LlamaCppServer, server_mod.check_server_extra
    server_mod.LlamaCppServer, server_mod.check_server_extra = OldEngine, lambda: None  # it lives in `python`
    try:
        yield
    finally:
        server_mod.LlamaCppServer, server_mod.check_server_extra = saved

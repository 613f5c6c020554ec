"""Peak memory of ``medfilip audit`` over a large LLM cache (issue 9: bounded, read-only audits).

Each measurement runs in a fresh process and reports that process's own peak RSS, so
one measurement's allocations never count against another.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROWS_PER_COMMIT = 50_000
_QUERY = "SELECT provider, model, status, count(*) AS n, sum(prompt_tokens) AS tokens FROM llm_calls GROUP BY ALL"

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
mode, root, query = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
from medfilip import audit
from medfilip.config import Params
params = Params()
start = time.perf_counter()
if mode == "list":
    rows = audit.available_views(params, root)
elif mode == "stream":
    with audit.session(params, root, sql=query) as (con, _):
        rows = audit.run_query(con, query)[1]
else:  # "whole": the old audit, every row and column of the cache in one Arrow table
    import duckdb
    from medfilip.extract.cache import LLMCache
    con = duckdb.connect(":memory:")
    cache = LLMCache(root / params.extract.cache, read_only=True)
    con.register("llm_calls", cache.to_arrow())
    cache.close()
    rows = con.execute(query).fetchall()
seconds = time.perf_counter() - start
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_rss_mb": round(peak_mb, 1), "seconds": round(seconds, 2), "result_rows": len(rows)}))
"""


def write_cache(path: Path, n_answers: int) -> None:
    """A cache file of ``n_answers`` realistic rows (answer, raw text, identity), written in bulk."""
    from medfilip.extract.cache import COLUMN_NAMES, LLMCache

    LLMCache(path).close()  # the schema, exactly as extraction writes it
    identity = json.dumps({"provider": "openai", "model": "bench-model", "prompt_version": "v3",
                           "prompt_sha256": "0" * 64, "schema_sha256": "1" * 64, "temperature": 0})
    answer = json.dumps({"findings": [
        {"severity": "mild", "location": "left lower lobe", "category": "consolidation", "negated": False,
         "uncertain": False, "evidence": "Mild left lower lobe consolidation."},
        {"severity": None, "location": None, "category": "pneumothorax", "negated": True,
         "uncertain": False, "evidence": "No pneumothorax."}]})
    raw_text = answer + " " + "x" * 400  # what the endpoint said, longer than the parsed answer
    conn = sqlite3.connect(path, isolation_level=None)
    placeholders = ", ".join("?" * len(COLUMN_NAMES))
    insert = f"INSERT INTO llm_calls ({', '.join(COLUMN_NAMES)}) VALUES ({placeholders})"
    now = time.time()
    for start in range(0, n_answers, _ROWS_PER_COMMIT):
        rows = []
        for i in range(start, min(n_answers, start + _ROWS_PER_COMMIT)):
            values = {
                "key": f"{i:064x}", "provider": "openai", "model": "bench-model", "prompt_version": "v3",
                "identity_json": identity, "report_sha256": f"{i:064x}", "study_id": f"s{i}",
                "status": "ok" if i % 50 else "failed", "answer_json": answer, "raw_text": raw_text,
                "n_dropped": 0, "error": None if i % 50 else "timeout", "prompt_tokens": 420,
                "completion_tokens": 90, "latency_s": 0.8, "attempts": 1, "created_at": now, "updated_at": now,
            }
            rows.append(tuple(values.get(name) for name in COLUMN_NAMES))
        conn.execute("BEGIN")
        conn.executemany(insert, rows)
        conn.execute("COMMIT")
    conn.close()


def _measure(mode: str, root: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]),
                                                                      os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _CHILD, mode, str(root), _QUERY],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def benchmark(n_answers: int = 1_000_000, whole: bool = True) -> dict:
    """Peak RSS and seconds of ``--list`` and of a query over ``llm_calls`` for ``n_answers`` cached answers.

    ``whole``: also measure the old way (the whole cache loaded into one Arrow table).
    """
    with tempfile.TemporaryDirectory(prefix="medfilip-bench-audit-") as tmp:
        root = Path(tmp)
        cache = root / "data" / "cache" / "llm.sqlite"
        cache.parent.mkdir(parents=True)
        t0 = time.perf_counter()
        write_cache(cache, n_answers)
        result = {
            "n_answers": n_answers,
            "cache_mb": round(cache.stat().st_size / 2**20, 1),
            "write_seconds": round(time.perf_counter() - t0, 1),
            "query": _QUERY,
            "list": _measure("list", root),
            "streamed": _measure("stream", root),
        }
        if whole:
            result["whole_cache_in_memory"] = _measure("whole", root)
    return result

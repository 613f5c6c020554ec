"""DVC stage `extract` (GPT-IE): every report -> findings with llm.provider, cached by content."""

import sys
from pathlib import Path

import pyarrow.parquet as pq

from medfilip.config import load_params
from medfilip.extract.run import ExtractStageFailed, check_failures, run_extract
from medfilip.reporting import write_json

if __name__ == "__main__":
    params = load_params()
    studies = pq.read_table("data/interim/studies.parquet")
    out_dir = Path("data/interim")
    summary = run_extract(studies, params.llm, params.extract, out_dir)
    write_json(Path("reports/extract.json"), summary)
    print(f"extract: {summary['n_ok']} ok, {summary['n_failed']} failed, {summary['llm_calls']} LLM calls, "
          f"{summary['cache_hits']} cache hits, {summary['seconds']:.1f} s")
    try:
        check_failures(summary, params.extract, out_dir)
    except ExtractStageFailed as exc:
        sys.exit(f"extract: {exc}")

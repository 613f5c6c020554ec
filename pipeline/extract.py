"""DVC stage `extract` (GPT-IE): every report -> findings with llm.provider, cached by content."""

from pathlib import Path

import pyarrow.parquet as pq

from medfilip.config import load_params
from medfilip.errors import for_people
from medfilip.extract.run import check_failures, run_extract
from medfilip.reporting import write_json

if __name__ == "__main__":
    with for_people("extract"):  # expected failures: one sentence, exit 1 (MEDFILIP_DEBUG=1: traceback)
        params = load_params()
        studies = pq.read_table("data/interim/studies.parquet")
        out_dir = Path("data/interim")
        summary = run_extract(studies, params.llm, params.extract, out_dir)
        write_json(Path("reports/extract.json"), summary)
        print(f"extract: {summary['n_ok']} ok, {summary['n_failed']} failed, {summary['llm_calls']} LLM calls, "
              f"{summary['cache_hits']} cache hits, {summary['seconds']:.1f} s")
        check_failures(summary, params.extract, out_dir)  # ExtractStageFailed: a sentence, after the outputs

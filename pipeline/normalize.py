"""DVC stage `normalize`: raw findings -> canonical category/severity/location (+ kept, drop_reason)."""

from pathlib import Path

import pyarrow.parquet as pq

from medfilip.config import load_params
from medfilip.errors import for_people
from medfilip.normalize import normalize_triplets
from medfilip.reporting import write_json
from medfilip.vocab import load_vocabulary

if __name__ == "__main__":
    with for_people("normalize"):  # expected failures: one sentence, exit 1 (MEDFILIP_DEBUG=1: traceback)
        params = load_params()
        vocabulary = load_vocabulary(params.normalize.vocabulary)
        raw = pq.read_table("data/interim/triplets_raw.parquet")
        table, summary = normalize_triplets(raw, vocabulary, params.normalize.deduplicate, params.normalize.top_oov)
        Path("data/processed").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, "data/processed/triplets.parquet")
        write_json(Path("reports/normalize.json"), summary)
        print(f"normalize: {summary['n_kept']} kept, {summary['n_dropped']} dropped {summary['dropped_by_reason']}")

"""DVC stage `embed` (SSM): every unique label text -> one L2-normalised vector, cached by (model, text)."""

from pathlib import Path

import pyarrow.parquet as pq

from medfilip.config import load_params
from medfilip.errors import for_people
from medfilip.embed import embed_texts
from medfilip.reporting import write_json

if __name__ == "__main__":
    with for_people("embed"):  # expected failures: one sentence, exit 1 (MEDFILIP_DEBUG=1: traceback)
        params = load_params()
        texts = pq.read_table("data/processed/texts.parquet")
        table, summary = embed_texts(texts, params.ssm, Path(params.ssm.cache))
        pq.write_table(table, "data/processed/embeddings.parquet")
        write_json(Path("reports/embed.json"), summary)
        print(f"embed: {summary['n_texts']} texts ({summary['n_embedded']} embedded, {summary['n_cached']} cached), "
              f"dim {summary['dim']}")

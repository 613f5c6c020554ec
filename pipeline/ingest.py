"""DVC stage `ingest`: data.source at data.root -> data/interim/{studies,images}.parquet."""

from pathlib import Path

from medfilip.config import load_params
from medfilip.errors import for_people
from medfilip.data.ingest import ingest
from medfilip.reporting import write_json

if __name__ == "__main__":
    with for_people("ingest"):  # expected failures: one sentence, exit 1 (MEDFILIP_DEBUG=1: traceback)
        params = load_params()
        summary = ingest(params.data, Path("data/interim"))
        write_json(Path("reports/ingest.json"), summary)
        print(f"ingest: {summary['n_studies']} studies, {summary['n_images']} images, "
              f"{summary['n_patients']} patients -> data/interim/")

"""DVC stage `pixels`: decode, window and resize every image once -> data/processed/pixels."""

from pathlib import Path

import pyarrow.parquet as pq

from medfilip.config import load_params
from medfilip.errors import for_people
from medfilip.pixels import build_pixel_store
from medfilip.reporting import write_json

if __name__ == "__main__":
    with for_people("pixels"):  # expected failures: one sentence, exit 1 (MEDFILIP_DEBUG=1: traceback)
        params = load_params()
        images = pq.read_table("data/interim/images.parquet")
        files = pq.read_table("data/interim/image_files.parquet")  # ingest's fingerprint: path, size, mtime
        summary = build_pixel_store(images, Path("data/processed/pixels"), params.pixels, files=files)
        write_json(Path("reports/pixels.json"), summary)
        print(f"pixels: {summary['n_ok']} ok, {summary['n_failed']} failed, "
              f"{summary['images_per_s']:.0f} images/s")

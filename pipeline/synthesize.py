"""DVC stage `synthesize`: the phantom chest X-ray benchmark -> data/raw/phantom."""

from pathlib import Path

from medfilip.config import load_params
from medfilip.errors import for_people
from medfilip.data.phantom import synthesize
from medfilip.reporting import write_json

if __name__ == "__main__":
    with for_people("synthesize"):  # expected failures: one sentence, exit 1 (MEDFILIP_DEBUG=1: traceback)
        params = load_params()
        summary = synthesize(
            params.phantom, params.data.split, Path("data/raw/phantom"), figures_dir=Path("reports/figures")
        )
        write_json(Path("reports/synthesize.json"), summary)
        print(f"synthesize: {summary['n_studies']} studies at {summary['images_per_s']:.0f} images/s")

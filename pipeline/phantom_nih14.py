"""DVC stage `phantom-nih14`: the phantom re-published in NIH ChestX-ray14's layout -> data/raw/phantom-nih14."""

from pathlib import Path

from medfilip.config import load_params
from medfilip.data.phantom_nih14 import write_phantom_nih14
from medfilip.errors import for_people
from medfilip.reporting import write_json

if __name__ == "__main__":
    with for_people("phantom-nih14"):  # expected failures: one sentence, exit 1 (MEDFILIP_DEBUG=1: traceback)
        load_params()  # a bad key in params.yaml stops every stage, this one included
        summary = write_phantom_nih14(Path("data/raw/phantom"), Path("data/raw/phantom-nih14"))
        write_json(Path("reports/phantom_nih14.json"), summary)
        print(f"phantom-nih14: {summary['n_images']} images ({summary['n_test']} in test_list.txt) "
              "-> data/raw/phantom-nih14")

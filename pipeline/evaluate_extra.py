"""DVC stage `evaluate-extra@<name>`: the trained model on an extra evaluation set -> reports/eval/<name>/."""

import sys
from pathlib import Path

from medfilip.config import load_params
from medfilip.errors import for_people
from medfilip.evaluate.run import evaluate_extra
from medfilip.reporting import write_json

if __name__ == "__main__":
    name = sys.argv[1]
    with for_people(f"evaluate-extra {name}"):  # expected failures: one sentence, exit 1
        summary = evaluate_extra(load_params(), name, Path("data/models/medfilip"))
        write_json(Path(f"reports/eval/{name}/evaluate.json"), summary)
        print(f"evaluate-extra {name}: mean AUC {summary['mean_auc']} on {summary['n_images']} images")

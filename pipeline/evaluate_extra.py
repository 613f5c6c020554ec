"""DVC stage `evaluate-extra@<name>`: the trained model on an extra evaluation set -> reports/eval/<name>/."""

import sys
from pathlib import Path

from medfilip.config import ConfigError, load_params
from medfilip.data.importers import DatasetError
from medfilip.evaluate.run import EvaluateError, evaluate_extra
from medfilip.model import ModelError
from medfilip.reporting import write_json

if __name__ == "__main__":
    name = sys.argv[1]
    try:
        summary = evaluate_extra(load_params(), name, Path("data/models/medfilip"))
    except (ConfigError, ModelError, EvaluateError, DatasetError, FileNotFoundError) as exc:
        print(f"evaluate-extra {name}: {exc}", file=sys.stderr)
        sys.exit(1)
    write_json(Path(f"reports/eval/{name}/evaluate.json"), summary)
    print(f"evaluate-extra {name}: mean AUC {summary['mean_auc']} on {summary['n_images']} images")

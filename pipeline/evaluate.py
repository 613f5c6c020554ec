"""DVC stage `evaluate`: the trained model on the dataset's reported split -> reports/eval/."""

import sys
from pathlib import Path

from medfilip.config import ConfigError, load_params
from medfilip.evaluate.run import EvaluateError, evaluate_dataset
from medfilip.model import ModelError
from medfilip.reporting import write_json

if __name__ == "__main__":
    try:
        params = load_params()
        summary = evaluate_dataset(params, Path("data/models/medfilip"), Path("reports/eval"))
    except (ConfigError, ModelError, EvaluateError, FileNotFoundError) as exc:  # sentences, not tracebacks
        print(f"evaluate: {exc}", file=sys.stderr)
        sys.exit(1)
    write_json(Path("reports/evaluate.json"), summary)
    print(f"evaluate: mean AUC {summary['mean_auc']} on {summary['n_images']} {summary['split']} images")

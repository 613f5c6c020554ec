"""DVC stage `evaluate`: the trained model on the dataset's reported split -> reports/eval/."""

from pathlib import Path

from medfilip.config import load_params
from medfilip.errors import for_people
from medfilip.evaluate.run import evaluate_dataset
from medfilip.reporting import write_json

if __name__ == "__main__":
    with for_people("evaluate"):  # expected failures: one sentence, exit 1 (MEDFILIP_DEBUG=1: traceback)
        params = load_params()
        summary = evaluate_dataset(params, Path("data/models/medfilip"), Path("reports/eval"))
        write_json(Path("reports/evaluate.json"), summary)
        print(f"evaluate: mean AUC {summary['mean_auc']} on {summary['n_images']} {summary['split']} images")

"""DVC stage `train`: the MedFILIP dual encoder on the SSM soft labels -> data/models/medfilip/.

Runs as one process (`dvc repro train`) or under `torchrun --nproc_per_node N pipeline/train.py`.
"""

import sys
from pathlib import Path

from medfilip.config import ConfigError, load_params
from medfilip.model import ModelError
from medfilip.reporting import write_json
from medfilip.train import TrainError
from medfilip.training_stage import run_train_stage

if __name__ == "__main__":
    try:
        params = load_params()
        summary = run_train_stage(params, model_dir=Path("data/models/medfilip"), live_dir=Path("reports/train"))
    except (ConfigError, ModelError, TrainError, FileNotFoundError) as exc:  # sentences, not tracebacks
        print(f"train: {exc}", file=sys.stderr)
        sys.exit(1)
    if summary is not None:
        write_json(Path("reports/train.json"), summary)

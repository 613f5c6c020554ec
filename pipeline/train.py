"""DVC stage `train`: the MedFILIP dual encoder on the SSM soft labels -> data/models/medfilip/.

Runs as one process (`dvc repro train`) or under `torchrun --nproc_per_node N pipeline/train.py`.
"""

from pathlib import Path

from medfilip.config import load_params
from medfilip.errors import for_people
from medfilip.reporting import write_json
from medfilip.training_stage import run_train_stage

if __name__ == "__main__":
    with for_people("train"):  # expected failures: one sentence, exit 1 (MEDFILIP_DEBUG=1: traceback)
        params = load_params()
        summary = run_train_stage(params, model_dir=Path("data/models/medfilip"), live_dir=Path("reports/train"),
                                   diagnostics=Path("reports/diagnostics.json"),
                                   diagnostics_figure=Path("reports/figures/ssm_similarity.png"))
        if summary is not None:
            write_json(Path("reports/train.json"), summary)

"""DVC stage `score`: how well `llm` and the keyword floor read Open-i and the phantom -> reports/quality.json."""

from pathlib import Path

from medfilip.benchmarks.quality import score_datasets
from medfilip.config import load_params
from medfilip.errors import for_people
from medfilip.reporting import write_json

if __name__ == "__main__":
    with for_people("score"):  # expected failures: one sentence, exit 1 (MEDFILIP_DEBUG=1: traceback)
        params = load_params()
        # Open-i comes from torchxrayvision's archive (missing: a sentence saying how to install it).
        results = score_datasets(params.llm, params.extract, openi=True, phantom_dir=Path("data/raw/phantom"))
        write_json(Path("reports/quality.json"), results)
        name = f"{params.llm.provider}:{params.llm.model}"
        openi, phantom = results["openi"][name]["held_out"]["category"], results["phantom"][name]["all"]["category"]
        print(f"score: {name} category F1, in scope / strict: Open-i held-out {openi['in_scope']['f1']:.3f} / "
              f"{openi['strict']['f1']:.3f}, phantom {phantom['in_scope']['f1']:.3f} / {phantom['strict']['f1']:.3f}")

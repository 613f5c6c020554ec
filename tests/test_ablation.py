"""The ablation queue's commands and the table that collects the experiments."""

from medfilip.ablation import COLUMNS, EXP_PREFIX, ROWS, ablation_markdown, queue_commands
from medfilip.cli import main


def test_queue_has_one_command_per_row_with_its_params():
    commands = queue_commands(["train.epochs=2"])
    assert len(commands) == len(ROWS)
    first = commands[0]
    assert first[:4] == ["dvc", "exp", "run", "--queue"]
    assert "explain.mode=report" in first and "train.targets=identity" in first and "train.epochs=2" in first
    assert "explain.mode=triplet_explanation" in commands[-1] and "train.targets=ssm" in commands[-1]


def test_table_reads_metrics_with_or_without_file_prefix_and_marks_missing_rows():
    records = [
        {"Experiment": EXP_PREFIX + "report", "reports/evaluate.json:mean_auc.explanation": 0.61,
         "mean_auc.name": 0.55},
        {"Experiment": EXP_PREFIX + "triplet-ssm-iki", "reports/evaluate.json:mean_auc.explanation": 0.7,
         "reports/eval/unseen.json:covid-19.auc_explanation": 0.77},
        {"Experiment": None, "mean_auc.explanation": 0.99},  # the workspace row is not an ablation row
    ]
    text = ablation_markdown(records, {"metric": "acc", "rows": {"report": 0.5}, "source": "from the paper"})
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "0.610" in lines["report"] and "0.550" in lines["report"] and lines["report"].endswith("| 0.500 |")
    assert "0.700" in lines["triplet+ssm+iki"] and "0.770" in lines["triplet+ssm+iki"]
    assert "not run" in lines["category"]
    assert "0.990" not in text
    assert len(text.splitlines()[2].split("|")) == len(COLUMNS) + 5


def test_cli_dry_run_prints_the_queue(capsys):
    assert main(["ablation", "queue", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(ROWS) and all(line.startswith("dvc exp run --queue") for line in out)

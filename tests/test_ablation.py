"""The ablation queue's commands and the table that collects the experiments over seeds."""

from pathlib import Path

import yaml

from medfilip.ablation import COLUMNS, PAPER_COLUMNS, ROWS, SEEDS, ablation_markdown, exp_name, queue_commands
from medfilip.cli import main

PAPER = Path(__file__).resolve().parents[1] / "data" / "paper" / "medfilip_tables.yaml"


def test_queue_has_one_command_per_row_and_seed_with_its_params():
    commands = queue_commands(["train.epochs=2"])
    assert len(commands) == len(ROWS) * len(SEEDS) == 24
    first = commands[0]
    assert first[:4] == ["dvc", "exp", "run", "--queue"]
    assert "explain.mode=report" in first and "train.targets=identity" in first and "train.epochs=2" in first
    assert "train.seed=0" in first and "train.seed=2" in commands[-1]
    assert all(c[-1] == "evaluate" for c in commands)  # each runs the DAG up to evaluate only
    # seed-major: a partly run queue has every row at seed 0 first
    assert [c[5] for c in commands[: len(ROWS)]] == [exp_name(r[0], 0) for r in ROWS]
    medfilip = commands[[r[0] for r in ROWS].index("triplet+ssm+iki")]
    assert "explain.mode=triplet_explanation" in medfilip and "train.targets=ssm" in medfilip
    raw = commands[[r[0] for r in ROWS].index("raw-cosines")]
    assert "ssm.calibration=raw" in raw


def _records(values):
    """exp_show-like records: row -> list of (zero-shot IKI AUC) per seed."""
    out = [{"Experiment": None, "mean_auc.explanation": 0.99}]  # the workspace row is not an ablation row
    for row, aucs in values.items():
        for seed, auc in enumerate(aucs):
            out.append({"Experiment": exp_name(row, seed), "reports/evaluate.json:mean_auc.explanation": auc,
                        "mean_auc.training": auc - 0.01})
    return out


def test_table_gives_mean_and_std_over_seeds_with_the_paper_row_beside():
    paper = yaml.safe_load(PAPER.read_text())
    records = _records({"report": [0.60, 0.62, 0.64], "category": [0.70, 0.71, 0.72], "triplet": [0.705]})
    text = ablation_markdown(records, paper)
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "0.620 ± 0.020" in lines["report"]  # mean and sample std of three seeds
    assert "0.705 (n=1)" in lines["triplet"]
    assert "not run" in lines["triplet+ssm"]
    # paper Table 6, MIMIC-16 and MIMIC-FG ACC of the report row: 63.9 and 54.9
    assert lines["report"].endswith("| 63.9 | 54.9 |")
    assert lines["triplet+ssm+iki"].endswith("| 74.7 | 71.9 |")
    assert lines["multihot"].endswith("| – | – |")  # no paper row: nothing invented
    assert "0.990" not in text
    assert len(text.splitlines()[2].split("|")) == len(COLUMNS) + len(PAPER_COLUMNS) + 4
    assert "* report → category: +0.090, larger than the seed spread" in text
    assert "* category → triplet: -0.005 (one seed only" in text


def test_a_difference_within_the_seed_spread_is_called_so():
    records = _records({"report": [0.60, 0.70, 0.65], "category": [0.62, 0.72, 0.67]})
    text = ablation_markdown(records, {})
    assert "* report → category: +0.020, within the seed spread (0.100" in text


def test_cli_dry_run_prints_the_queue(capsys):
    assert main(["ablation", "queue", "--dry-run", "--seeds", "0", "--rows", "report", "multihot"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(line.startswith("dvc exp run --queue") for line in out)


def test_runs_are_kept_across_checkouts_and_replaced_when_found_again(tmp_path):
    from medfilip.ablation import merge_runs

    path = tmp_path / "runs.json"
    first = merge_runs(path, _records({"report": [0.6, 0.7]}))
    assert [r["Experiment"] for r in first] == [exp_name("report", 0), exp_name("report", 1)]
    # a new checkout finds only seed 1 again, with a new value, and a run still queued (no metrics)
    running = {"Experiment": exp_name("triplet", 0), "State": "Running", "mean_auc.explanation": 0.9}
    again = merge_runs(path, [*_records({"report": [0.0, 0.75]})[2:], {"Experiment": exp_name("category", 0)},
                              running])
    by_name = {r["Experiment"]: r for r in again}
    assert by_name[exp_name("report", 0)]["reports/evaluate.json:mean_auc.explanation"] == 0.6
    assert by_name[exp_name("report", 1)]["reports/evaluate.json:mean_auc.explanation"] == 0.75
    assert exp_name("category", 0) not in by_name
    assert exp_name("triplet", 0) not in by_name  # a running experiment carries the workspace's metrics


def test_the_workspace_run_is_recorded_as_the_row_its_params_are(tmp_path):
    import json

    import pytest

    from medfilip.ablation import workspace_record

    params = yaml.safe_load((PAPER.parents[2] / "params.yaml").read_text())
    (tmp_path / "reports" / "eval").mkdir(parents=True)
    (tmp_path / "reports" / "evaluate.json").write_text(json.dumps({
        "mean_auc": {"training": 0.8, "explanation": 0.81}, "fine_grained_severity_accuracy": 0.5,
        "fine_grained_severity_accuracy_training": 0.49, "retrieval": {"i2t": {"p@1": 0.7}}}))
    (tmp_path / "reports" / "eval" / "unseen.json").write_text(json.dumps({"covid-19": {"auc_explanation": 0.8}}))
    record = workspace_record(params, "abc1234", tmp_path)
    assert record["Experiment"] == exp_name("triplet+ssm+iki", params["train"]["seed"])  # the defaults' row
    assert record["reports/evaluate.json:mean_auc.explanation"] == 0.81
    assert record["reports/eval/unseen.json:covid-19.auc_explanation"] == 0.8

    params["explain"]["mode"], params["train"]["targets"], params["train"]["seed"] = "category", "identity", 2
    assert workspace_record(params, "abc1234", tmp_path)["Experiment"] == exp_name("category", 2)
    params["train"]["targets"] = "multihot"  # category texts with multi-hot targets: no row
    with pytest.raises(SystemExit, match="matches no ablation row"):
        workspace_record(params, "abc1234", tmp_path)

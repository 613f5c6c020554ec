"""The paper's ablation (Table 6) as a DVC experiment queue, and the table that collects it.

``medfilip ablation queue`` queues one ``dvc exp run`` per row; ``dvc queue start`` (or
``dvc exp run --run-all``) runs them; ``medfilip ablation report`` reads their metrics
with ``dvc.api.exp_show`` and writes ``reports/ablation.md`` beside the paper's numbers
(``data/paper/table6.yaml``).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import yaml

# Each row adds one ingredient; the last is MedFILIP as configured in params.yaml.
ROWS: list[tuple[str, str, dict[str, str]]] = [
    ("report", "report text, CLIP-style identity targets", {"explain.mode": "report", "train.targets": "identity"}),
    ("category", "category only", {"explain.mode": "category", "train.targets": "identity"}),
    ("triplet", "fine-grained triplet", {"explain.mode": "triplet", "train.targets": "identity"}),
    ("triplet+ssm", "+ SSM soft targets", {"explain.mode": "triplet", "train.targets": "ssm"}),
    ("triplet+ssm+iki", "+ IKI explanations (MedFILIP)", {"explain.mode": "triplet_explanation", "train.targets": "ssm"}),
]
# Metric columns: (header, metrics file, dotted key inside it).
COLUMNS = [
    ("zero-shot AUC (explanation)", "reports/evaluate.json", "mean_auc.explanation"),
    ("zero-shot AUC (name)", "reports/evaluate.json", "mean_auc.name"),
    ("severity acc.", "reports/evaluate.json", "fine_grained_severity_accuracy"),
    ("unseen AUC (explanation)", "reports/eval/unseen.json", "covid-19.auc_explanation"),
    ("best val AUC", "reports/train.json", "best_val_auc"),
]
EXP_PREFIX = "ablation-"


def queue_commands(extra: Iterable[str] = ()) -> list[list[str]]:
    """The ``dvc exp run --queue`` command of every row (``extra``: more ``-S key=value`` for all)."""
    commands = []
    for name, _, sets in ROWS:
        cmd = ["dvc", "exp", "run", "--queue", "--name", EXP_PREFIX + name.replace("+", "-")]
        for key, value in sets.items():
            cmd += ["-S", f"{key}={value}"]
        for item in extra:
            cmd += ["-S", item]
        commands.append(cmd)
    return commands


def _lookup(record: Mapping[str, Any], file: str, key: str) -> Optional[float]:
    """A metric of an ``exp_show`` record, whose keys may or may not carry the file name."""
    for candidate in (f"{file}:{key}", key):
        if candidate in record and record[candidate] not in (None, "", "-"):
            try:
                return float(record[candidate])
            except (TypeError, ValueError):
                return None
    return None


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def ablation_markdown(records: list[Mapping[str, Any]], paper: Mapping[str, Any]) -> str:
    """The ablation table: one row per ablation experiment found in ``records``, paper beside it."""
    by_name = {str(r.get("Experiment") or ""): r for r in records}
    paper_rows = (paper or {}).get("rows", {})
    paper_metric = (paper or {}).get("metric", "paper")
    header = ["row", "what changes", *[c[0] for c in COLUMNS], f"paper: {paper_metric}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, description, _ in ROWS:
        record = by_name.get(EXP_PREFIX + name.replace("+", "-"))
        values = [_fmt(_lookup(record, f, k)) if record else "not run" for _, f, k in COLUMNS]
        lines.append("| " + " | ".join([name, description, *values, _fmt(paper_rows.get(name))]) + " |")
    note = (paper or {}).get("source", "")
    return "\n".join(["# Ablation (paper Table 6)", "", *lines, "", note, ""])


def run(args) -> int:
    if args.action == "queue":
        for cmd in queue_commands(args.set or ()):
            print(" ".join(cmd))
            if not args.dry_run:
                subprocess.run(cmd, check=True)
        if not args.dry_run:
            print("queued; run them with: dvc queue start   (then: medfilip ablation report)")
        return 0
    import dvc.api

    # Experiments hang off the commit they were queued from: --num looks that many commits back.
    records = dvc.api.exp_show(repo=".", num=args.num)
    paper = yaml.safe_load(Path(args.paper).read_text()) if Path(args.paper).is_file() else {}
    text = ablation_markdown(records, paper)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    sys.stdout.write(text)
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=("queue", "report"))
    parser.add_argument("--set", "-S", action="append", help="queue: extra params for every row, key=value")
    parser.add_argument("--dry-run", action="store_true", help="queue: print the commands only")
    parser.add_argument("--paper", default="data/paper/table6.yaml")
    parser.add_argument("--out", default="reports/ablation.md")
    parser.add_argument("--num", type=int, default=1,
                        help="report: look for the experiments on the last N commits (they are queued from HEAD)")

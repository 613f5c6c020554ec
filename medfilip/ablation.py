"""The paper's ablation (Table 6) over seeds, as a DVC experiment queue, and the table that collects it.

``medfilip ablation queue`` queues one ``dvc exp run`` per (row, seed); ``dvc queue start``
(or ``dvc exp run --run-all``) runs them; ``medfilip ablation report`` reads their metrics with
``dvc.api.exp_show`` and writes ``reports/ablation.md``: mean ± std over seeds per row, the
paper's Table 6 row beside it (``data/paper/medfilip_tables.yaml``), and for each adjacent pair
of rows whether their difference exceeds the seed spread.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import yaml

# (name, what changes, params set, the paper's Table 6 row it corresponds to or None).
# The first five add one ingredient each; the last is MedFILIP as configured in params.yaml.
ROWS: list[tuple[str, str, dict[str, str], Optional[str]]] = [
    ("report", "report text, CLIP-style identity targets",
     {"explain.mode": "report", "train.targets": "identity"}, "report"),
    ("category", "category only", {"explain.mode": "category", "train.targets": "identity"}, "category"),
    ("triplet", "fine-grained triplet", {"explain.mode": "triplet", "train.targets": "identity"}, "triplet"),
    ("triplet+ssm", "+ SSM soft targets", {"explain.mode": "triplet", "train.targets": "ssm"}, "triplet+ssm"),
    ("triplet+ssm+iki", "+ IKI explanations (MedFILIP, the default)",
     {"explain.mode": "triplet_explanation", "train.targets": "ssm"}, "triplet+ssm+iki (MedFILIP)"),
    ("raw-cosines", "MedFILIP with the paper's raw SSM cosines (ssm.calibration: raw)",
     {"explain.mode": "triplet_explanation", "train.targets": "ssm", "ssm.calibration": "raw"}, None),
    ("multihot", "MedFILIP texts, MedCLIP-style multi-hot targets",
     {"explain.mode": "triplet_explanation", "train.targets": "multihot"}, None),
    ("released-loss", "MedFILIP, the released code's MSE + BCE loss",
     {"explain.mode": "triplet_explanation", "train.targets": "ssm", "train.loss": "released"}, None),
]
SEEDS = (0, 1, 2)
# Metric columns: (header, metrics file, dotted key inside it).
COLUMNS = [
    ("zero-shot AUC, training-style prompts", "reports/evaluate.json", "mean_auc.training"),
    ("zero-shot AUC, IKI prompts", "reports/evaluate.json", "mean_auc.explanation"),
    ("severity acc., training-style", "reports/evaluate.json", "fine_grained_severity_accuracy_training"),
    ("severity acc., IKI", "reports/evaluate.json", "fine_grained_severity_accuracy"),
    ("unseen AUC, IKI", "reports/eval/unseen.json", "covid-19.auc_explanation"),
    ("retrieval I2T P@1", "reports/evaluate.json", "retrieval.i2t.p@1"),
]
# The paper's columns shown beside ours: Table 6 [ACC, F1] per dataset, ACC of these two.
PAPER_COLUMNS = ("MIMIC-16", "MIMIC-FG")
EXP_PREFIX = "ablation-"
UNFINISHED_STATES = ("Queued", "Running", "Failed")


def exp_name(row: str, seed: int) -> str:
    return f"{EXP_PREFIX}{row.replace('+', '-')}-s{seed}"


def queue_commands(extra: Iterable[str] = (), seeds: Sequence[int] = SEEDS,
                   rows: Optional[Sequence[str]] = None) -> list[list[str]]:
    """The ``dvc exp run --queue`` command of every (row, seed), seed-major so that a partly run
    queue has every row at its first seeds (``extra``: more ``-S key=value`` for all)."""
    extra = list(extra)
    commands = []
    for seed in seeds:
        for name, _, sets, _ in ROWS:
            if rows is not None and name not in rows:
                continue
            cmd = ["dvc", "exp", "run", "--queue", "--name", exp_name(name, seed)]
            for key, value in {**sets, "train.seed": str(seed)}.items():
                cmd += ["-S", f"{key}={value}"]
            for item in extra:
                cmd += ["-S", item]
            commands.append(cmd + ["evaluate"])  # up to evaluate: the extra evaluation sets are not in the table
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


def _mean_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return None, None
    return float(np.mean(kept)), float(np.std(kept, ddof=1)) if len(kept) > 1 else None


def _fmt(mean: Optional[float], std: Optional[float], n: int) -> str:
    if mean is None:
        return "not run"
    text = f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"
    return text if n == len(SEEDS) else f"{text} (n={n})"


def collect(records: list[Mapping[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """row -> column header -> the values of the seeds that ran."""
    by_name = {str(r.get("Experiment") or ""): r for r in records}
    table: dict[str, dict[str, list[float]]] = {}
    for name, _, _, _ in ROWS:
        table[name] = {header: [] for header, _, _ in COLUMNS}
        for seed in SEEDS:
            record = by_name.get(exp_name(name, seed))
            if record is None:
                continue
            for header, file, key in COLUMNS:
                value = _lookup(record, file, key)
                if value is not None and not math.isnan(value):
                    table[name][header].append(value)
    return table


def _paper_row(paper: Mapping[str, Any], name: Optional[str]) -> list[str]:
    table = (paper or {}).get("table6_ablation") or {}
    columns = table.get("columns") or []
    row = next((r for r in table.get("rows") or [] if r.get("name") == name), None) if name else None
    out = []
    for col in PAPER_COLUMNS:
        if row is None or col not in columns:
            out.append("–")
        else:
            out.append(f"{row['values'][columns.index(col)][0]:.1f}")
    return out


def compare_adjacent(table: Mapping[str, Mapping[str, list[float]]], header: str) -> list[str]:
    """One sentence per adjacent pair of the first five rows: is the change in ``header``
    larger than the seeds' spread (|difference of means| > std_a + std_b)?"""
    names = [name for name, *_ in ROWS]
    lines = []
    for a, b in zip(names[:4], names[1:5]):
        ma, sa = _mean_std(table[a][header])
        mb, sb = _mean_std(table[b][header])
        if ma is None or mb is None:
            lines.append(f"* {a} → {b}: not both run")
            continue
        if sa is None or sb is None:
            lines.append(f"* {a} → {b}: {mb - ma:+.3f} (one seed only on a side: no spread to compare with)")
            continue
        spread = sa + sb
        verdict = "larger than" if abs(mb - ma) > spread else "within"
        lines.append(f"* {a} → {b}: {mb - ma:+.3f}, {verdict} the seed spread ({spread:.3f} = std + std)")
    return lines


def ablation_markdown(records: list[Mapping[str, Any]], paper: Mapping[str, Any]) -> str:
    """The ablation table: one row per ablation row, mean ± std over its seeds, paper beside it."""
    table = collect(records)
    header = ["row", "what changes", *[c[0] for c in COLUMNS], *[f"paper {c} ACC" for c in PAPER_COLUMNS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, description, _, paper_name in ROWS:
        cells = []
        for h, _, _ in COLUMNS:
            mean, std = _mean_std(table[name][h])
            cells.append(_fmt(mean, std, len(table[name][h])))
        lines.append("| " + " | ".join([name, description, *cells, *_paper_row(paper, paper_name)]) + " |")
    citation = ("Paper columns: Liang et al., MedFILIP, IEEE JBHI 2025, Table 6 (zero-shot ACC, %, on MIMIC-16 and "
                "MIMIC-FG; data/paper/medfilip_tables.yaml). Ours: the phantom's test split, mean ± sample std "
                f"over train.seed {', '.join(map(str, SEEDS))}; '(n=k)' marks rows with fewer seeds run.")
    out = ["# Ablation (paper Table 6)", "", *lines, "", citation, ""]
    for h in (COLUMNS[1][0], COLUMNS[3][0]):
        out += [f"Adjacent rows, {h}:", "", *compare_adjacent(table, h), ""]
    return "\n".join(out)


def merge_runs(path: Path, records: list[Mapping[str, Any]]) -> list[dict]:
    """Keep every ablation run's metrics in ``path`` (``reports/ablation_runs.json``, committed):
    DVC keeps experiments in local git refs only, so a fresh clone would lose them. A run found
    again replaces its old entry; runs of other checkouts are kept."""
    kept = {r["Experiment"]: r for r in json.loads(path.read_text())} if path.is_file() else {}
    for record in records:
        name = str(record.get("Experiment") or "")
        # A queued, running or failed experiment shows the workspace's metrics, not its own.
        if not name.startswith(EXP_PREFIX) or record.get("State") in UNFINISHED_STATES:
            continue
        entry = {"Experiment": name, "rev": record.get("rev")}
        for _, file, key in COLUMNS:
            value = _lookup(record, file, key)
            if value is not None:
                entry[f"{file}:{key}"] = value
        if len(entry) > 2:  # a queued or failed run has no metrics yet
            kept[name] = entry
    runs = [kept[name] for name in sorted(kept)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(runs, indent=1) + "\n")
    return runs


def _dig(mapping: Any, dotted: str) -> Any:
    """``mapping["a"]["b"]`` for ``"a.b"``; None where a part is missing."""
    for part in dotted.split("."):
        mapping = mapping.get(part) if isinstance(mapping, Mapping) else None
    return mapping


def workspace_record(params: Mapping[str, Any], rev: str, root: Path = Path(".")) -> dict[str, Any]:
    """The workspace's own ``dvc repro`` as the ablation run it is: the row whose params it has, at
    its ``train.seed`` (the default params are the MedFILIP row; a seed-0 experiment of it would
    train the same bits again). Its metrics are read from the files under ``root``.

    A row is its ``-S`` overrides on top of the workspace's params, as the queue runs it, so the
    row is the most specific one all of whose overrides the params already have."""
    matching = [(len(sets), name) for name, _, sets, _ in ROWS
                if all(str(_dig(params, k)) == v for k, v in sets.items())]
    if not matching:
        raise SystemExit("ablation record: params.yaml matches no ablation row (medfilip/ablation.py ROWS); "
                         "record only a workspace run at a row's params.")
    row = max(matching, key=lambda m: m[0])[1]
    record: dict[str, Any] = {"Experiment": exp_name(row, int(_dig(params, "train.seed"))), "rev": rev}
    for _, file, key in COLUMNS:
        value = _dig(json.loads((root / file).read_text()), key)
        if value is not None:
            record[f"{file}:{key}"] = value
    return record


def run(args) -> int:
    if args.action == "record":
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        record = workspace_record(yaml.safe_load(Path(args.params).read_text()), args.rev or rev, Path(args.root))
        merge_runs(Path(args.runs), [record])
        print(f"recorded {record['Experiment']} (rev {record['rev']}) in {args.runs}")
        return 0
    if args.action == "queue":
        for cmd in queue_commands(args.set or (), seeds=args.seeds or SEEDS, rows=args.rows):
            print(" ".join(cmd))
            if not args.dry_run:
                subprocess.run(cmd, check=True)
        if not args.dry_run:
            print("queued; run them with: dvc queue start   (then: medfilip ablation report)")
        return 0
    import dvc.api

    # Experiments hang off the commit they were queued from: --num looks that many commits back.
    records = merge_runs(Path(args.runs), dvc.api.exp_show(repo=".", num=args.num))
    paper = yaml.safe_load(Path(args.paper).read_text()) if Path(args.paper).is_file() else {}
    text = ablation_markdown(records, paper)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    sys.stdout.write(text)
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=("queue", "report", "record"),
                        help="record: add the workspace's own run (its metrics files) as the row its params.yaml is")
    parser.add_argument("--set", "-S", action="append", help="queue: extra params for every row, key=value")
    parser.add_argument("--seeds", type=int, nargs="+", help=f"queue: train.seed values (default {SEEDS})")
    parser.add_argument("--rows", nargs="+", choices=[r[0] for r in ROWS], help="queue: only these rows")
    parser.add_argument("--dry-run", action="store_true", help="queue: print the commands only")
    parser.add_argument("--paper", default="data/paper/medfilip_tables.yaml")
    parser.add_argument("--out", default="reports/ablation.md")
    parser.add_argument("--runs", default="reports/ablation_runs.json",
                        help="report: every run's metrics, kept across checkouts (committed)")
    parser.add_argument("--params", default="params.yaml", help="record: the workspace's params")
    parser.add_argument("--root", default=".", help="record: where its metrics files are")
    parser.add_argument("--rev", help="record: the commit the metrics are of (default HEAD)")
    parser.add_argument("--num", type=int, default=1,
                        help="report: look for the experiments on the last N commits (they are queued from HEAD)")

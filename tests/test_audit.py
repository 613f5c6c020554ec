"""`medfilip audit`: views over the artifacts and the cache, saved queries, read-only."""

import csv
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medfilip import audit
from medfilip.cli import main
from medfilip.config import ExtractParams, LLMParams, Params
from medfilip.extract.run import run_extract
from medfilip.extract.standin import StandinServer

ROOT = Path(__file__).resolve().parents[1]

REPORTS = {
    "s1": "FINDINGS: Small left pleural effusion. No pneumothorax.",
    "s2": "FINDINGS: Lungs are clear. Heart size is normal.",
    "s3": "FINDINGS: Moderate cardiomegaly. Mild pulmonary edema. Right lower lobe consolidation.",
    "s4": "IMPRESSION: Large right pneumothorax.",
}


def other_model(report: str) -> dict:
    """A second 'model' that sees only effusions and pneumothoraces, never negations."""
    found = [c for c in ("pleural effusion", "pneumothorax") if c.split()[-1] in report.lower()]
    return {"findings": [{"severity": None, "location": None, "category": c, "negated": False,
                          "uncertain": False, "evidence": None} for c in found]}


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for sub in ("audit", "prompts"):
        shutil.copytree(ROOT / "data" / sub, tmp_path / "data" / sub)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    interim = tmp_path / "data" / "interim"
    interim.mkdir(parents=True)
    studies = pa.table({"study_id": list(REPORTS), "patient_id": list(REPORTS), "split": ["train"] * 4,
                        "report": list(REPORTS.values())})
    pq.write_table(studies, interim / "studies.parquet")
    params = Params()
    run_extract(studies, params.llm, ExtractParams(text="report", progress=False), interim)
    monkeypatch.setenv("MEDFILIP_TEST_KEY", "k")
    with StandinServer(answer=other_model) as server:
        llm = LLMParams(provider="openai", model="other", base_url=server.base_url, api_key_env="MEDFILIP_TEST_KEY")
        run_extract(studies, llm, ExtractParams(text="report", progress=False), tmp_path / "other")
    return tmp_path, params


def query(params, sql):
    con, _ = audit.connect(params)
    return audit.run_query(con, sql)


def test_views_present(project):
    _, params = project
    _, views = audit.connect(params)
    assert {"studies", "triplets_raw", "extractions", "llm_calls"} <= set(views)
    cols, rows = query(params, "SELECT count(*) FROM llm_calls")
    assert rows[0][0] == 8  # 4 reports x 2 extractors, side by side


def test_findings_per_category_matches_python_count(project):
    _, params = project
    queries = audit.saved_queries()
    cols, rows = query(params, queries["findings_per_category"][1])
    got = {r[cols.index("category")]: (r[cols.index("positive")], r[cols.index("negated")]) for r in rows}
    triplets = pq.read_table("data/interim/triplets_raw.parquet").to_pylist()
    pos = Counter(t["category"] for t in triplets if not t["negated"])
    neg = Counter(t["category"] for t in triplets if t["negated"])
    assert got == {c: (pos[c], neg[c]) for c in set(pos) | set(neg)}
    assert got["pleural effusion"][0] == 1 and got["pneumothorax"] == (1, 1)


def test_no_findings_and_failures_queries(project):
    _, params = project
    queries = audit.saved_queries()
    cols, rows = query(params, queries["no_findings"][1])
    assert [r[0] for r in rows] == ["s2"] or all(r[0] == "s2" for r in rows)
    cols, rows = query(params, queries["failures_by_error"][1])
    assert rows == []


def test_model_agreement_from_cache(project):
    _, params = project
    cols, rows = query(params, audit.saved_queries()["model_agreement"][1])
    assert len(rows) == 1
    row = dict(zip(cols, rows[0]))
    assert {row["model_a"], row["model_b"]} == {"openai:other", "rules:rules-v1"}
    assert row["shared_reports"] == 4
    # s1: {effusion} vs {effusion, pneumothorax} (the other model misses "No"): Jaccard 1/2
    # s2: both empty: 1;  s3: three findings vs none: 0;  s4: {pneumothorax} both: 1
    assert row["exact_match"] == pytest.approx(0.5)
    assert row["mean_jaccard"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)


@pytest.mark.parametrize("sql", [
    "COPY (SELECT 1) TO 'leak.csv'",
    "CREATE TABLE x AS SELECT 1",
    "DROP VIEW studies",
    "INSERT INTO studies VALUES (1)",
    "SELECT 1; SELECT 2",
    "ATTACH 'other.db'",
])
def test_refuses_anything_but_select(project, sql):
    _, params = project
    with pytest.raises(audit.AuditError):
        query(params, sql)
    assert not Path("leak.csv").exists()


def test_cli_formats(project, capsys):
    root, _ = project
    assert main(["audit", "SELECT study_id, n_findings FROM extractions ORDER BY study_id", "--format", "csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["study_id", "n_findings"] and [r[0] for r in rows[1:]] == ["s1", "s2", "s3", "s4"]
    assert main(["audit", "--query", "findings_per_category", "--format", "json"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), list)
    assert main(["audit", "SELECT * FROM studies"]) == 0
    assert "(4 rows" in capsys.readouterr().out
    assert main(["audit", "--query", "nope"]) == 1
    assert "no saved query 'nope'" in capsys.readouterr().err
    assert main(["audit", "SELECT * FROM missing_view"]) == 1

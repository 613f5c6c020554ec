"""`medfilip audit`: views over the artifacts and the cache, saved queries, read-only."""

import csv
import hashlib
import io
import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medfilip import audit
from medfilip.cli import main
from medfilip.config import ExtractParams, LLMParams, Params
from medfilip.extract.run import run_extract
from medfilip.testing.standin import StandinServer

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
    with audit.session(params, sql=sql) as (con, _):
        return audit.run_query(con, sql)


def test_views_present(project):
    _, params = project
    with audit.session(params) as (_, views):
        assert {"studies", "triplets_raw", "extractions", "llm_calls"} <= set(views)
    assert set(audit.available_views(params)) == set(views)
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


# --------------------------------------------------------------------------- read-only, bounded (issue 9)


def checksums(root: Path, skip_shm: bool = False) -> dict[str, str]:
    """sha256 of every file under ``root`` (the parquet artifacts, the SQLite cache and its sidecars)."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not (skip_shm and path.name.endswith("-shm"))
    }


def run_every_kind_of_audit(capsys) -> str:
    assert main(["audit", "--list"]) == 0
    assert main(["audit", "SELECT status, count(*) AS n FROM llm_calls GROUP BY ALL", "--format", "json"]) == 0
    out = capsys.readouterr().out
    ran = [main(["audit", "--query", name]) for name in audit.saved_queries()]
    assert ran.count(0) >= 4  # drop_reasons and oov_terms need stages this project has not run
    assert main(["audit", "SELECT count(*) FROM studies"]) == 0
    assert main(["audit", "CREATE TABLE x AS SELECT 1"]) == 1
    capsys.readouterr()
    return out


def test_an_audit_changes_no_file(project, capsys):
    root, params = project
    cache = root / params.extract.cache
    assert cache.exists() and any(p.suffix == ".parquet" for p in root.rglob("*"))
    before = checksums(root)
    out = run_every_kind_of_audit(capsys)
    assert sum(r["n"] for r in json.loads(out[out.index("["):])) == 8
    assert checksums(root) == before  # same bytes, and no -wal/-shm file left behind


def test_an_audit_after_a_killed_extraction_reads_its_answers_and_changes_no_file(project, capsys):
    """A killed writer leaves committed answers in the -wal file; opening the cache writable
    would checkpoint them into the main file (the old audit did)."""
    root, params = project
    cache = root / params.extract.cache
    writer = textwrap.dedent("""
        import os, sqlite3, sys
        c = sqlite3.connect(sys.argv[1], isolation_level=None)
        c.execute("PRAGMA journal_mode = WAL")
        c.execute("INSERT INTO llm_calls (key, identity_json, report_sha256, status, error, created_at, updated_at)"
                  " VALUES ('k-killed', '{}', 'r', 'failed', 'killed', 0, 0)")
        os._exit(0)  # killed: no close, no checkpoint
    """)
    subprocess.run([sys.executable, "-c", writer, str(cache)], check=True)
    assert cache.with_name(cache.name + "-wal").exists()
    before = checksums(root, skip_shm=True)  # -shm: SQLite's shared-memory index, never an artifact
    out = run_every_kind_of_audit(capsys)
    assert sum(r["n"] for r in json.loads(out[out.index("["):])) == 9  # the WAL's answer is seen
    assert checksums(root, skip_shm=True) == before


def test_a_file_that_is_not_a_cache_is_refused_not_initialised(project):
    root, params = project
    cache = root / params.extract.cache
    cache.unlink()
    sqlite3.connect(cache).close()  # an empty SQLite file (user_version 0, no table)
    before = checksums(root)
    with pytest.raises(audit.AuditError, match="not an LLM cache"):
        query(params, "SELECT count(*) FROM llm_calls")
    assert query(params, "SELECT count(*) FROM studies")[1] == [(4,)]  # other views still work
    assert checksums(root) == before


def test_list_and_queries_without_llm_calls_never_read_the_cache(project, monkeypatch, capsys):
    _, params = project

    def refuse(*args, **kwargs):
        raise AssertionError("the LLM cache was read")

    monkeypatch.setattr(audit, "cache_batches", refuse)
    assert main(["audit", "--list"]) == 0
    assert "llm_calls" in capsys.readouterr().out
    assert main(["audit", "SELECT count(*) FROM extractions"]) == 0


def test_cache_streams_in_batches_with_every_column(project, tmp_path):
    root, params = project
    schema, batches = audit.cache_batches(root / params.extract.cache, batch_rows=3)
    sizes = [b.num_rows for b in batches]
    assert sizes == [3, 3, 2]
    assert schema.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert {"raw_text", "answer_json", "status", "model"} <= set(schema.names)
    assert audit.cache_to_parquet(root / params.extract.cache, tmp_path / "c.parquet", batch_rows=3) == 8
    assert pq.read_table(tmp_path / "c.parquet").schema.equals(schema)

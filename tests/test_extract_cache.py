"""The content-addressed LLM answer cache: round trips, failures, durability, speed."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pytest

from medfilip.extract.base import Answer
from medfilip.extract.cache import COLUMN_NAMES, LLMCache, cache_key, redact_secrets, register_secret
from medfilip.extract.schema import Finding

REPO = Path(__file__).resolve().parents[1]
IDENTITY = {"provider": "openai", "model": "gpt-test", "prompt_version": "extract_v1", "temperature": 0.0}
REPORT = "FINDINGS: Mild left lower lobe consolidation. No pneumothorax."


def _answer(**overrides) -> Answer:
    values = dict(
        findings=[
            Finding("consolidation", "mild", "left lower lobe", evidence="Mild left lower lobe consolidation."),
            Finding("pneumothorax", negated=True, evidence="No pneumothorax."),
        ],
        n_dropped=1,
        raw_text='{"findings": [...]}',
        prompt_tokens=321,
        completion_tokens=45,
        latency_s=1.25,
        attempts=2,
    )
    values.update(overrides)
    return Answer(**values)


@pytest.fixture
def cache(tmp_path):
    with LLMCache(tmp_path / "sub" / "llm.sqlite") as opened:
        yield opened


def test_cache_key_is_canonical_and_content_addressed():
    reordered = dict(reversed(list(IDENTITY.items())))
    assert cache_key(IDENTITY, REPORT) == cache_key(reordered, REPORT)
    assert len(cache_key(IDENTITY, REPORT)) == 64
    assert cache_key(IDENTITY, REPORT) != cache_key(IDENTITY, REPORT + " ")
    assert cache_key(IDENTITY, REPORT) != cache_key({**IDENTITY, "model": "other"}, REPORT)


def test_put_get_round_trip(cache, tmp_path):
    assert (tmp_path / "sub" / "llm.sqlite").exists()  # parent folders created
    key = cache_key(IDENTITY, REPORT)
    before = time.time()
    cache.put_ok(key, IDENTITY, REPORT, _answer(), study_id="s1")
    got = cache.get_many([key, "missing"])
    assert list(got) == [key]
    hit = got[key]
    assert hit.findings == _answer().findings
    assert (hit.n_dropped, hit.prompt_tokens, hit.completion_tokens, hit.attempts) == (1, 321, 45, 2)
    assert hit.latency_s == pytest.approx(1.25)
    assert before - 1 <= hit.created_at <= time.time() + 1


def test_failures_are_recorded_but_never_served(cache):
    key = cache_key(IDENTITY, REPORT)
    cache.put_failure(key, IDENTITY, REPORT, "HTTP 429 rate limited after 7 attempts", attempts=7, latency_s=30.0)
    assert cache.get_many([key]) == {}
    rows = cache.to_arrow().to_pylist()
    assert [(r["status"], r["error"], r["attempts"]) for r in rows] == [
        ("failed", "HTTP 429 rate limited after 7 attempts", 7)
    ]

    cache.put_ok(key, IDENTITY, REPORT, _answer())  # a later success overwrites the failure
    assert cache.get_many([key])[key].findings == _answer().findings
    (row,) = cache.to_arrow().to_pylist()
    assert row["status"] == "ok" and row["error"] is None

    cache.put_failure(key, IDENTITY, REPORT, "late failure", attempts=1, latency_s=1.0)  # never clobbers an answer
    assert key in cache.get_many([key])
    assert cache.to_arrow().column("status").to_pylist() == ["ok"]


def test_models_live_side_by_side(cache):
    other = {**IDENTITY, "model": "llama-3-8b"}
    k1, k2 = cache_key(IDENTITY, REPORT), cache_key(other, REPORT)
    cache.put_ok(k1, IDENTITY, REPORT, _answer(), study_id="s1")
    cache.put_ok(k2, other, REPORT, _answer(findings=[Finding("opacity")], n_dropped=0), study_id="s1")
    got = cache.get_many([k1, k2])
    assert got[k1].findings != got[k2].findings
    table = cache.to_arrow()
    assert sorted(table.column("model").to_pylist()) == ["gpt-test", "llama-3-8b"]
    assert len(set(table.column("report_sha256").to_pylist())) == 1


def test_to_arrow_feeds_duckdb(cache):
    cache.put_ok(cache_key(IDENTITY, "a"), IDENTITY, "a", _answer(), study_id="s1")
    cache.put_failure(cache_key(IDENTITY, "b"), IDENTITY, "b", "timed out", attempts=3, latency_s=9.0, study_id="s2")
    llm_calls = cache.to_arrow()
    assert tuple(llm_calls.column_names) == COLUMN_NAMES
    counts = duckdb.sql(
        "SELECT status, count(*), sum(prompt_tokens) FROM llm_calls GROUP BY status ORDER BY status"
    ).fetchall()
    assert counts == [("failed", 1, 0), ("ok", 1, 321)]  # a failure records what its attempts cost
    assert duckdb.sql("SELECT max(created_at) <= now() FROM llm_calls").fetchall() == [(True,)]


def test_empty_cache_to_arrow(cache):
    table = cache.to_arrow()
    assert table.num_rows == 0 and tuple(table.column_names) == COLUMN_NAMES


def test_two_handles_on_one_file(tmp_path):
    path = tmp_path / "llm.sqlite"
    with LLMCache(path) as writer, LLMCache(path) as reader:
        key = cache_key(IDENTITY, REPORT)
        writer.put_ok(key, IDENTITY, REPORT, _answer())
        assert key in reader.get_many([key])  # visible to another connection at once


def test_read_only_handle_for_audits(tmp_path):
    path = tmp_path / "llm.sqlite"
    with pytest.raises(FileNotFoundError):
        LLMCache(path, read_only=True)
    with LLMCache(path) as writer:
        writer.put_ok(cache_key(IDENTITY, REPORT), IDENTITY, REPORT, _answer())
        with LLMCache(path, read_only=True) as reader:
            assert reader.to_arrow().num_rows == 1
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                reader.put_ok(cache_key(IDENTITY, "x"), IDENTITY, "x", _answer())


def test_put_survives_kill_9(tmp_path):
    """A put that returned is on disk even if the process dies the next instant."""
    path = tmp_path / "llm.sqlite"
    child = textwrap.dedent(
        f"""
        import os, signal, sys
        from medfilip.extract.base import Answer
        from medfilip.extract.cache import LLMCache, cache_key
        from medfilip.extract.schema import Finding
        cache = LLMCache({str(path)!r})
        identity = {IDENTITY!r}
        for i in range(3):
            report = f"report {{i}}"
            cache.put_ok(cache_key(identity, report), identity, report,
                         Answer(findings=[Finding("opacity", "mild")]), study_id=str(i))
        os.kill(os.getpid(), signal.SIGKILL)  # right after the last put returned, no close
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with LLMCache(path) as reopened:
        keys = [cache_key(IDENTITY, f"report {i}") for i in range(3)]
        got = reopened.get_many(keys)
        assert set(got) == set(keys)
        assert got[keys[2]].findings == [Finding("opacity", "mild")]


def test_put_survives_kill_9_from_parent(tmp_path):
    """The parent kills the writer as soon as it reports the put returned."""
    path = tmp_path / "llm.sqlite"
    child = textwrap.dedent(
        f"""
        import sys, time
        from medfilip.extract.base import Answer
        from medfilip.extract.cache import LLMCache, cache_key
        cache = LLMCache({str(path)!r})
        identity = {IDENTITY!r}
        cache.put_ok(cache_key(identity, "r"), identity, "r", Answer(findings=[]))
        print("put", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "put"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
    with LLMCache(path) as reopened:
        assert cache_key(IDENTITY, "r") in reopened.get_many([cache_key(IDENTITY, "r")])


def test_get_many_over_100k_keys(cache):
    n_stored, n_asked = 20_000, 100_000
    answer = _answer()
    with cache.batch():
        for i in range(n_stored):
            report = f"report {i}"
            cache.put_ok(cache_key(IDENTITY, report), IDENTITY, report, answer)
        cache.put_failure(cache_key(IDENTITY, "report 0"), IDENTITY, "report 0", "x", 1, 0.0)  # ok stays
    asked = [cache_key(IDENTITY, f"report {i}") for i in range(n_asked)]
    start = time.perf_counter()
    got = cache.get_many(asked)
    elapsed = time.perf_counter() - start
    print(f"get_many: {n_asked} keys ({n_stored} hits) in {elapsed:.3f}s")
    assert len(got) == n_stored
    assert set(got) == set(asked[:n_stored])
    assert got[asked[123]].findings == answer.findings


def test_secrets_never_reach_the_file(tmp_path):
    secret = "sk-cachetest-0123456789abcdefXYZ"
    register_secret(secret)
    path = tmp_path / "llm.sqlite"
    with LLMCache(path) as cache:
        key = cache_key(IDENTITY, REPORT)
        cache.put_failure(key, IDENTITY, REPORT, f"HTTP 401: Incorrect API key provided: Bearer {secret}", 1, 0.1)
        cache.put_failure(cache_key(IDENTITY, "x"), IDENTITY, "x", "proxy said sk-unregisteredKEY1234567890", 1, 0.1)
        cache.put_ok(cache_key(IDENTITY, "y"), IDENTITY, "y", _answer(raw_text=f"echo {secret}"))
        errors = cache.to_arrow().column("error").to_pylist()
    assert all(secret not in (e or "") and "unregisteredKEY" not in (e or "") for e in errors)
    for file in tmp_path.iterdir():  # the database, its WAL and shared-memory files
        assert secret.encode() not in file.read_bytes(), file.name
    assert redact_secrets(f"key={secret}!") == "key=***!"


def test_truncations_record_their_limit_and_tokens(cache):
    key = cache_key(IDENTITY, REPORT)
    cache.put_failure(key, IDENTITY, REPORT, "truncated answer after 3 attempts", attempts=3, latency_s=1.0,
                      prompt_tokens=300, completion_tokens=768, max_tokens=256, truncated_at=256)
    other = cache_key(IDENTITY, "timed out report")
    cache.put_failure(other, IDENTITY, "timed out report", "timed out", attempts=3, latency_s=9.0)
    assert cache.get_many([key]) == {}  # still never served as an answer
    assert cache.truncated_at([key, other, "missing"]) == {key: 256}
    row = cache.to_arrow().to_pylist()
    row = next(r for r in row if r["key"] == key)
    assert (row["prompt_tokens"], row["completion_tokens"], row["max_tokens"]) == (300, 768, 256)
    cache.put_ok(key, IDENTITY, REPORT, _answer(), max_tokens=1024)  # asked again with a larger limit
    assert cache.truncated_at([key]) == {} and key in cache.get_many([key])


def test_format_1_cache_is_upgraded_in_place_keeping_every_answer(tmp_path):
    path = tmp_path / "llm.sqlite"
    key = cache_key(IDENTITY, REPORT)
    with LLMCache(path) as cache:
        cache.put_ok(key, IDENTITY, REPORT, _answer())
    con = sqlite3.connect(path)  # make it the file an older version wrote
    con.execute("ALTER TABLE llm_calls DROP COLUMN max_tokens")
    con.execute("ALTER TABLE llm_calls DROP COLUMN truncated_at")
    con.execute("PRAGMA user_version = 1")
    con.commit()
    con.close()
    with LLMCache(path, read_only=True) as reader:  # an audit reads it without changing it
        assert reader.to_arrow().column("max_tokens").to_pylist() == [None]
        assert reader.truncated_at([key]) == {}
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == 1
    con.close()
    with LLMCache(path) as cache:
        assert cache.get_many([key])[key].findings == _answer().findings
        cache.put_failure("k2", IDENTITY, "x", "truncated", attempts=1, latency_s=0.1, max_tokens=64, truncated_at=64)
        assert cache.truncated_at(["k2"]) == {"k2": 64}

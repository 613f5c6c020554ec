"""Durable, content-addressed cache of LLM answers (SQLite), so nothing is paid for twice.

The key is a hash of the extractor's identity (provider, model, prompt version and
fingerprint, schema, sampling settings) and the report text: editing the prompt or
switching the model asks again, while answers of other models stay side by side.
Every answer is committed the moment :meth:`LLMCache.put_ok` returns, so a killed run
loses no finished work. Failures are recorded too (for the audit view ``llm_calls``)
but never served as answers.

The answer-length limit (``llm.max_tokens``) is not in the key: a complete answer is the
same under any limit that lets it finish. Each row records the limit it was asked under
(``max_tokens``); a report whose answer was cut short is a failure with ``truncated_at``
set to that limit, and :meth:`LLMCache.truncated_at` lets the runner re-ask it only once
the limit is raised above it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from medfilip.extract.base import Answer
from medfilip.extract.schema import Finding, findings_to_json

CACHE_FORMAT = 2  # PRAGMA user_version of a cache file this code writes (1: no max_tokens columns)
_CHUNK = 900  # keys per IN (...) query: below SQLite's oldest host-parameter limit (999)

_COLUMNS: tuple[tuple[str, str, pa.DataType], ...] = (
    ("key", "TEXT PRIMARY KEY", pa.string()),
    ("provider", "TEXT", pa.string()),
    ("model", "TEXT", pa.string()),
    ("prompt_version", "TEXT", pa.string()),
    ("identity_json", "TEXT NOT NULL", pa.string()),
    ("report_sha256", "TEXT NOT NULL", pa.string()),
    ("study_id", "TEXT", pa.string()),
    ("status", "TEXT NOT NULL CHECK (status IN ('ok', 'failed'))", pa.string()),
    ("answer_json", "TEXT", pa.string()),
    ("raw_text", "TEXT", pa.string()),
    ("n_dropped", "INTEGER", pa.int64()),
    ("error", "TEXT", pa.string()),
    ("prompt_tokens", "INTEGER", pa.int64()),
    ("completion_tokens", "INTEGER", pa.int64()),
    ("latency_s", "REAL", pa.float64()),
    ("attempts", "INTEGER", pa.int64()),
    ("max_tokens", "INTEGER", pa.int64()),  # llm.max_tokens the row was asked under (NULL: no limit)
    ("truncated_at", "INTEGER", pa.int64()),  # failed because the answer was cut at this max_tokens
    ("created_at", "REAL NOT NULL", pa.timestamp("us", tz="UTC")),  # epoch seconds in SQLite
    ("updated_at", "REAL NOT NULL", pa.timestamp("us", tz="UTC")),
)
COLUMN_NAMES = tuple(name for name, _, _ in _COLUMNS)
_ADDED_IN_FORMAT_2 = ("max_tokens", "truncated_at")


# --------------------------------------------------------------------------- secrets

_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()
# Shapes of keys and auth headers, for secrets nobody registered (e.g. echoed by a proxy).
_SECRET_PATTERNS = (
    re.compile(r"\bsk-[A-Za-z0-9_\-]{12,}"),
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9_\-\.=:+/]{8,}"),
)


def register_secret(value: str | None) -> None:
    """Remember a secret (an API key) so that :func:`redact_secrets` removes it from any text."""
    if value and len(value) >= 4:
        with _SECRETS_LOCK:
            _SECRETS.add(value)


def redact_secrets(text: str | None) -> str | None:
    """Text with every registered secret and anything shaped like an API key replaced by ``***``."""
    if not text:
        return text
    with _SECRETS_LOCK:
        secrets = sorted(_SECRETS, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, "***")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub("***", text)
    return text


# --------------------------------------------------------------------------- keys


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(identity: dict[str, Any], report: str) -> str:
    """sha256 of the canonical JSON of ``identity``, a newline, and the report text."""
    blob = _canonical_json(identity) + "\n" + report
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- cache


@dataclass
class CachedAnswer:
    """A validated answer served from the cache (``created_at``: epoch seconds it was stored)."""

    findings: list[Finding]
    n_dropped: int
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    attempts: int
    created_at: float


class LLMCache:
    """One SQLite file (WAL mode), table ``llm_calls``; several processes may have it open at once."""

    def __init__(
        self,
        path: str | Path,
        *,
        read_only: bool = False,
        busy_timeout_s: float = 60.0,
        synchronous: str = "NORMAL",
    ):
        """Open or create the cache at ``path`` (``read_only``: an existing file, for audits).

        ``synchronous=NORMAL`` in WAL mode makes every commit survive a killed process;
        ``FULL`` also survives power loss, at one fsync per answer.
        """
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, got {synchronous!r}")
        self.path = Path(path)
        self.read_only = read_only
        if read_only:
            if not self.path.exists():
                raise FileNotFoundError(f"{self.path}: no LLM cache here (extract has not run yet)")
            target, uri = f"file:{self.path.resolve().as_posix()}?mode=ro", True
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            target, uri = str(self.path), False
        # Autocommit (isolation_level=None): each statement is its own durable transaction.
        self._conn = sqlite3.connect(
            target, uri=uri, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._lock = threading.Lock()  # one connection, shared by threads
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            if not read_only:
                mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise sqlite3.OperationalError(f"cannot switch to WAL mode (got {mode})")
                self._conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            self._create_schema()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise sqlite3.DatabaseError(
                f"{self.path}: cannot open the LLM cache ({exc}); if the file is damaged, "
                "move it aside and re-run (answers will be asked again)"
            ) from exc

    def _create_schema(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, 1, CACHE_FORMAT):
            raise sqlite3.DatabaseError(
                f"cache format {version} is newer than this code understands ({CACHE_FORMAT})"
            )
        columns = ",\n  ".join(f"{name} {decl}" for name, decl, _ in _COLUMNS)
        if version == CACHE_FORMAT or (version == 1 and self.read_only):
            return  # opening an existing cache writes nothing (a format-1 file reads its columns as NULL)
        if version == 1:  # format 1 -> 2: two nullable columns, every answer kept
            with self._lock:
                for name in _ADDED_IN_FORMAT_2:
                    self._conn.execute(f"ALTER TABLE llm_calls ADD COLUMN {name} INTEGER")
                self._conn.execute(f"PRAGMA user_version = {CACHE_FORMAT}")
            return
        if self.read_only:
            raise sqlite3.DatabaseError("not an LLM cache (no llm_calls table)")
        with self._lock:
            self._conn.execute(f"CREATE TABLE IF NOT EXISTS llm_calls (\n  {columns}\n)")
            self._conn.execute(f"PRAGMA user_version = {CACHE_FORMAT}")

    # ----------------------------------------------------------------- reads

    def get_many(self, keys: Iterable[str]) -> dict[str, CachedAnswer]:
        """The cached answers (status ``ok`` only) among ``keys``, looked up in chunks."""
        unique = list(dict.fromkeys(keys))
        found: dict[str, CachedAnswer] = {}
        decoded: dict[str, tuple[Finding, ...]] = {}  # many reports share an answer ({"findings": []})
        sql_head = (
            "SELECT key, answer_json, n_dropped, prompt_tokens, completion_tokens, latency_s, "
            "attempts, created_at FROM llm_calls WHERE status = 'ok' AND key IN "
        )
        with self._lock:
            for start in range(0, len(unique), _CHUNK):
                chunk = unique[start : start + _CHUNK]
                sql = sql_head + "(" + ",".join("?" * len(chunk)) + ")"
                for row in self._conn.execute(sql, chunk):
                    key, answer_json, n_dropped, p_tok, c_tok, latency, attempts, created = row
                    findings = decoded.get(answer_json)
                    if findings is None:
                        findings = decoded[answer_json] = tuple(_findings_from_json(answer_json))
                    found[key] = CachedAnswer(
                        findings=list(findings),
                        n_dropped=n_dropped or 0,
                        prompt_tokens=p_tok or 0,
                        completion_tokens=c_tok or 0,
                        latency_s=latency or 0.0,
                        attempts=attempts or 0,
                        created_at=created,
                    )
        return found

    def truncated_at(self, keys: Iterable[str]) -> dict[str, int]:
        """For the failed rows among ``keys`` whose answer was cut short: the max_tokens that cut it."""
        if self._format() < 2:
            return {}
        unique = list(dict.fromkeys(keys))
        found: dict[str, int] = {}
        sql_head = "SELECT key, truncated_at FROM llm_calls WHERE status = 'failed' AND truncated_at IS NOT NULL AND key IN "
        with self._lock:
            for start in range(0, len(unique), _CHUNK):
                chunk = unique[start : start + _CHUNK]
                for key, limit in self._conn.execute(sql_head + "(" + ",".join("?" * len(chunk)) + ")", chunk):
                    found[key] = int(limit)
        return found

    def _format(self) -> int:
        with self._lock:
            return self._conn.execute("PRAGMA user_version").fetchone()[0]

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT count(*) FROM llm_calls").fetchone()[0]

    def to_arrow(self) -> pa.Table:
        """Every row (ok and failed) as an Arrow table, for the DuckDB audit view ``llm_calls``."""
        old = self._format() < 2
        select = ", ".join(f"NULL AS {n}" if old and n in _ADDED_IN_FORMAT_2 else n for n in COLUMN_NAMES)
        with self._lock:
            rows = self._conn.execute(f"SELECT {select} FROM llm_calls ORDER BY key").fetchall()
        columns = list(zip(*rows)) if rows else [[] for _ in COLUMN_NAMES]
        arrays = []
        for (name, _, dtype), values in zip(_COLUMNS, columns):
            if pa.types.is_timestamp(dtype):
                values = [None if v is None else int(round(v * 1_000_000)) for v in values]
                arrays.append(pa.array(values, pa.int64()).cast(dtype))
            else:
                arrays.append(pa.array(list(values), dtype))
        return pa.Table.from_arrays(arrays, names=list(COLUMN_NAMES))

    # ----------------------------------------------------------------- writes

    def put_ok(
        self,
        key: str,
        identity: dict[str, Any],
        report: str,
        answer: Answer,
        study_id: str | None = None,
        *,
        max_tokens: int | None = None,
    ) -> None:
        """Store a validated answer; committed (durable) when this returns. Overwrites a failure."""
        now = time.time()
        row = {
            **self._common(key, identity, report, study_id, now),
            "status": "ok",
            "answer_json": findings_to_json(answer.findings),
            "raw_text": redact_secrets(answer.raw_text),
            "n_dropped": int(answer.n_dropped),
            "error": None,
            "prompt_tokens": int(answer.prompt_tokens),
            "completion_tokens": int(answer.completion_tokens),
            "latency_s": float(answer.latency_s),
            "attempts": int(answer.attempts),
            "max_tokens": max_tokens,
            "truncated_at": None,
        }
        self._upsert(row, only_over_failed=False)

    def put_failure(
        self,
        key: str,
        identity: dict[str, Any],
        report: str,
        error: str,
        attempts: int,
        latency_s: float,
        study_id: str | None = None,
        *,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        max_tokens: int | None = None,
        truncated_at: int | None = None,
    ) -> None:
        """Record a report that got no valid answer; never served by :meth:`get_many`.

        The tokens are what the failed attempts cost. ``truncated_at``: the answer was cut
        short at that max_tokens (see :meth:`truncated_at`). A failure never replaces an
        answer already stored under the same key (another process may have succeeded meanwhile).
        """
        now = time.time()
        row = {
            **self._common(key, identity, report, study_id, now),
            "status": "failed",
            "answer_json": None,
            "raw_text": None,
            "n_dropped": None,
            "error": redact_secrets(str(error)),
            "prompt_tokens": int(prompt_tokens),
            "completion_tokens": int(completion_tokens),
            "latency_s": float(latency_s),
            "attempts": int(attempts),
            "max_tokens": max_tokens,
            "truncated_at": truncated_at,
        }
        self._upsert(row, only_over_failed=True)

    @staticmethod
    def _common(key: str, identity: dict[str, Any], report: str, study_id: str | None, now: float) -> dict:
        return {
            "key": key,
            "provider": _opt_str(identity.get("provider")),
            "model": _opt_str(identity.get("model")),
            "prompt_version": _opt_str(identity.get("prompt_version")),
            "identity_json": redact_secrets(_canonical_json(identity)),
            "report_sha256": _sha256(report),
            "study_id": study_id,
            "created_at": now,
            "updated_at": now,
        }

    def _upsert(self, row: dict[str, Any], *, only_over_failed: bool) -> None:
        names = list(row)
        # created_at: when the current status was first stored (a repeated failure keeps it).
        updates = [f"{n} = excluded.{n}" for n in names if n not in ("key", "created_at")]
        updates.append(
            "created_at = CASE WHEN llm_calls.status = excluded.status AND excluded.status = 'failed' "
            "THEN llm_calls.created_at ELSE excluded.created_at END"
        )
        sql = (
            f"INSERT INTO llm_calls ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
            f"ON CONFLICT(key) DO UPDATE SET {', '.join(updates)}"
        )
        if only_over_failed:
            sql += " WHERE llm_calls.status != 'ok'"
        with self._lock:
            self._conn.execute(sql, [row[n] for n in names])

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group many puts into one transaction (bulk imports, tests): durable when the block exits.

        Outside a batch every put is its own transaction, durable when it returns.
        """
        with self._lock:
            nested = self._conn.in_transaction  # then the outer batch commits
            if not nested:
                self._conn.execute("BEGIN IMMEDIATE")
        if nested:
            yield
            return
        try:
            yield
        finally:
            with self._lock:
                self._conn.execute("COMMIT")  # what was put before an error is kept

    def close(self) -> None:
        """Close the connection (everything is already committed)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> LLMCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _findings_from_json(text: str) -> list[Finding]:
    return [Finding(**item) for item in json.loads(text)["findings"]]

"""``medfilip audit``: read-only SQL (DuckDB) over the pipeline's Parquet files and the LLM cache.

Each artifact is a named view (``studies``, ``triplets_raw``, ``extractions``,
``llm_calls``, ...); a query is a SQL string or a saved query from ``data/audit/*.sql``.
Only SELECT-like statements run, on an in-memory database: an audit never changes
an artifact.

The LLM cache (SQLite) is opened read-only and never loaded whole: when a query names
``llm_calls``, its rows stream from SQLite in batches into a temporary Parquet file
outside the project, which DuckDB scans column by column (``raw_text`` is read only by
a query that selects it). DuckDB runs under a memory limit and spills to the same
temporary folder, so an audit over a million cached answers stays within a few hundred MB.
(DuckDB's own SQLite scanner is an extension it downloads on first use, which an
offline machine cannot do.)
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from medfilip.config import Params
from medfilip.errors import UserError

QUERY_DIR = Path("data/audit")

VIEW_FILES = {
    "studies": "data/interim/studies.parquet",
    "images": "data/interim/images.parquet",
    "image_files": "data/interim/image_files.parquet",
    "reference": "data/interim/reference.parquet",  # the dataset's own labels (phantom truth, MeSH, CSVs)
    "triplets_raw": "data/interim/triplets_raw.parquet",
    "extractions": "data/interim/extractions.parquet",
    "pixel_index": "data/processed/pixels/index.parquet",
    "triplets": "data/processed/triplets.parquet",
    "labels": "data/processed/labels.parquet",
    "texts": "data/processed/texts.parquet",
    "embeddings": "data/processed/embeddings.parquet",
}

READ_ONLY = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
CACHE_VIEW = "llm_calls"
CACHE_BATCH_ROWS = 20_000  # cached answers per batch streamed from SQLite
MEMORY_LIMIT = "256MB"  # DuckDB's own limit; past it, it spills to the session's temporary folder
_TIMESTAMP_COLUMNS = frozenset({"created_at", "updated_at"})  # epoch seconds (REAL) in the cache


class AuditError(UserError, ValueError):
    """A query that cannot run: not read-only, unknown saved query, or SQL error."""


def artifact_files(params: Params, root: Path = Path(".")) -> dict[str, Path]:
    """View name -> Parquet file, for the artifacts that exist under ``root``."""
    files = {name: root / rel for name, rel in VIEW_FILES.items()}
    files["truth"] = root / params.data.root / "truth.parquet"
    return {name: path for name, path in files.items() if path.exists()}


def available_views(params: Params, root: Path = Path(".")) -> list[str]:
    """The views an audit offers now, found without reading any table (for ``--list``)."""
    views = list(artifact_files(params, root))
    if (root / params.extract.cache).exists():
        views.append(CACHE_VIEW)
    return views


def mentions_cache(sql: str) -> bool:
    """Whether ``sql`` names the ``llm_calls`` view (a mention in a comment counts: harmless)."""
    return re.search(rf"\b{CACHE_VIEW}\b", sql, flags=re.IGNORECASE) is not None


@contextlib.contextmanager
def session(
    params: Params, root: Path = Path("."), *, sql: str | None = None
) -> Iterator[tuple[duckdb.DuckDBPyConnection, list[str]]]:
    """An in-memory DuckDB with one view per artifact that exists; yields it and the view names.

    ``llm_calls`` is streamed out of the SQLite cache only when ``sql`` names it (or when
    ``sql`` is None: every view). Temporary files live outside the project and go at exit.
    """
    with tempfile.TemporaryDirectory(prefix="medfilip-audit-") as tmp:
        con = duckdb.connect(
            ":memory:", config={"memory_limit": MEMORY_LIMIT, "temp_directory": str(Path(tmp) / "spill")}
        )
        try:
            views = []
            for name, path in artifact_files(params, root).items():
                con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{_quote(path)}')")
                views.append(name)
            cache_path = root / params.extract.cache
            if cache_path.exists() and (sql is None or mentions_cache(sql)):
                parquet = Path(tmp) / f"{CACHE_VIEW}.parquet"
                cache_to_parquet(cache_path, parquet)
                con.execute(f"CREATE VIEW {CACHE_VIEW} AS SELECT * FROM read_parquet('{_quote(parquet)}')")
                views.append(CACHE_VIEW)
            yield con, views
        finally:
            con.close()


def open_cache_read_only(path: Path) -> sqlite3.Connection:
    """A read-only SQLite connection that creates, locks and changes no file.

    With no ``-wal`` file beside it (no writer has the cache open), the file is opened
    ``immutable``: a plain ``mode=ro`` open of a WAL database would leave new ``-wal`` and
    ``-shm`` files behind. With a writer running, ``mode=ro`` reads its committed answers.
    """
    target = quote(path.resolve().as_posix())
    writer_running = path.with_name(path.name + "-wal").exists()
    uri = f"file:{target}?mode=ro" + ("" if writer_running else "&immutable=1")
    try:
        return sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise AuditError(f"{path}: cannot open the LLM cache read-only ({exc})") from None


def _arrow_type(name: str, declared: str) -> pa.DataType:
    declared = declared.upper()
    if name in _TIMESTAMP_COLUMNS:
        return pa.timestamp("us", tz="UTC")
    if "INT" in declared:
        return pa.int64()
    if any(t in declared for t in ("REAL", "FLOA", "DOUB")):
        return pa.float64()
    return pa.string()


def cache_batches(path: Path, batch_rows: int = CACHE_BATCH_ROWS) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """The cache's ``llm_calls`` rows as Arrow batches of ``batch_rows``, read-only and streamed."""
    conn = open_cache_read_only(path)
    try:
        columns = [(row[1], row[2] or "") for row in conn.execute(f"PRAGMA table_info({CACHE_VIEW})")]
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise AuditError(f"{path}: not a readable LLM cache ({exc})") from None
    if not columns:
        conn.close()
        raise AuditError(f"{path}: not an LLM cache (no {CACHE_VIEW} table); set extract.cache to the cache file")
    schema = pa.schema([(name, _arrow_type(name, declared)) for name, declared in columns])

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            cursor = conn.execute(f"SELECT {', '.join(name for name, _ in columns)} FROM {CACHE_VIEW}")
            while rows := cursor.fetchmany(batch_rows):
                arrays = []
                for field, values in zip(schema, zip(*rows)):
                    if pa.types.is_timestamp(field.type):  # epoch seconds -> microseconds
                        seconds = pa.array(values, pa.float64())
                        micros = pc.round(pc.multiply(seconds, 1_000_000.0)).cast(pa.int64())
                        arrays.append(micros.cast(field.type))
                    else:
                        arrays.append(pa.array(values, field.type))
                yield pa.RecordBatch.from_arrays(arrays, schema=schema)
        finally:
            conn.close()

    return schema, batches()


def cache_to_parquet(cache_path: Path, out: Path, batch_rows: int = CACHE_BATCH_ROWS) -> int:
    """Stream the cache into one Parquet file (a row group per batch); returns the row count."""
    schema, batches = cache_batches(cache_path, batch_rows)
    n = 0
    with pq.ParquetWriter(out, schema, compression="zstd") as writer:
        for batch in batches:
            writer.write_batch(batch)
            n += batch.num_rows
    return n


def _quote(path: Path) -> str:
    return str(path).replace("'", "''")


def saved_queries(query_dir: Path = QUERY_DIR) -> dict[str, tuple[str, str]]:
    """name -> (description, SQL) for every ``*.sql`` file; the first ``--`` line describes it."""
    queries = {}
    for path in sorted(query_dir.glob("*.sql")):
        sql = path.read_text()
        first = sql.lstrip().splitlines()[0] if sql.strip() else ""
        queries[path.stem] = (first.lstrip("- ").strip() if first.startswith("--") else "", sql)
    return queries


def run_query(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[list[str], list[tuple]]:
    """Run one read-only statement; anything that could write is refused before it runs."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise AuditError(f"SQL does not parse: {exc}") from None
    if len(statements) != 1:
        raise AuditError(f"give exactly one SQL statement (got {len(statements)})")
    if statements[0].type not in READ_ONLY:
        raise AuditError(f"audit is read-only: {statements[0].type.name} statements are refused")
    try:
        rel = con.execute(sql)
    except duckdb.Error as exc:
        raise AuditError(str(exc).splitlines()[0]) from None
    columns = [d[0] for d in rel.description]
    return columns, rel.fetchall()


def format_rows(columns: list[str], rows: list[tuple], fmt: str, limit: int | None = None) -> str:
    """Render a result as an aligned table, CSV or JSON."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(columns)
        writer.writerows(rows)
        return buf.getvalue()
    if fmt == "json":
        return json.dumps([dict(zip(columns, r)) for r in rows], indent=2, default=str)
    shown = rows if limit is None else rows[:limit]
    cells = [[_cell(v) for v in r] for r in shown]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(columns, widths)),
        "  ".join("-" * w for w in widths),
        *("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells),
    ]
    more = len(rows) - len(shown)
    lines.append(f"({len(rows)} rows{f', {more} not shown: --limit or --format csv' if more else ''})")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."

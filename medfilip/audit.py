"""``medfilip audit``: read-only SQL (DuckDB) over the pipeline's Parquet files and the LLM cache.

Each artifact is a named view (``studies``, ``triplets_raw``, ``extractions``,
``llm_calls``, ...); a query is a SQL string or a saved query from ``data/audit/*.sql``.
Only SELECT-like statements run, on an in-memory database: an audit never changes
an artifact.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import duckdb

from medfilip.config import Params

QUERY_DIR = Path("data/audit")

VIEW_FILES = {
    "studies": "data/interim/studies.parquet",
    "images": "data/interim/images.parquet",
    "triplets_raw": "data/interim/triplets_raw.parquet",
    "extractions": "data/interim/extractions.parquet",
    "pixel_index": "data/processed/pixels/index.parquet",
    "triplets": "data/processed/triplets.parquet",
    "labels": "data/processed/labels.parquet",
    "texts": "data/processed/texts.parquet",
    "embeddings": "data/processed/embeddings.parquet",
}

READ_ONLY = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


class AuditError(ValueError):
    """A query that cannot run: not read-only, unknown saved query, or SQL error."""


def connect(params: Params, root: Path = Path(".")) -> tuple[duckdb.DuckDBPyConnection, list[str]]:
    """An in-memory DuckDB with one view per artifact that exists; returns it and the view names."""
    con = duckdb.connect(":memory:")
    views = []
    files = dict(VIEW_FILES)
    files["truth"] = str(Path(params.data.root) / "truth.parquet")
    for name, rel in files.items():
        path = root / rel
        if path.exists():
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{_quote(path)}')")
            views.append(name)
    cache_path = root / params.extract.cache
    if cache_path.exists():
        from medfilip.extract.cache import LLMCache

        cache = LLMCache(cache_path)
        try:
            con.register("llm_calls", cache.to_arrow())
        finally:
            cache.close()
        views.append("llm_calls")
    return con, views


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

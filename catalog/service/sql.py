"""`POST /api/v1/sql`: read-only SQL with a row limit and a time limit.

The statement rules are those of the `sql` command (catalog.store): only SELECT, EXPLAIN and
PRAGMA statements run (DESCRIBE, SHOW and WITH are SELECTs to DuckDB; PRAGMA assignments are
SET statements and refused). The service's file is open read-write, so the statements also run
in a READ ONLY transaction, and DuckDB's external access is off for the whole instance
(connection.ServiceCatalog): files, ATTACH, COPY, INSTALL and LOAD are refused by DuckDB itself.
"""

from __future__ import annotations

import threading

import duckdb
import pyarrow as pa

from catalog import formats
from catalog.errors import CatalogError
from catalog.store import read_only_statements  # the `sql` command's rule

SQL_FORMATS = formats.content_types(("json", "csv", "arrow", "parquet"))  # name -> content type


class SqlTimeout(CatalogError):
    """The query ran past the time limit and was interrupted."""


def run_read_only(cursor, sql: str, max_rows: int, timeout_s: float) -> tuple[pa.Table, bool]:
    """The statement's first max_rows rows, and whether more were left out (one statement per call)."""
    (statement,) = read_only_statements(cursor, sql)
    timer = threading.Timer(timeout_s, cursor.interrupt)
    timer.start()
    try:
        cursor.execute("BEGIN TRANSACTION READ ONLY")
        # Streamed batch by batch, so a huge result stops at the row limit instead of being built.
        reader = cursor.sql(statement.query).to_arrow_reader(min(max_rows + 1, 10_000))
        batches, n = [], 0
        for batch in reader:
            batches.append(batch)
            n += batch.num_rows
            if n > max_rows:
                break
        table = pa.Table.from_batches(batches, schema=reader.schema)
    except duckdb.InterruptException:
        raise SqlTimeout(f"the query ran longer than the time limit of {timeout_s:g} s and was stopped") from None
    except duckdb.Error as err:
        raise CatalogError(f"SQL error: {str(err).splitlines()[0]}") from None
    finally:
        timer.cancel()
        try:
            cursor.execute("ROLLBACK")
        except duckdb.Error:
            pass
    return table.slice(0, max_rows), table.num_rows > max_rows


def encode(table: pa.Table, fmt: str) -> bytes:
    """CSV, Arrow IPC stream or Parquet bytes of a table (JSON is built by the route)."""
    if fmt not in SQL_FORMATS or fmt == "json":
        raise CatalogError(f"unknown format '{fmt}': use one of {', '.join(SQL_FORMATS)}")
    body = formats.get(fmt).render(table)
    # the CLI's CSV, ending in a newline as the terminal's does
    return (body + "\n").encode("utf-8") if isinstance(body, str) else body

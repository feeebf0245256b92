"""`POST /api/v1/sql`: read-only SQL with a row limit and a time limit.

The statement rule is the `sql` command's (catalog.store.sql_guard): a statement is judged by
what it would do. The service's file is open read-write, so the statements also run in a READ
ONLY transaction, and the whole instance has external access off and its configuration locked
(connection.ServiceCatalog): files, ATTACH, COPY, INSTALL, LOAD and SET are refused by DuckDB
itself. Answers and errors are scrubbed of the server's paths.
"""

from __future__ import annotations

import asyncio
import threading

import duckdb
import pyarrow as pa

from catalog import formats
from catalog.errors import CatalogError
from catalog.store import read_only_statements  # the `sql` command's rule
from catalog.store.sql_guard import scrub, scrub_table

SQL_FORMATS = formats.content_types(("json", "csv", "arrow", "parquet"))  # name -> content type


class SqlTimeout(CatalogError):
    """The query ran past the time limit and was interrupted."""


class SqlBusy(CatalogError):
    """Every query slot stayed taken for the time limit, or too many queries already wait."""


class ResultTooLarge(CatalogError):
    """The encoded answer is larger than MAX_RESULT_BYTES."""


MAX_RESULT_BYTES = 32 * 1024 * 1024
MAX_RUNNING = 2    # queries running at once: the rest of the thread pool stays for plain reads
MAX_WAITING = 16   # queries waiting for a slot; beyond that a query is refused at once


class SqlSlots:
    """A fair (first come, first served) bound on concurrent queries. Waiting happens on the event
    loop, not in a worker thread, so queued queries hold no thread that a plain read needs; a
    query waits at most the time limit for its slot, then runs at most the time limit."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._slots: asyncio.Semaphore | None = None  # made on the event loop that uses it
        self.waiting = 0

    async def __aenter__(self):
        if self._slots is None:
            self._slots = asyncio.Semaphore(MAX_RUNNING)
        if self.waiting >= MAX_WAITING:
            raise SqlBusy(f"{MAX_WAITING} queries are already waiting: try again later")
        self.waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self.timeout_s)
        except asyncio.TimeoutError:
            raise SqlBusy(f"no query slot became free within {self.timeout_s:g} s: try again later") from None
        finally:
            self.waiting -= 1
        return self

    async def __aexit__(self, *exc):
        self._slots.release()


def run_read_only(cursor, sql: str, max_rows: int, timeout_s: float, paths: list) -> tuple[pa.Table, bool]:
    """The statement's first max_rows rows, and whether more were left out (one statement per call);
    `paths`: (path, placeholder) pairs to scrub (sql_guard.private_paths)."""
    try:
        text = read_only_statements(cursor, sql)
    except CatalogError as err:
        raise CatalogError(scrub(str(err), paths)) from None
    timer = threading.Timer(timeout_s, cursor.interrupt)
    timer.start()
    try:
        cursor.execute("BEGIN TRANSACTION READ ONLY")
        # Streamed batch by batch, so a huge result stops at the row limit instead of being built.
        reader = cursor.sql(text).to_arrow_reader(min(max_rows + 1, 10_000))
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
        raise CatalogError(f"SQL error: {scrub(str(err).splitlines()[0], paths)}") from None
    finally:
        timer.cancel()
        try:
            cursor.execute("ROLLBACK")
        except duckdb.Error:
            pass
    return scrub_table(table.slice(0, max_rows), paths), table.num_rows > max_rows


def bounded(body: bytes) -> bytes:
    if len(body) > MAX_RESULT_BYTES:
        raise ResultTooLarge(f"the answer has {len(body)} bytes, more than the limit of {MAX_RESULT_BYTES}: "
                             "ask for fewer rows (max_rows) or fewer columns")
    return body


def encode(table: pa.Table, fmt: str) -> bytes:
    """CSV, Arrow IPC stream or Parquet bytes of a table (JSON is built by the route)."""
    if fmt not in SQL_FORMATS or fmt == "json":
        raise CatalogError(f"unknown format '{fmt}': use one of {', '.join(SQL_FORMATS)}")
    body = formats.get(fmt).render(table)
    # the CLI's CSV, ending in a newline as the terminal's does
    return (body + "\n").encode("utf-8") if isinstance(body, str) else body

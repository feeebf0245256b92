"""The catalog file as the service holds it: opened read-write once, a cursor per reader.

In one process DuckDB hands every `duckdb.connect(path)` with the same configuration the same
database instance, so an ingest job's `catalog.store.Catalog(path)` writes to the instance the
readers read. Each reader gets `cursor()`, an independent connection that sees committed
transactions only: a batch being written is invisible until its COMMIT.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

from catalog.store import Catalog


class ServiceCatalog:
    """The open catalog: migrated on open, external file access switched off for the instance."""

    def __init__(self, db_path: str | Path):
        self.path = Path(db_path)
        if self.path.exists():  # a damaged file refuses the start, rather than 500 on every request
            from catalog.store import _connect, verify_blocks

            con = _connect(self.path, read_only=True)
            try:
                verify_blocks(con, self.path)
            finally:
                con.close()
        else:
            from catalog.store import check_writable_folder

            check_writable_folder(self.path)
        # Catalog creates a missing file and applies missing migrations; its connection keeps the
        # instance (and the file lock) alive for the service's lifetime.
        self._catalog = Catalog(self.path)
        self.con = self._catalog.con
        # Instance-wide and irreversible while the instance lives: no read_text, read_csv, glob,
        # ATTACH, COPY, INSTALL or LOAD from anyone. Writes to the catalog itself are unaffected,
        # and so are Arrow tables registered by the ingest and the trace.
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET enable_progress_bar = false")  # DuckDB draws it on stdout, the server's log
        # Then no statement can change a setting again (threads, memory_limit, ... for every later
        # query and job): the SQL endpoint's statements run on cursors of this instance.
        self.con.execute("SET lock_configuration = true")
        from catalog.store.sql_guard import private_paths

        self.private_paths = private_paths(self.path)
        self._lock = threading.Lock()
        self._queries: set = set()  # cursors running a client's SQL, interrupted when the service stops
        self.stopping = False

    def cursor(self):
        with self._lock:  # creating cursors from several threads at once is not documented as safe
            return self.con.cursor()

    @contextmanager
    def reader(self):
        """A cursor for one request, closed afterwards."""
        cur = self.cursor()
        try:
            yield cur
        finally:
            cur.close()

    @contextmanager
    def running_query(self, cursor):
        """Within the block, `interrupt_queries()` stops the cursor's statement."""
        with self._lock:
            self._queries.add(cursor)
        try:
            yield cursor
        finally:
            with self._lock:
                self._queries.discard(cursor)

    def interrupt_queries(self) -> None:
        """The service is stopping: a client's long query must not hold the shutdown up to its time limit."""
        self.stopping = True
        with self._lock:
            running = list(self._queries)
        for cursor in running:
            cursor.interrupt()

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = self.con = None

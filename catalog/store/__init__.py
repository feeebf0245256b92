"""The DuckDB catalog file: opening it, versioned migrations, and bulk writes.

Reads for queries open the file read-only and import neither SQLAlchemy nor torch
(query commands must start fast). Writes go through `Catalog`, which applies missing
migrations on open, keeps the small metadata rows (models, runs) in SQLAlchemy Core, and
moves bulk rows through DuckDB's own connection as Arrow tables, each batch in one
transaction.
"""

from __future__ import annotations

import errno
import os
import weakref
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb

from catalog.errors import CatalogError

from catalog.schema import LATEST_VERSION, Migration  # noqa: F401 (also the store's names)
from catalog.schema import shipped_migrations as migrations
from catalog.schema.rows import edge_sv_lists


# On every connection: DuckDB must never fetch an extension (a file with SQLite's header made it
# try to download the sqlite scanner). The same settings everywhere, because DuckDB refuses a
# second connection to an open file with a different configuration in the same process.
NO_EXTENSIONS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
# The user's SQL (`sql` command): no file access, no attached databases, and (read_only_query) no
# settings changed once the connection is ready.
USER_SQL = dict(NO_EXTENSIONS, enable_external_access=False)


def _connect(path: str | Path, read_only: bool, config: dict | None = None) -> duckdb.DuckDBPyConnection:
    path = Path(path)
    if read_only and not path.exists():
        raise CatalogError(f"no catalog at {path}: create one with `circuit-catalog ingest --db {path}`")
    if path.exists() and path.is_dir():
        raise CatalogError(f"{path} is a directory, not a catalog file")
    foreign = foreign_file(path)
    if foreign:
        raise CatalogError(f"{path} is not a readable DuckDB catalog ({foreign})")
    try:
        if config is not None:
            return _quiet(duckdb.connect(str(path), read_only=read_only, config=config))
        # DuckDB's defaults at connect time, switched off right after: DuckDB keeps one instance per
        # file in a process and refuses a second connection whose connect-time configuration differs,
        # so a notebook's own duckdb.connect(path) beside the catalog's must keep working.
        con = duckdb.connect(str(path), read_only=read_only)
        for name in NO_EXTENSIONS:
            # Already off in an instance opened before (a service's, whose configuration is locked).
            if con.execute("SELECT current_setting(?)", [name]).fetchone()[0]:
                con.execute(f"SET {name} = false")
        return _quiet(con)
    except PermissionError:
        raise CatalogError(f"{path} cannot be read: permission denied") from None
    except duckdb.Error as err:
        message = str(err).splitlines()[0]
        if "lock" in message.lower():
            from catalog.store.marker import held_by_service  # a service leaves a note where it is

            raise CatalogError(held_by_service(path)
                               or f"{path} is in use by another process (an ingest still running?)") from None
        raise CatalogError(f"{path} is not a readable DuckDB catalog ({message})") from None


def _quiet(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """No DuckDB progress bar: on a busy machine a query past 2 s drew one on stdout, inside the
    JSON or CSV a command writes there. Not where the configuration is locked (USER_SQL: DuckDB
    takes no progress-bar setting at connect time)."""
    try:
        con.execute("SET enable_progress_bar = false")
    except duckdb.Error:
        pass
    return con


DUCKDB_HEADER_BYTES = 3 * 4096  # the file header and two database headers, before the first block


def foreign_file(path: Path) -> str | None:
    """What an existing, non-empty file is when it is not a DuckDB database (DuckDB would try an
    extension for a SQLite file, or answer with a path in the message); None when it may be one."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise CatalogError(f"{path} cannot be read: permission denied") from None
    except OSError as err:
        raise CatalogError(f"{path} cannot be read: {err.strerror}") from None
    if not head:
        return None  # an empty file: DuckDB makes a database of it
    if head.startswith(b"SQLite format 3"):
        return "it is a SQLite database"
    if len(head) < 12 or head[8:12] != b"DUCK":
        return "its first bytes are not DuckDB's: a different or damaged file"
    return None


def check_not_truncated(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """A file shorter than the blocks in use need has lost its end (a cut copy, a full disk).

    Only used blocks count: DuckDB cuts free blocks off the end of the file at a checkpoint while
    its header still counts them, so total_blocks would call a healthy file truncated. The used
    blocks can sit anywhere, so this is a lower bound: a file cut by less than its free blocks gets
    through here and is caught by reading its blocks (verify_blocks)."""
    block_size, used_blocks = con.execute(
        "SELECT block_size, used_blocks FROM pragma_database_size()").fetchall()[0]
    expected = DUCKDB_HEADER_BYTES + block_size * used_blocks
    size = path.stat().st_size
    if size < expected:
        raise CatalogError(f"{path} is truncated: {size} bytes where its blocks in use need {expected}")


def verify_blocks(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Read every stored block once (DuckDB checks each block's checksum as it reads it): a damaged
    catalog is found now rather than as failing answers later. Costs one read of the file."""
    check_not_truncated(con, path)
    tables = [r[0] for r in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()").fetchall()]
    try:
        for table in tables:
            reader = con.sql(f'SELECT * FROM "{table}"').to_arrow_reader(100_000)
            for _ in reader:
                pass
    except duckdb.Error as err:
        raise CatalogError(f"{path} is damaged ({str(err).splitlines()[0]})") from None


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    """The highest applied migration, 0 for an empty database."""
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_migrations'"
    ).fetchall()[0][0]
    if not exists:
        return 0
    return con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchall()[0][0]


def apply_migrations(con: duckdb.DuckDBPyConnection, upto: int | None = None) -> list[int]:
    """Apply the missing migrations (up to `upto`), each in its own transaction; return their versions."""
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL)"
    )
    current = schema_version(con)
    if current > LATEST_VERSION:
        raise CatalogError(
            f"the catalog has schema version {current}, newer than this circuit-catalog knows "
            f"({LATEST_VERSION}): upgrade circuit-catalog"
        )
    applied, done = [], {r[0] for r in con.execute("SELECT version FROM schema_migrations").fetchall()}
    for migration in migrations():
        # by the versions recorded, not the highest: one numbered below it may arrive later (a merge)
        if migration.version in done or (upto is not None and migration.version > upto):
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(migration.sql)
            con.execute(
                "INSERT INTO schema_migrations VALUES (?, ?, current_timestamp)",
                [migration.version, migration.name],
            )
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        applied.append(migration.version)
    if applied:
        # Write the migrations into the file at once: DuckDB 2 cannot replay from the write-ahead
        # log a dropped table whose foreign key points at a table with a function default (models'
        # current_timestamp) without downloading an extension, so a crash before the next
        # checkpoint would leave an unopenable catalog offline.
        con.execute("CHECKPOINT")
    return applied


MIN_FREE_BYTES = 64 * 1024 * 1024  # below this an ingest would fail in its first batches


def check_writable_folder(path: Path) -> None:
    """The catalog's folder takes new files (DuckDB writes its write-ahead log beside the catalog)
    and has room: said in one line before a model is loaded, not as a traceback mid-ingest."""
    import shutil
    import tempfile

    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CatalogError(f"cannot create {path}: the folder {folder} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.probe-") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
        free = shutil.disk_usage(folder).free
    except OSError as err:
        reason = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
                  errno.EACCES: "permission denied", errno.EPERM: "permission denied"}.get(err.errno, err.strerror)
        raise CatalogError(f"cannot write the catalog {path}: {reason} in {folder}") from None
    if free < MIN_FREE_BYTES:
        raise CatalogError(f"cannot write the catalog {path}: only {free // (1024 * 1024)} MB free in {folder} "
                           f"(at least {MIN_FREE_BYTES // (1024 * 1024)} MB needed)")


def check_catalog_file(path: str | Path) -> None:
    """Before a write: an existing file must be a DuckDB database, and its folder writable with room
    to spare; a missing file is created later, once there is something to store (a failed model
    load leaves no empty catalog behind)."""
    path = Path(path)
    if path.exists():
        try:
            con = _connect(path, read_only=True)
        except CatalogError:
            # Open read-write in this very process (the service's ingest jobs): DuckDB refuses a
            # read-only connection with another configuration, but then a read-write one succeeds.
            con = _connect(path, read_only=False)
        try:
            check_not_truncated(con, path)
        finally:
            con.close()
    check_writable_folder(path)


def upgrade(path: str | Path) -> list[int]:
    """Apply the missing migrations to an existing catalog file; return their versions."""
    if not Path(path).exists():
        raise CatalogError(f"no catalog at {path}")
    con = _connect(path, read_only=False)
    try:
        return apply_migrations(con)
    finally:
        con.close()


# The read-only connections open in this process (weakly: closing or dropping one forgets it), so
# that a signal can stop their statements (catalog.cli's signal watcher, interrupt_readers).
_readers = weakref.WeakSet()


def interrupt_readers() -> None:
    """Stop the statement running on every open read-only connection of this process (it raises
    DuckDB's InterruptException). Nothing is written on such connections: nothing is lost."""
    for con in list(_readers):
        try:
            con.interrupt()
        except duckdb.Error:  # closed meanwhile
            pass


def open_readonly(path: str | Path, config: dict | None = None) -> duckdb.DuckDBPyConnection:
    """Open a catalog for reading; it must exist and be at the current schema version."""
    con = _connect(path, read_only=True, config=config)
    _readers.add(con)
    try:
        check_not_truncated(con, Path(path))
        version = schema_version(con)
    except CatalogError:
        con.close()
        raise
    except duckdb.Error as err:
        con.close()
        raise CatalogError(f"{path} is not a readable DuckDB catalog ({err})") from None
    if version == 0:
        con.close()
        raise CatalogError(f"{path} is a DuckDB file but not a circuit-catalog (no schema_migrations table)")
    missing = sorted({m.version for m in migrations()} - {r[0] for r in con.execute(
        "SELECT version FROM schema_migrations").fetchall()})
    if version < LATEST_VERSION or missing:  # older, or lacking one merged in since
        con.close()
        older = (f"has schema version {version}, older than {LATEST_VERSION}" if version < LATEST_VERSION
                 else f"lacks migration {', '.join(map(str, missing))}")
        raise CatalogError(f"{path} {older}: upgrade it with `circuit-catalog migrate --db {path}`")
    if version > LATEST_VERSION:
        con.close()
        raise CatalogError(f"{path} has schema version {version}, newer than this circuit-catalog: upgrade it")
    return con


class Catalog:
    """A catalog opened for writing: migrated on open, metadata through SQLAlchemy, bulk through Arrow."""

    def __init__(self, path: str | Path):
        import sqlalchemy as sa  # only the write path pays for SQLAlchemy's import

        self.path = Path(path)
        self.con = _connect(self.path, read_only=False)
        try:
            apply_migrations(self.con)
        except duckdb.Error as err:
            self.con.close()
            raise CatalogError(f"{self.path} could not be upgraded ({str(err).splitlines()[0]})") from None
        from duckdb_engine import ConnectionWrapper

        # One DuckDB connection serves both, so a SQLAlchemy statement and an Arrow insert can
        # share a transaction: the pool hands out this very connection in duckdb-engine's wrapper.
        self._sa = sa
        self.engine = sa.create_engine(
            "duckdb://", creator=lambda: ConnectionWrapper(self.con), poolclass=sa.pool.StaticPool
        )
        from catalog.schema import tables

        self.models, self.runs = tables.models, tables.runs

    def close(self) -> None:
        self.engine.dispose()
        self.con.close()
        self.engine = self.con = None

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- metadata rows (SQLAlchemy Core) ---------------------------------------------------------

    def _next_id(self, table, column: str) -> int:
        sa = self._sa
        with self.engine.connect() as conn:
            return (conn.execute(sa.select(sa.func.coalesce(sa.func.max(table.c[column]), 0))).scalar()) + 1

    def model_by_digest(self, digest: str) -> dict | None:
        sa = self._sa
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(self.models).where(self.models.c.weights_digest == digest)).mappings().first()
        return dict(row) if row else None

    def model_by_id(self, model_id: int) -> dict | None:
        sa = self._sa
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(self.models).where(self.models.c.model_id == model_id)).mappings().first()
        return dict(row) if row else None

    def add_model(self, row: dict, singular_vectors, family: dict) -> int:
        """Insert a model, its model_families row and its singular vectors (an Arrow table without
        model_id; None for a rotary model, whose forms come with its runs) in one transaction."""
        model_id = self._next_id(self.models, "model_id")
        with self.engine.begin() as conn:  # one transaction on the shared connection
            conn.execute(self.models.insert().values(model_id=model_id, **row))
            names = list(family)
            self.con.execute(f"INSERT INTO model_families (model_id, {', '.join(names)}) VALUES "
                             f"(?, {', '.join('?' for _ in names)})", [model_id, *family.values()])
            if singular_vectors is not None:
                self._append("singular_vectors", singular_vectors, model_id=model_id)
        return model_id

    def has_singular_vectors(self, model_id: int, form: str) -> bool:
        return bool(self.con.execute("SELECT count(*) FROM singular_vectors WHERE model_id = ? AND form = ?",
                                     [model_id, form]).fetchall()[0][0])

    def add_singular_vectors(self, model_id: int, singular_vectors) -> None:
        """Another form's singular vectors of a stored model (an Arrow table without model_id), in one transaction."""
        self.append_rows("singular_vectors", singular_vectors, model_id=model_id)

    def append_rows(self, table: str, data, **constants) -> None:
        """Append an Arrow table's rows (plus `constants` as columns, e.g. run_id) in one transaction:
        a batch of a job that writes one table (interventions, features) is all there or absent."""
        self.con.execute("BEGIN TRANSACTION")
        try:
            self._append(table, data, **constants)
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

    def find_run(self, model_id: int, prompts_digest: str, settings: dict, method_settings: dict | None = None
                 ) -> dict | None:
        """The newest run of this model on these prompts with these result-changing settings
        (columns of runs, and the method's own settings as stored in runs.settings)."""
        import json

        sa = self._sa
        runs = self.runs
        query = sa.select(runs).where(runs.c.model_id == model_id, runs.c.prompts_digest == prompts_digest)
        for column, value in settings.items():
            query = query.where(runs.c[column] == value)
        if method_settings is not None:  # stored by SQLAlchemy's JSON type, i.e. json.dumps of the dict
            query = query.where(sa.cast(runs.c.settings, sa.String) == json.dumps(method_settings))
        with self.engine.connect() as conn:
            row = conn.execute(query.order_by(runs.c.run_id.desc())).mappings().first()
        return dict(row) if row else None

    def create_run(self, row: dict, prompts, tokens) -> int:
        """Insert a run with its prompts and tokens (Arrow tables without run_id) in one transaction."""
        run_id = self._next_id(self.runs, "run_id")
        values = dict(row, run_id=run_id, status="running", started_at=datetime.now())
        with self.engine.begin() as conn:  # one transaction on the shared connection
            conn.execute(self.runs.insert().values(**values))
            self._append("prompts", prompts, run_id=run_id)
            self._append("tokens", tokens, run_id=run_id)
        return run_id

    def finish_run(self, run_id: int) -> None:
        sa = self._sa
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(self.runs).where(self.runs.c.run_id == run_id)
                .values(status="finished", finished_at=datetime.now())
            )

    def committed_batches(self, run_id: int) -> set[int]:
        rows = self.con.execute("SELECT batch FROM run_batches WHERE run_id = ?", [run_id]).fetchall()
        return {r[0] for r in rows}

    # -- bulk rows (Arrow, one transaction per batch) ---------------------------------------------

    @contextmanager
    def _registered(self, table: str, data):
        """The Arrow table `data` as a view named after `table`, for one statement."""
        name = f"_bulk_{table}"
        self.con.register(name, data)
        try:
            yield name
        finally:
            try:
                self.con.unregister(name)
            except duckdb.Error:  # the transaction was aborted (interrupted): the rollback cleans up
                pass

    def _append(self, table: str, data, **constants: Any) -> None:
        """INSERT ... SELECT from an Arrow table, matching columns by name; constants fill key columns."""
        with self._registered(table, data) as name:
            columns = list(constants) + list(data.column_names)
            select = [f"${i + 1}" for i in range(len(constants))] + [f'"{c}"' for c in data.column_names]
            self.con.execute(
                f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(select)} FROM {name}",
                list(constants.values()),
            )

    def _append_missing(self, table: str, data, keys: list[str], run_id: int) -> None:
        """Append the rows of the run's model whose `keys` are not stored for that model yet."""
        with self._registered(table, data) as name:
            columns = ", ".join(f'"{c}"' for c in data.column_names)
            match = " AND ".join(f'stored."{c}" IS NOT DISTINCT FROM {name}."{c}"' for c in keys)
            self.con.execute(
                f"INSERT INTO {table} (model_id, {columns}) "
                f"SELECT (SELECT model_id FROM runs WHERE run_id = $1), {columns} FROM {name} "
                f"WHERE NOT EXISTS (SELECT 1 FROM {table} stored WHERE stored.model_id = "
                f"(SELECT model_id FROM runs WHERE run_id = $1) AND {match})", [run_id])

    def _update(self, table: str, data, keys: list[str], **constants: Any) -> None:
        """UPDATE rows of `table` from an Arrow table, matched on `keys` and the constants."""
        with self._registered(table, data) as name:
            assignments = [f'"{c}" = {name}."{c}"' for c in data.column_names if c not in keys]
            match = [f"{table}.{c} = ${i + 1}" for i, c in enumerate(constants)]
            match += [f'{table}."{c}" = {name}."{c}"' for c in keys]
            self.con.execute(f"UPDATE {table} SET {', '.join(assignments)} FROM {name} WHERE {' AND '.join(match)}",
                             list(constants.values()))

    # Batch tables that update rows written with the run instead of adding rows: name -> (table, keys).
    UPDATES = {"prompt_outputs": ("prompts", ["prompt_id"]), "sink_tokens": ("tokens", ["prompt_id", "pos"])}
    # Batch tables of the run's model rather than of the run (rotary models' per-offset directions
    # first used by this batch): name -> the columns that identify one stored item; items already
    # stored (by an earlier run, or a batch of this run that committed before an interruption) are skipped.
    MODEL_ROWS = {"singular_vectors": ["form", "layer", "head", "pos_offset", "sv"]}

    def write_batch(self, run_id: int, batch: int, first_prompt: int, last_prompt: int, tables: dict) -> None:
        """Write one batch's rows and its run_batches record atomically: all of it or none of it."""
        self.con.execute("BEGIN TRANSACTION")
        try:
            for table, data in tables.items():
                if table in self.UPDATES and data.num_rows:
                    target, keys = self.UPDATES[table]
                    self._update(target, data, keys, run_id=run_id)
                elif table in self.MODEL_ROWS:
                    if data is not None and data.num_rows:
                        self._append_missing(table, data, self.MODEL_ROWS[table], run_id)
                elif table == "edge_svs":  # stored one row per edge (migration 010); edge_svs is a view
                    if data.num_rows:
                        self._append("edge_sv_lists", edge_sv_lists(data), run_id=run_id)
                elif data.num_rows:
                    self._append(table, data, run_id=run_id)
            self.con.execute(
                "INSERT INTO run_batches VALUES (?, ?, ?, ?, ?, ?, current_timestamp)",
                [run_id, batch, first_prompt, last_prompt, tables["firings"].num_rows, tables["edges"].num_rows],
            )
            self.con.execute("COMMIT")
        except BaseException as err:
            try:
                self.con.execute("ROLLBACK")
            except duckdb.TransactionException:
                pass  # interrupted inside COMMIT: DuckDB has already ended the transaction
            # Ctrl-C inside DuckDB surfaces as its own interrupt error; to the caller it is Ctrl-C.
            if isinstance(err, duckdb.InterruptException) or "interrupted" in str(err).lower():
                raise KeyboardInterrupt from None
            raise


def read_only_statements(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """The text of the one statement of `sql` if it only reads; CatalogError before anything runs
    otherwise. The rule of the `sql` command and of the service's SQL endpoint (store.sql_guard)."""
    from catalog.store.sql_guard import check_read_only

    return check_read_only(con, sql)


def read_only_query(path: str | Path, sql: str):
    """Run one read-only SQL statement against a catalog and return its rows as an Arrow table.

    Read-only by construction: the file is opened read-only with external access off (USER_SQL) and
    the configuration locked, and the statement is judged by what it would do
    (store.sql_guard). Paths of this machine are scrubbed from the answer and from errors.
    """
    from catalog.store.sql_guard import private_paths, scrub, scrub_table

    paths = private_paths(path)
    try:
        con = open_readonly(path, config=USER_SQL)
    except CatalogError as err:
        raise CatalogError(scrub(str(err), paths)) from None
    # DuckDB draws a progress bar on stdout, into the answer, for a query running over 2 s; then the
    # configuration is locked for good, before any statement of the user's runs.
    con.execute("SET enable_progress_bar = false")
    con.execute("SET lock_configuration = true")
    left_running: list = []
    try:
        text = read_only_statements(con, sql)
        try:
            return scrub_table(_interruptible(lambda: con.sql(text).to_arrow_table(), con, left_running), paths)
        except duckdb.Error as err:
            raise CatalogError(f"SQL error: {scrub(str(err).splitlines()[0], paths)}") from None
    except CatalogError as err:
        raise CatalogError(scrub(str(err), paths)) from None
    finally:
        if not left_running:  # never close a connection under a query still running in its thread
            con.close()


def _interruptible(work, con, left_running: list):
    """work() in a thread while this one waits where a signal can land: Ctrl-C or SIGTERM
    (KeyboardInterrupt here) interrupts the query at once, rather than when DuckDB next looks at
    Python's signals (a large result can take minutes to build). A query that does not stop
    within 5 s is left to the process's end, noted in `left_running`."""
    import threading

    outcome, done = {}, threading.Event()  # an Event, not join(): an interrupted join can misreport the thread

    def run():
        try:
            outcome["value"] = work()
        except BaseException as err:  # handed to the waiting thread
            outcome["error"] = err
        finally:
            done.set()

    threading.Thread(target=run, name="sql-query", daemon=True).start()
    try:
        while not done.wait(0.1):
            pass
    except KeyboardInterrupt:
        con.interrupt()
        if not done.wait(5):  # still inside DuckDB: leave it to the process's end
            left_running.append(True)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]

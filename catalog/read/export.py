"""A whole catalog as files: `export_parquet` (one Parquet file per table)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from catalog.errors import CatalogError
from catalog.read.runs import database_path, rows


# Views exported as tables: what a table was before its storage changed (edge_svs, migration 010),
# so that an export has the rows users know beside the stored form.
ROW_VIEWS = ("edge_svs",)


def export_parquet(con, out_dir: str | Path, force: bool = False) -> pa.Table:
    """Write every table (not the views, but edge_svs: ROW_VIEWS) to OUT_DIR/<table>.parquet; return
    (table, n_rows, path) rows.

    A directory that already holds files is refused unless force is given (then its <table>.parquet
    files are overwritten). Uses DuckDB's `COPY ... TO ... (FORMAT parquet)`, which works on a
    read-only connection.

        >>> export_parquet(con, "ioi-parquet")   # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CatalogError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise CatalogError(f"{out_dir} already exists and is not empty: choose another directory, "
                           "or --force to overwrite its tables")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [r[0] for r in rows(
        con, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
        "AND (table_type = 'BASE TABLE' OR table_name IN (SELECT unnest($1::VARCHAR[]))) ORDER BY table_name",
        [list(ROW_VIEWS)]
    )]
    if not names:
        raise CatalogError(f"{database_path(con)} has no tables to export")
    written = []
    for name in names:
        target = out_dir / f"{name}.parquet"
        quoted_path = str(target).replace("'", "''")
        rows(con, f"COPY \"{name}\" TO '{quoted_path}' (FORMAT parquet)")
        n_rows = rows(con, f'SELECT count(*) FROM "{name}"')[0][0]
        written.append({"table": name, "n_rows": n_rows, "path": str(target)})
    return pa.Table.from_pylist(written)

"""The one rule for user SQL (the `sql` command and `POST /api/v1/sql`): what a statement may do.

Two layers, so that a gap in one is closed by the other:

- by construction: the connection that runs user SQL cannot write the file, read other files,
  attach databases or change settings (`store.open_for_user_sql`, and the service's instance:
  `enable_external_access = false`, `lock_configuration = true`, no extension autoloading);
- by what the statement would do: one statement, judged from DuckDB's own parse, not its first
  keyword. SELECT (DESCRIBE, SHOW, SUMMARIZE, WITH, FROM-first are SELECTs to DuckDB) and EXPLAIN
  of such a SELECT (EXPLAIN ANALYZE runs its statement, so the inner one is judged), PRAGMAs
  that only report, CALLs of functions that only report. Every function and table named
  anywhere in a SELECT (subqueries too) is checked in DuckDB's syntax tree: nothing that reads a
  file, runs SQL text, checkpoints or reads the environment.

Answers and errors pass through `scrub`: the server's paths (the catalog's folder, the home
folder, the working folder) are replaced by placeholders, so no path of the machine leaks.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import duckdb

from catalog.errors import CatalogError

MAX_SQL_CHARS = 20_000

# PRAGMAs (and their pragma_* table functions) that report and change nothing.
REPORTING_PRAGMAS = {"table_info", "show_tables", "show_tables_expanded", "show", "database_size",
                     "storage_info", "version", "platform", "functions", "collations", "metadata_info",
                     "user_agent"}
# Functions that read or list files, run SQL text, write, or read the machine's environment.
FORBIDDEN_FUNCTIONS = {"glob", "sniff_csv", "query", "query_table", "checkpoint", "force_checkpoint",
                       "getenv", "read_text", "read_blob", "sqlite_attach", "icu_calendar_names_files",
                       "load_extension", "install_extension", "export_database", "import_database",
                       "duckdb_secrets", "which_secret", "enable_profiling", "disable_profiling",
                       "set_variable", "make_timestamp_tz_files"}
FORBIDDEN_PATTERNS = re.compile(r"^(read_|parquet_|iceberg_|delta_|sqlite_|postgres_|mysql_|ducklake_)|_scan$|"
                                r"^(csv|json|ndjson|excel|spatial|st_read)")
_EXPLAIN_PREFIX = re.compile(r"^\s*EXPLAIN\s+(\((?:[^()']|'[^']*')*\)\s*)?(ANALY[SZ]E\s+)?", re.IGNORECASE)
_PRAGMA_NAME = re.compile(r"^\s*PRAGMA\s+([A-Za-z_][A-Za-z0-9_]*)\s*(\(|;?\s*$)", re.IGNORECASE)
_CALL_NAME = re.compile(r"^\s*CALL\s+([A-Za-z_][A-Za-z0-9_]*)\s*\(", re.IGNORECASE)


def refused(what: str) -> CatalogError:
    return CatalogError(f"refused: SQL here is read-only and {what}")


def _functions_and_tables(node, functions: set, tables: set) -> None:
    """Every function name and base-table name anywhere in a serialized syntax tree."""
    if isinstance(node, dict):
        if isinstance(node.get("function_name"), str):
            functions.add(node["function_name"].lower())
        if node.get("type") == "BASE_TABLE":
            tables.add((node.get("catalog_name") or "", node.get("table_name") or ""))
        for value in node.values():
            _functions_and_tables(value, functions, tables)
    elif isinstance(node, list):
        for value in node:
            _functions_and_tables(value, functions, tables)


def forbidden_function(name: str) -> bool:
    name = name.lower()
    if name.startswith("pragma_"):
        return name[len("pragma_"):] not in REPORTING_PRAGMAS
    return name in FORBIDDEN_FUNCTIONS or bool(FORBIDDEN_PATTERNS.search(name))


def _check_select(con: duckdb.DuckDBPyConnection, text: str) -> None:
    tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [text]).fetchall()[0][0])
    if tree.get("error"):
        # A statement DuckDB cannot show as a syntax tree (PIVOT's several statements) is not judged: refused.
        raise refused("this statement could not be checked (write it as a plain SELECT)")
    functions: set = set()
    tables: set = set()
    _functions_and_tables(tree, functions, tables)
    for name in sorted(functions):
        if forbidden_function(name):
            raise refused(f"`{name}` reads files, runs SQL text, writes or reads the environment")
    for catalog_name, table in tables:
        if any(ch in table for ch in "./\\:") or "://" in catalog_name:
            raise refused(f"'{table}' names a file, not a table of the catalog")


def _one_statement(con: duckdb.DuckDBPyConnection, sql: str):
    try:
        statements = con.extract_statements(sql)
    except (duckdb.Error, ValueError) as err:  # ValueError: a statement type the bindings do not name
        raise CatalogError(f"SQL error: {str(err).splitlines()[0]}") from None
    if not statements:
        raise CatalogError("no SQL statement given")
    for statement in statements:
        if statement.type.name not in ("SELECT", "EXPLAIN", "PRAGMA", "CALL"):
            raise refused(f"this is a {statement.type.name} statement")
    if len(statements) > 1:
        raise CatalogError(f"one statement per call and this text has {len(statements)}; run them one at a time")
    return statements[0]


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """The text of the one statement in `sql`, or CatalogError (before anything runs) saying why not."""
    if not isinstance(sql, str) or not sql.strip():
        raise CatalogError("no SQL statement given")
    if len(sql) > MAX_SQL_CHARS:
        raise CatalogError(f"the SQL text has {len(sql)} characters, more than the limit of {MAX_SQL_CHARS}")
    statement = _one_statement(con, sql)
    text, kind = statement.query, statement.type.name
    if kind == "EXPLAIN":
        prefix = _EXPLAIN_PREFIX.match(text)
        inner = _one_statement(con, text[prefix.end():]) if prefix else None
        if inner is None or inner.type.name != "SELECT":
            raise refused("EXPLAIN is allowed of a SELECT only (EXPLAIN ANALYZE runs its statement)")
        _check_select(con, inner.query)
    elif kind == "SELECT":
        _check_select(con, text)
    elif kind == "PRAGMA":
        name = _PRAGMA_NAME.match(text)
        if name is None or name.group(1).lower() not in REPORTING_PRAGMAS:
            raise refused("this PRAGMA is not one that only reports "
                          f"({', '.join(sorted(REPORTING_PRAGMAS))})")
    else:  # CALL
        name = _CALL_NAME.match(text)
        if name is None or forbidden_function(name.group(1)) or not name.group(1).lower().startswith(
                ("pragma_", "duckdb_")):
            raise refused("CALL is allowed of reporting functions only (duckdb_*, pragma_table_info ...)")
        _check_select(con, f"SELECT * FROM {text.strip().rstrip(';')[len('CALL'):].strip()}")
    return text


def private_paths(db_path: str | Path) -> list[tuple[str, str]]:
    """(path, placeholder) pairs to hide, longest first: the catalog's folder, home, working folder."""
    pairs = {}
    db = Path(db_path).resolve()
    pairs[str(db)] = db.name
    pairs[str(db.parent)] = "<catalog folder>"
    pairs[str(Path(db_path).parent.absolute())] = "<catalog folder>"
    pairs[str(Path.home())] = "~"
    pairs[os.getcwd()] = "<working folder>"
    return sorted(((p, r) for p, r in pairs.items() if len(p) > 1), key=lambda pr: -len(pr[0]))


def scrub(text: str, paths: list[tuple[str, str]]) -> str:
    for path, placeholder in paths:
        text = text.replace(path, placeholder)
    return text


def scrub_table(table, paths: list[tuple[str, str]]):
    """The Arrow table with the paths replaced: in text columns in place; a nested or binary column
    (duckdb_settings()'s typed_value) that holds one becomes its scrubbed text."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns, fields = [], []
    for field, column in zip(table.schema, table.columns):
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            for path, placeholder in paths:
                column = pc.replace_substring(column, path, placeholder)
        elif pa.types.is_nested(column.type) or pa.types.is_binary(column.type) \
                or pa.types.is_large_binary(column.type):
            values = column.to_pylist()
            shown = repr(values)
            if any(path in shown for path, _ in paths):
                column = pa.array([None if v is None else scrub(str(v), paths) for v in values], pa.string())
                field = pa.field(field.name, pa.string())
        columns.append(column)
        fields.append(pa.field(field.name, column.type))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))

"""Which run a question reads, and what every answer shares: the connection helpers (rows,
fetch, the tables a question needs), the run's identity and its notes (in an Arrow table's schema
metadata), and the checks of a question's filters (role, side, component kinds, effect mode).

Imports neither torch nor pandas. A run's method is asked of the registry (catalog.methods).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from catalog import methods
from catalog.errors import CatalogError
from catalog.heads import parse_head

SIDES = ("query", "key")
_PARAMETER = re.compile(r"\$([A-Za-z_]\w*)")
# What each question reads; checked up front so a partial file fails with one clear line.
RUN_TABLES = ("models", "runs", "prompts", "tokens")
EDGE_TABLES = RUN_TABLES + ("edges", "edge_svs")
HEAD_TABLES = EDGE_TABLES + ("singular_vectors", "firings", "firing_svs", "firing_roles")


@dataclass(frozen=True)
class Run:
    """The run a query reads, with its model's shape (to check head names)."""

    run_id: int
    model_id: int
    n_layers: int
    n_heads: int
    status: str
    method: str = methods.DEFAULT  # runs.method (NULL in runs written before methods were recorded)

    @property
    def method_spec(self) -> methods.Method:
        """What the registry says about the run's method (its form, tracer, firing description)."""
        return methods.method(self.method)

    @property
    def sv_form(self) -> str:
        """The singular_vectors form its sv indices refer to."""
        return self.method_spec.form

    def head(self, text: str) -> tuple[int, int]:
        """(layer, head) of "9.9" or "L9H9"; CatalogError when the model has no such head."""
        return parse_head(str(text), self.n_layers, self.n_heads)


def per_offset_forms(con: duckdb.DuckDBPyConnection, run: Run) -> bool:
    """Whether the run's form has one spectrum per offset (a rotary model's `sad` form): there a
    singular direction is named by (pos_offset, sv), since the same sv is a different direction at
    each offset."""
    return bool(rows(con, """SELECT EXISTS (SELECT 1 FROM singular_vectors
                                           WHERE model_id = ? AND form = ? AND pos_offset IS NOT NULL)""",
                     [run.model_id, run.sv_form])[0][0])


class NotFound(CatalogError):
    """A run, prompt, firing or job that is not there (the service answers 404; the CLI, as any
    CatalogError, one error line)."""


def database_path(con: duckdb.DuckDBPyConnection) -> str:
    """The file behind a connection, for error messages."""
    found = rows(con, "SELECT path FROM duckdb_databases() WHERE database_name = current_database()")
    return found[0][0] if found and found[0][0] else "the catalog"


def rows(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> list[tuple]:
    """All rows of a small query (fetched to the end: DuckDB 2 refuses new work on a half-read result)."""
    return con.execute(sql, params or []).fetchall()


def has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    """Whether the catalog has this table (an older catalog opened read-only may lack a newer one)."""
    return bool(rows(con, "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name])[0][0])


def require_tables(con: duckdb.DuckDBPyConnection, names: tuple[str, ...]) -> None:
    """CatalogError naming the missing tables or views, if any of `names` is absent."""
    present = {r[0] for r in rows(con, "SELECT table_name FROM information_schema.tables")}
    missing = [name for name in names if name not in present]
    if missing:
        raise CatalogError(
            f"{database_path(con)} has no {', '.join(missing)}: it is not a complete circuit-catalog "
            "(create one with `circuit-catalog ingest`)"
        )


def rows_table(found: list[dict], schema: pa.Schema) -> pa.Table:
    """Row dicts as an Arrow table of `schema`, column by column: Table.from_pylist imports pandas,
    a second or more of a cold command's time."""
    return pa.table({f.name: pa.array([row[f.name] for row in found], f.type) for f in schema}, schema=schema)


def fetch(con: duckdb.DuckDBPyConnection, sql: str, params: dict | None = None) -> pa.Table:
    """Run one query with named $parameters and return its rows as an Arrow table.

    Parameters the query does not mention are dropped, so callers can pass one shared dict.
    """
    params = {k: v for k, v in (params or {}).items() if k in set(_PARAMETER.findall(sql))}
    try:
        relation = con.sql(sql, params=params)
    except duckdb.CatalogException as err:  # a table or column the file lacks
        first_line = str(err).splitlines()[0]
        raise CatalogError(f"{database_path(con)} is not a complete circuit-catalog ({first_line})") from None
    # DuckDB 2 names it to_arrow_table; 1.x, arrow.
    to_arrow = getattr(relation, "to_arrow_table", None) or relation.arrow
    return to_arrow()


def resolve_run(con: duckdb.DuckDBPyConnection, run_id: int | None = None, tables=RUN_TABLES) -> Run:
    """The run `run_id`, or the latest finished run (highest run_id) when it is None."""
    require_tables(con, tables)
    columns = "r.run_id, r.model_id, m.n_layers, m.n_heads, r.status, r.method"
    source = "runs r JOIN models m USING (model_id)"
    if run_id is None:
        found = rows(con, f"SELECT {columns} FROM {source} WHERE r.status = 'finished' ORDER BY r.run_id DESC LIMIT 1")
        if not found:
            raise CatalogError(f"no finished run in {database_path(con)}: ingest prompts first")
    else:
        found = rows(con, f"SELECT {columns} FROM {source} WHERE r.run_id = ?", [int(run_id)])
        if not found:
            known = [r[0] for r in rows(con, "SELECT run_id FROM runs ORDER BY run_id")]
            raise NotFound(f"no run {run_id} in {database_path(con)} (runs: {', '.join(map(str, known)) or 'none'})")
    return Run(*found[0])


def run_info(con: duckdb.DuckDBPyConnection, run: Run) -> dict:
    """What a result says about the run it read: id, method, status, prompts, model, thresholds."""
    default = methods.method(None)  # runs written before methods (and weight units) were recorded
    found = rows(con, """
        SELECT r.run_id, coalesce(r.method, ?), r.status, (SELECT count(*) FROM prompts p WHERE p.run_id = r.run_id),
               m.name, r.attn_threshold, r.sv_threshold, r.edge_threshold, coalesce(r.weight_unit, ?)
        FROM runs r JOIN models m USING (model_id) WHERE r.run_id = ?""", [default.name, default.weight_unit, run.run_id])
    keys = ("run_id", "method", "status", "n_prompts", "model", "attn_threshold", "sv_threshold", "edge_threshold",
            "weight_unit")
    info = dict(zip(keys, found[0]))
    info["latest_finished"] = bool(rows(
        con, "SELECT max(run_id) = ? FROM runs WHERE status = 'finished'", [run.run_id])[0][0])
    return info


def run_line(info: dict) -> str:
    """One line naming a run: `run 3 (sad, finished, 256 prompts, model attn-real, latest finished run)`."""
    latest = ", the latest finished run" if info.get("latest_finished") else ""
    return (f"run {info['run_id']} ({info['method']}, {info['status']}, {info['n_prompts']} prompts, "
            f"model {info['model']}{latest})")


_META_KEY = b"circuit_catalog"


def with_notes(table: pa.Table, info: dict, notes: list[str]) -> pa.Table:
    """The table with its run and notes in the schema metadata (kept by Arrow IPC and Parquet)."""
    import json

    meta = dict(table.schema.metadata or {})
    meta[_META_KEY] = json.dumps({"run": info, "notes": notes}, default=str).encode()
    return table.replace_schema_metadata(meta)


def _meta(table) -> dict:
    import json

    raw = (getattr(table, "schema", None) and table.schema.metadata or {}).get(_META_KEY)
    return json.loads(raw) if raw else {}


def result_notes(table) -> list[str]:
    """The notes a query attached to its result: why it is empty, how many rows were left out."""
    return list(_meta(table).get("notes", []))


def result_run(table) -> dict:
    """The run a query result was read from (run_info), or {} for a table without it."""
    return dict(_meta(table).get("run", {}))


def check_role(con: duckdb.DuckDBPyConnection, run: Run, role: str | None) -> None:
    """CatalogError when no token of the run has this role (a typo would otherwise give no rows)."""
    if role is None:
        return
    roles = [r[0] for r in rows(
        con, "SELECT DISTINCT role FROM tokens WHERE run_id = ? AND role IS NOT NULL ORDER BY role", [run.run_id]
    )]
    if role not in roles:
        raise CatalogError(f"no token of run {run.run_id} has role '{role}' (roles: {', '.join(roles) or 'none'})")


def check_side(side: str | None) -> None:
    if side is not None and side not in SIDES:
        raise CatalogError(f"side must be 'query' or 'key', not '{side}'")


# Upstream component kinds (edges.up_kind): heads for both methods, the rest from ACC++ runs.
KINDS = ("head", "mlp", "attn_bias", "embed", "offset")


def check_kinds(kinds) -> list[str] | None:
    """The component kinds to keep (None: all); CatalogError on an unknown kind."""
    if kinds is None:
        return None
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    kinds = [k.strip() for text in kinds for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise CatalogError(f"unknown component kind '{unknown[0]}' (kinds: {', '.join(KINDS)})")
    return kinds or None


EFFECT_MODES = ("local", "global")


def check_effect_mode(con, mode: str) -> None:
    """CatalogError when effects are asked of a catalog without interventions or in an unknown mode."""
    if mode not in EFFECT_MODES:
        raise CatalogError(f"the effect mode must be local or global, not '{mode}'")
    require_tables(con, ("interventions",))


def head_name(layer: int, head: int) -> str:
    """The display name of a head: "L9H9" (a bare "9.9" would be read as a number by CSV readers)."""
    return f"L{int(layer)}H{int(head)}"

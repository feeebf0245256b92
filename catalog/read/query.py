"""The query commands' Python twins in one place, answered as Arrow tables: one call per command,
with the command's names and defaults (every call takes a read-only connection first, except sql):

    edges --into H / --from H   edges_into(con, head, side=None, role=None, run_id=None, top=None, ...)
                                edges_from(con, head, ...)
    head H                      head_summary(con, head, run_id=None, top=10) (tables);
                                head_document(con, head, ...) (one object, as --format json)
    heads                       heads(con, run_id=None, sort="head")
    trace                       trace(con, roots=None, dest_role="end", src_role="IO", ...), or
                                trace(con, TraceOptions(...))
    diff --run A --run B        diff_runs(con, run_a, run_b, tolerance=1e-5) (summary, connections,
                                firings, edges), diff_notes(con, run_a, run_b)
    export OUT_DIR              export_parquet(con, out_dir, force=False)
    sql QUERY                   sql(db_path, query)

The answers live in modules named by what they answer: catalog.read.runs (which run, notes,
checks), catalog.read.edges, catalog.read.heads, catalog.read.export; SQL shared between them in
catalog.read.fragments. This module gathers their public names so that `query.edges_into(...)`
keeps working.

Every function takes a read-only DuckDB connection (`catalog.store.open_readonly`) and a
`run_id` (None: the latest run whose status is 'finished'). Heads are written "L.H" ("9.9";
"L9H9" is accepted) and checked against the run's model. User mistakes (an unknown head,
run or role, a file that is not a complete catalog) raise CatalogError with one sentence.

This module imports neither torch nor pandas: `circuit-catalog edges` must start fast.

Example (a catalog of GPT-2 small on IOI prompts):

    >>> from catalog.store import open_readonly
    >>> from catalog.read import query
    >>> con = open_readonly("ioi.duckdb")
    >>> query.edges_into(con, "9.9", side="query", top=3).column_names
    ['upstream', 'up_kind', 'up_layer', 'up_head', 'side', 'n_prompts', 'n_firings', 'mean_weight', 'total_weight', 'top_svs']
    >>> query.edges_from(con, "7.3", role="S2").column_names
    ['downstream', 'down_layer', 'down_head', 'side', 'token_role', 'n_prompts', 'n_firings', 'mean_weight', 'total_weight', 'top_svs']
    >>> query.result_notes(query.edges_into(con, "9.9"))   # why a table is empty, rows left out
    []

Display names of heads are "L9H9" (never "9.9", which CSV readers take for a number); every
result also has the integer layer/head columns. Each table's schema metadata names the run it
read and carries its notes (`result_run`, `result_notes`).
    >>> sorted(query.head_summary(con, "9.9"))
    ['activity', 'downstream', 'role_pairs', 'signal_size', 'spectrum', 'top_svs', 'upstream']
"""

from catalog.read.edges import edges_from, edges_into
from catalog.read.overview import (diff_connections, diff_edges, diff_firings, diff_notes, diff_runs, diff_summary,
                                   heads)
from catalog.read.export import export_parquet
from catalog.read.fragments import (SHARE_MEANING, SIGMA_OVER_FORMS, SVS_TYPE, component_name, head_name_sql,
                                    same_form)
from catalog.read.heads import head_document, head_notes, head_summary, never_fires
from catalog.read.runs import (EDGE_TABLES, EFFECT_MODES, HEAD_TABLES, KINDS, RUN_TABLES, SIDES, Run, check_effect_mode,
                               check_kinds, check_role, check_side, database_path, fetch, head_name, require_tables,
                               resolve_run, result_notes, result_run, rows, run_info, run_line, with_notes)
from catalog.read.trace import TraceGraph, TraceOptions, trace


def sql(db_path, query: str):
    """The `sql` command: one read-only statement (SELECT, WITH, DESCRIBE, SHOW, EXPLAIN, PRAGMA)
    against the catalog file, as an Arrow table."""
    from catalog.store import read_only_query  # the store checks the statement and opens the file read-only

    return read_only_query(db_path, query)


__all__ = [
    "edges_into", "edges_from", "head_summary", "head_document", "heads", "trace", "TraceOptions", "TraceGraph",
    "diff_runs", "diff_summary", "diff_connections", "diff_firings", "diff_edges", "diff_notes", "export_parquet",
    "sql", "head_notes", "never_fires",
    "Run", "resolve_run", "run_info", "run_line", "result_notes", "result_run", "with_notes", "fetch", "rows",
    "require_tables", "database_path", "check_role", "check_side", "check_kinds", "check_effect_mode", "head_name",
    "head_name_sql", "component_name", "same_form", "SIDES", "KINDS", "EFFECT_MODES", "SHARE_MEANING", "SVS_TYPE",
    "SIGMA_OVER_FORMS", "RUN_TABLES", "EDGE_TABLES", "HEAD_TABLES",
]

"""Questions asked of a catalog, answered as Arrow tables.

Every function takes a read-only DuckDB connection (`catalog.store.open_readonly`) and a
`run_id` (None: the latest run whose status is 'finished'). Heads are written "L.H" ("9.9";
"L9H9" is accepted) and checked against the run's model. User mistakes (an unknown head,
run or role, a file that is not a complete catalog) raise CatalogError with one sentence.

This module imports neither torch nor pandas: `circuit-catalog edges` must start fast.

Example (a catalog of GPT-2 small on IOI prompts):

    >>> from catalog.store import open_readonly
    >>> from catalog import query
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

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

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
    method: str = "sad"  # 'sad' (2024 method) | 'accpp' (ACC++)

    @property
    def sv_form(self) -> str:
        """The singular_vectors form its sv indices refer to."""
        return "plain" if self.method == "accpp" else "augmented"

    def head(self, text: str) -> tuple[int, int]:
        """(layer, head) of "9.9" or "L9H9"; CatalogError when the model has no such head."""
        return parse_head(str(text), self.n_layers, self.n_heads)


def database_path(con: duckdb.DuckDBPyConnection) -> str:
    """The file behind a connection, for error messages."""
    found = rows(con, "SELECT path FROM duckdb_databases() WHERE database_name = current_database()")
    return found[0][0] if found and found[0][0] else "the catalog"


def rows(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> list[tuple]:
    """All rows of a small query (fetched to the end: DuckDB 2 refuses new work on a half-read result)."""
    return con.execute(sql, params or []).fetchall()


def require_tables(con: duckdb.DuckDBPyConnection, names: tuple[str, ...]) -> None:
    """CatalogError naming the missing tables or views, if any of `names` is absent."""
    present = {r[0] for r in rows(con, "SELECT table_name FROM information_schema.tables")}
    missing = [name for name in names if name not in present]
    if missing:
        raise CatalogError(
            f"{database_path(con)} has no {', '.join(missing)}: it is not a complete circuit-catalog "
            "(create one with `circuit-catalog ingest`)"
        )


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
            raise CatalogError(f"no run {run_id} in {database_path(con)} (runs: {', '.join(map(str, known)) or 'none'})")
    return Run(*found[0])


def run_info(con: duckdb.DuckDBPyConnection, run: Run) -> dict:
    """What a result says about the run it read: id, method, status, prompts, model, thresholds."""
    found = rows(con, """
        SELECT r.run_id, coalesce(r.method, 'sad'), r.status, (SELECT count(*) FROM prompts p WHERE p.run_id = r.run_id),
               m.name, r.attn_threshold, r.sv_threshold, r.edge_threshold, coalesce(r.weight_unit, 'score')
        FROM runs r JOIN models m USING (model_id) WHERE r.run_id = ?""", [run.run_id])
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


# The token an upstream component writes to: the destination on the query side, the source on the key side.
_TOKEN_POS = "CASE WHEN e.side = 'query' THEN e.dest_pos ELSE e.src_pos END"

# The singular directions of the downstream head an edge writes through, largest first: a list of
# {sv, share} structs, share = that direction's part of the edge weight (signed; can exceed 1 when
# other directions' parts are negative).
SHARE_MEANING = ("share = that singular direction's part of the edge weight (its term divided by the "
                 "whole weight); signed, and above 1 when other directions' terms are negative")
_TOP_SVS = ("list({{'sv': CAST(sv AS INTEGER), 'share': CAST(sv_weight / nullif(total, 0) AS FLOAT)}} "
            "ORDER BY sv_weight DESC)[1:{n}]")
SVS_TYPE = "STRUCT(sv INTEGER, share FLOAT)[]"

# Upstream component kinds (edges.up_kind): heads for both methods, the rest from ACC++ runs.
KINDS = ("head", "mlp", "attn_bias", "embed", "offset")


def head_name(layer: int, head: int) -> str:
    """The display name of a head: "L9H9" (a bare "9.9" would be read as a number by CSV readers)."""
    return f"L{int(layer)}H{int(head)}"


def head_name_sql(layer: str, head: str) -> str:
    """SQL for head_name over two integer expressions."""
    return f"('L' || {layer} || 'H' || {head})"


def component_name(prefix: str = "") -> str:
    """SQL for a component's display name from {prefix}up_kind, up_layer, up_head: "L9H9" for a head,
    "MLP 3", "b_O 3", "embed", "offset"."""
    p = prefix
    return (f"CASE {p}up_kind WHEN 'head' THEN {head_name_sql(p + 'up_layer', p + 'up_head')} "
            f"WHEN 'mlp' THEN 'MLP ' || {p}up_layer WHEN 'attn_bias' THEN 'b_O ' || {p}up_layer "
            f"ELSE {p}up_kind END")


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


def _edge_table(con, run: Run, fixed: str, layer_head: tuple[int, int], group: list[str], display: str,
                head_column: str, typed: list[str], side: str | None, role: str | None, top: int | None, n_svs: int,
                kinds: list[str] | None = None, effect: bool = False, min_effect: float | None = None,
                effect_mode: str = "local") -> pa.Table:
    """Edges with one end fixed (`fixed`: a condition on e.* with $layer, $head), grouped by the other.

    `group` lists the grouping columns of `chosen`; `display` is the SQL (over g.*) of the
    `head_column` output column that names the other end. With `effect` (or `min_effect`) the
    rows also carry the measured effect of the edges (`interventions`, see `_EFFECT`).
    """
    check_side(side)
    check_role(con, run, role)
    kinds = check_kinds(kinds)
    effect = effect or min_effect is not None
    if effect:
        check_effect_mode(con, effect_mode)
    group_sql = ", ".join(group)
    extra = [c for c in group if c in ("side", "token_role")]
    sql = f"""
    WITH chosen AS (
        SELECT e.prompt_id, e.edge_id, e.layer, e.head, e.side, e.up_kind, e.up_layer, e.up_head,
               e.weight, t.role AS token_role{", " + _EFFECT + " AS effect" if effect else ""}
        FROM edges e
        LEFT JOIN tokens t ON t.run_id = e.run_id AND t.prompt_id = e.prompt_id AND t.pos = {_TOKEN_POS}
        {_EFFECT_JOIN if effect else ""}
        WHERE e.run_id = $run AND {fixed}
          AND ($side IS NULL OR e.side = $side) AND ($role IS NULL OR t.role = $role)
          AND ($kinds IS NULL OR list_contains($kinds, e.up_kind))
    ),
    grouped AS (
        SELECT {group_sql}, count(DISTINCT prompt_id) AS n_prompts, count(*) AS n_firings,
               avg(weight) AS mean_weight, sum(weight) AS total_weight
               {", avg(effect) AS mean_effect, count(effect) AS n_tested" if effect else ""}
        FROM chosen GROUP BY {group_sql}
        {"HAVING $min_effect IS NULL OR avg(effect) >= $min_effect" if effect else ""}
    ),
    by_sv AS (
        SELECT {", ".join("c." + g for g in group)}, s.sv, sum(s.weight) AS sv_weight
        FROM chosen c
        -- Filtered before the join: a plain join would hash all of the run's edge_svs, whatever the head.
        JOIN (SELECT * FROM edge_svs WHERE run_id = $run
              AND (prompt_id, edge_id) IN (SELECT prompt_id, edge_id FROM chosen)) s
          ON s.prompt_id = c.prompt_id AND s.edge_id = c.edge_id
        GROUP BY {", ".join("c." + g for g in group)}, s.sv
    ),
    sv_lists AS (
        SELECT {group_sql}, {_TOP_SVS.format(n=int(n_svs))} AS top_svs
        FROM (SELECT b.*, sum(sv_weight) OVER (PARTITION BY {group_sql}) AS total FROM by_sv b)
        GROUP BY {group_sql}
    )
    SELECT {display} AS {head_column}, {", ".join(typed)}, {", ".join("g." + c for c in extra)},
           g.n_prompts, g.n_firings, g.mean_weight, g.total_weight,
           coalesce(l.top_svs, []::{SVS_TYPE}) AS top_svs
           {", g.mean_effect, g.n_tested" if effect else ""},
           count(*) OVER () AS _n_kept,
           (SELECT count(*) FROM (SELECT 1 FROM chosen GROUP BY {group_sql})) AS _n_all
    FROM grouped g
    LEFT JOIN sv_lists l ON {" AND ".join(f"g.{c} IS NOT DISTINCT FROM l.{c}" for c in group)}
    ORDER BY g.n_prompts DESC, g.total_weight DESC, {", ".join("g." + c for c in group)}
    {"LIMIT " + str(int(top)) if top is not None else ""}
    """
    params = {"run": run.run_id, "layer": layer_head[0], "head": layer_head[1], "side": side, "role": role,
              "kinds": kinds, "min_effect": min_effect, "effect_mode": effect_mode}
    table = fetch(con, sql, params)
    n_kept = table.column("_n_kept")[0].as_py() if table.num_rows else 0
    n_all = table.column("_n_all")[0].as_py() if table.num_rows else None
    table = table.drop(["_n_kept", "_n_all"])
    notes = []
    if table.num_rows and n_all is not None and n_kept < n_all:
        notes.append(f"{n_all - n_kept} of {n_all} rows left out: their mean effect is below --min-effect {min_effect:g}"
                     " (or not measured)")
    if table.num_rows and n_kept > table.num_rows:
        notes.append(f"showing the first {table.num_rows} of {n_kept} rows (top {top})")
    if not table.num_rows:
        notes.append(_why_empty(con, run, head_column, layer_head, side, role, kinds, effect, min_effect))
    return with_notes(table, run_info(con, run), notes)


def _why_empty(con, run: Run, direction: str, layer_head: tuple[int, int], side, role, kinds, effect,
               min_effect) -> str:
    """Why edges_into / edges_from found no rows: the first filter (or fact) that leaves nothing."""
    layer, head = layer_head
    name, where = head_name(layer, head), f"in run {run.run_id}"
    if direction == "upstream":
        n_firings = rows(con, "SELECT count(*) FROM firings WHERE run_id = ? AND layer = ? AND head = ?",
                         [run.run_id, layer, head])[0][0]
        if not n_firings and run.method == "accpp":
            return (f"no firing of {name} is decomposed {where} (ACC++ decomposes only the firings its circuits "
                    "reach), so nothing feeds it")
        if not n_firings:
            return f"{name} never fires {where}, so nothing feeds it"
        if layer == 0 and run.method != "accpp":
            return f"{name} is in layer 0: no head is upstream of it"
        fixed, params = "e.layer = ? AND e.head = ?", [layer, head]
        what = f"{name}"
        none = (f"fires {n_firings} times {where} but has no edges stored (no upstream component carries enough "
                "of a side's weight to pass the edge threshold)")
    else:
        if layer == run.n_layers - 1:
            return f"{name} is in the last layer: no head is downstream of it"
        fixed, params = "e.up_kind = 'head' AND e.up_layer = ? AND e.up_head = ?", [layer, head]
        what = f"{name}"
        none = (f"feeds no firing of a later head {where} (no edge from it passes the edge threshold; "
                f"it fires {rows(con, 'SELECT count(*) FROM firings WHERE run_id = ? AND layer = ? AND head = ?', [run.run_id, layer, head])[0][0]} times)")
    counted = rows(con, f"""
        SELECT count(*), count(*) FILTER (WHERE ? IS NULL OR e.side = ?),
               count(*) FILTER (WHERE (? IS NULL OR e.side = ?) AND (? IS NULL OR t.role = ?)),
               count(*) FILTER (WHERE (? IS NULL OR e.side = ?) AND (? IS NULL OR t.role = ?)
                                AND (?::VARCHAR[] IS NULL OR list_contains(?::VARCHAR[], e.up_kind)))
        FROM edges e LEFT JOIN tokens t ON t.run_id = e.run_id AND t.prompt_id = e.prompt_id AND t.pos = {_TOKEN_POS}
        WHERE e.run_id = ? AND {fixed}""", [side, side, side, side, role, role, side, side, role, role, kinds, kinds,
                                             run.run_id] + params)[0]
    total, on_side, with_role, of_kind = counted
    if not total:
        return f"{what} {none}"
    if not on_side:
        return f"{what} has {total} edges {where}, none on the {side} side"
    if not with_role:
        return f"{what} has {on_side} edges {where}{' on the ' + side + ' side' if side else ''}, none whose token has role {role}"
    if not of_kind:
        return f"{what} has {with_role} edges with these filters, none from a component of kind {', '.join(kinds)}"
    if min_effect is not None:
        return f"no row's mean effect (attention drop when ablated) reaches --min-effect {min_effect:g}, or none was measured"
    return f"{what} has no edges with these filters"


# The measured effect of an edge (issue 9): how much the downstream attention drops when the
# edge's signal is ablated (`circuit-catalog intervene`, mode $effect_mode); NULL if not measured.
_EFFECT = "(iv.attn_before - iv.attn_after)"
_EFFECT_JOIN = """LEFT JOIN interventions iv ON iv.run_id = e.run_id AND iv.prompt_id = e.prompt_id
            AND iv.edge_id = e.edge_id AND iv.mode = $effect_mode AND NOT iv.boost"""
EFFECT_MODES = ("local", "global")


def check_effect_mode(con, mode: str) -> None:
    """CatalogError when effects are asked of a catalog without interventions or in an unknown mode."""
    if mode not in EFFECT_MODES:
        raise CatalogError(f"the effect mode must be local or global, not '{mode}'")
    require_tables(con, ("interventions",))


def edges_into(con, head: str, side: str | None = None, role: str | None = None,
               run_id: int | None = None, top: int | None = None, n_svs: int = 3, kind=None,
               effect: bool = False, min_effect: float | None = None, effect_mode: str = "local") -> pa.Table:
    """The upstream components that feed `head`: one row per (component, side).

    Columns: upstream (the component's display name: "L6H10" for a head; "MLP 3", "b_O 3",
    "embed", "offset" in ACC++ runs), up_kind, up_layer and up_head (integers; NULL where the
    kind has none), side, n_prompts and n_firings it is an edge of, mean_weight and total_weight
    of those edges (in the run's weight_unit), top_svs (the head's singular directions it writes
    through: a list of {sv, share}, largest first; see SHARE_MEANING).
    `role` keeps edges whose token (the one the upstream component writes to) has that role;
    `kind` keeps components of these kinds (head, mlp, attn_bias, embed, offset).
    With `effect` (implied by `min_effect`) two more columns: mean_effect, the mean drop of the
    downstream attention when one of those edges is ablated (`interventions`, mode
    `effect_mode`), over the n_tested edges that have been intervened on; `min_effect` keeps
    rows whose mean_effect is at least that.
    Ordered by n_prompts, then total_weight, descending. The result's schema metadata names
    the run (`result_run`) and holds notes (`result_notes`): rows left out by `top` or
    `min_effect`, and why an empty result is empty.

        >>> edges_into(con, "9.9", side="query", role="end", top=5)   # doctest: +SKIP
    """
    run = resolve_run(con, run_id, EDGE_TABLES)
    return _edge_table(con, run, "e.layer = $layer AND e.head = $head", run.head(head),
                       ["up_kind", "up_layer", "up_head", "side"], component_name("g."), "upstream",
                       ["g.up_kind", "g.up_layer", "g.up_head"],
                       side, role, top, n_svs, kind, effect, min_effect, effect_mode)


def edges_from(con, head: str, side: str | None = None, role: str | None = None,
               run_id: int | None = None, top: int | None = None, n_svs: int = 3,
               effect: bool = False, min_effect: float | None = None, effect_mode: str = "local") -> pa.Table:
    """The downstream heads that `head` feeds: one row per (downstream head, side, token_role).

    Columns: downstream (display name "L9H9"), down_layer, down_head (integers), side, token_role,
    then as `edges_into`.

    Same counts, weights and effects as `edges_into`; top_svs are the downstream head's directions.

        >>> edges_from(con, "7.3", side="key", top=5)   # doctest: +SKIP
    """
    run = resolve_run(con, run_id, EDGE_TABLES)
    return _edge_table(con, run, "e.up_kind = 'head' AND e.up_layer = $layer AND e.up_head = $head",
                       run.head(head), ["layer", "head", "side", "token_role"], head_name_sql("g.layer", "g.head"),
                       "downstream", ["g.layer AS down_layer", "g.head AS down_head"],
                       side, role, top, n_svs, None, effect, min_effect, effect_mode)


def head_summary(con, head: str, run_id: int | None = None, top: int = 10, effect: bool = False,
                 min_effect: float | None = None, effect_mode: str = "local") -> dict[str, pa.Table]:
    """Everything about one head, as named tables (in display order).

    spectrum     its top singular values (sv, sigma, pos_offset) in the run's model (rotary models:
                 the spectrum at the offset the head fires at most)
    activity     n_firings, n_prompts (of n_prompts_run), mean attention, score and signal size
    role_pairs   dest_role -> src_role of its firings, with counts
    signal_size  histogram of n_svs (the sparse signal's size); ACC++: of atoms zeroed per side
    top_svs      its singular vectors by the number of firings whose signal uses them (ACC++: whose
                 edges go through them, with their total attention drop)
    upstream     its main upstream heads (edges_into; with their measured effect if `effect`)
    downstream   the heads it feeds most (edges_from; the same)

        >>> head_summary(con, "9.9")["role_pairs"]   # doctest: +SKIP
    """
    run = resolve_run(con, run_id, HEAD_TABLES)
    layer, head_index = run.head(head)
    p = {"run": run.run_id, "model": run.model_id, "layer": layer, "head": head_index, "top": int(top),
         "form": run.sv_form}
    this_head = "run_id = $run AND layer = $layer AND head = $head"
    tables = {
        # A rotary model has one spectrum per offset: the one of the offset this head fires at most.
        "spectrum": fetch(con, f"""
            SELECT sv, sigma, pos_offset FROM singular_vectors
            WHERE model_id = $model AND form = $form AND layer = $layer AND head = $head
              AND pos_offset IS NOT DISTINCT FROM (SELECT mode(pos_offset) FROM firings WHERE {this_head})
            ORDER BY sv LIMIT $top""", p),
        "activity": fetch(con, f"""
            SELECT count(*) AS n_firings, count(DISTINCT prompt_id) AS n_prompts,
                   (SELECT count(*) FROM prompts WHERE run_id = $run) AS n_prompts_run,
                   avg(attn_weight) AS mean_attn, avg(score) AS mean_score, avg(n_svs) AS mean_n_svs
            FROM firings WHERE {this_head}""", p),
        "role_pairs": fetch(con, f"""
            SELECT dest_role, src_role, count(*) AS n_firings, count(DISTINCT prompt_id) AS n_prompts
            FROM firing_roles WHERE {this_head}
            GROUP BY ALL ORDER BY n_firings DESC, dest_role NULLS LAST, src_role NULLS LAST LIMIT $top""", p),
        "signal_size": fetch(con, f"""
            SELECT n_svs, count(*) AS n_firings, count(*) / sum(count(*)) OVER () AS share
            FROM firings WHERE {this_head} GROUP BY n_svs ORDER BY n_svs""", p),
        "top_svs": fetch(con, f"""
            SELECT f.sv, {SIGMA_OVER_FORMS} AS sigma, count(*) AS n_firings,
                   count(*) / (SELECT count(*) FROM firings WHERE {this_head}) AS share_of_firings,
                   avg(f.contribution) AS mean_contribution
            FROM firing_svs f
            LEFT JOIN singular_vectors s ON s.model_id = $model AND s.form = $form AND s.layer = f.layer
                 AND s.head = f.head AND s.sv = f.sv AND {same_form("s", "f")}
            WHERE f.run_id = $run AND f.layer = $layer AND f.head = $head
            GROUP BY f.sv ORDER BY n_firings DESC, f.sv LIMIT $top""", p),
    }
    tables["spectrum"] = with_notes(tables["spectrum"], run_info(con, run), _spectrum_notes(con, p, tables["spectrum"]))
    if run.method == "accpp":  # no sparse signal per firing: atoms per side, and the edges' directions
        tables["signal_size"] = fetch(con, f"""
            SELECT side, n_atoms, count(*) AS n_firings, count(*) / sum(count(*)) OVER (PARTITION BY side) AS share
            FROM firing_sides WHERE {this_head} GROUP BY side, n_atoms ORDER BY side, n_atoms""", p)
        tables["top_svs"] = fetch(con, f"""
            SELECT s.sv, {SIGMA_OVER_FORMS.replace("s.", "v.")} AS sigma, count(DISTINCT (e.prompt_id, e.dest_pos, e.src_pos)) AS n_firings,
                   count(DISTINCT (e.prompt_id, e.dest_pos, e.src_pos)) / (SELECT count(*) FROM firings WHERE {this_head})
                       AS share_of_firings,
                   sum(s.weight) AS total_drop
            FROM edges e JOIN edge_svs s USING (run_id, prompt_id, edge_id)
            LEFT JOIN singular_vectors v ON v.model_id = $model AND v.form = $form AND v.layer = e.layer
                 AND v.head = e.head AND v.sv = s.sv AND {same_form("v", "e")}
            WHERE e.run_id = $run AND e.layer = $layer AND e.head = $head
            GROUP BY s.sv ORDER BY n_firings DESC, s.sv LIMIT $top""", p)
    tables["upstream"] = edges_into(con, head, run_id=run.run_id, top=5, effect=effect, min_effect=min_effect,
                                    effect_mode=effect_mode)
    tables["downstream"] = edges_from(con, head, run_id=run.run_id, top=5, effect=effect, min_effect=min_effect,
                                      effect_mode=effect_mode)
    return tables


def _spectrum_notes(con, p: dict, spectrum: pa.Table) -> list[str]:
    """What a rotary head's spectrum is (one form per offset; only the directions some stored
    signal uses are kept), so that its gaps in sv are not read as missing data. The offset is
    the one `spectrum` (head_summary's) was read at."""
    offsets = {o for o in spectrum.column("pos_offset").to_pylist() if o is not None}
    if not offsets:  # learned positions: the head's one spectrum, every direction stored
        return []
    (offset,) = offsets
    n_stored, d_head = fetch(con, """
        SELECT count(*) AS n_stored, (SELECT d_head FROM models WHERE model_id = $model) AS d_head
        FROM singular_vectors
        WHERE model_id = $model AND form = $form AND layer = $layer AND head = $head AND pos_offset = $offset""",
        dict(p, offset=offset)).to_pylist()[0].values()
    shown = min(n_stored, p["top"])
    kept = (f"only the {n_stored} of its {d_head} singular vectors that stored sparse signals use are kept"
            if n_stored < d_head else f"stored sparse signals use all {d_head} of its singular vectors")
    return [f"rotary model: the spectrum of the form at offset {offset}, the offset this head fires at most; "
            + kept + (f" (showing {shown})" if shown < n_stored else "")]


def head_notes(run: "Run", name: str, tables: dict) -> list[str]:
    """The notes of a head's summary (head_summary's tables): why a part is empty, rows left out,
    what a rotary spectrum holds."""
    notes = [] if tables["activity"].column("n_firings")[0].as_py() else [never_fires(run, name)]
    for key in ("spectrum", "upstream", "downstream"):
        notes += [f"{key}: {note}" for note in result_notes(tables[key])]
    return notes


def same_form(vectors: str, firing: str) -> str:
    """The join condition of singular_vectors rows to the form of a firing (or of an edge's firing)
    that has dest_pos and src_pos: position-free forms (pos_offset NULL) serve every firing;
    a rotary model's serve the firings at their offset."""
    return (f"({vectors}.pos_offset IS NULL OR {vectors}.pos_offset = {firing}.dest_pos - {firing}.src_pos)")


# A sv's sigma over the forms of a head's firings: the head's one value (learned positions), or
# the mean over the firings' offsets (rotary: each offset has its own spectrum).
SIGMA_OVER_FORMS = "CASE WHEN count(s.pos_offset) = 0 THEN any_value(s.sigma) ELSE avg(s.sigma) END"


def never_fires(run: Run, name: str) -> str:
    if run.method == "accpp":
        return (f"no firing of {name} is decomposed in run {run.run_id} (ACC++ decomposes only the firings its "
                "circuits reach)")
    return f"{name} never fires in run {run.run_id}"


def head_document(con, head: str, run_id: int | None = None, top: int = 10, rows_of=None, **effects) -> dict:
    """Everything about one head as one JSON-ready object (`head --format json`, the service's
    /heads/{head}): name ("L9H9"), layer, head (integers), run_id, run (run_info), notes (why a
    part is empty, rows left out), then one list of rows per head_summary table.

    `rows_of` turns an Arrow table into row dicts (default: Table.to_pylist)."""
    rows_of = rows_of or (lambda table: table.to_pylist())
    run = resolve_run(con, run_id)
    layer, index = run.head(head)
    tables = head_summary(con, head, run_id=run.run_id, top=top, **effects)
    name = head_name(layer, index)
    notes = head_notes(run, name, tables)
    document = {"name": name, "layer": layer, "head": index, "run_id": run.run_id,
                "run": result_run(tables["upstream"]), "notes": notes}
    document.update({key: rows_of(table) for key, table in tables.items()})
    return document


def export_parquet(con, out_dir: str | Path, force: bool = False) -> pa.Table:
    """Write every table (not the views) to OUT_DIR/<table>.parquet; return (table, n_rows, path) rows.

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
        con, "SELECT table_name FROM information_schema.tables "
        "WHERE table_type = 'BASE TABLE' AND table_schema = 'main' ORDER BY table_name"
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

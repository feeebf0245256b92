"""Overview questions: every head of a run at once (`heads`), and what changed between two runs
(`diff_runs`). Answered as Arrow tables, by plain SQL over the tables of docs/schema.md.

Like catalog.read.query, this module imports neither torch nor pandas. Heads come as integer
`layer` and `head` columns (no display name that a CSV reader could take for a number).

    >>> from catalog.store import open_readonly
    >>> from catalog.read import overview as query_overview
    >>> con = open_readonly("ioi.duckdb")
    >>> query_overview.heads(con).column_names     # a 2024-method (sad) run
    ['layer', 'head', 'n_firings', 'n_prompts', 'mean_attn', 'mean_score', 'mean_n_svs', 'roles', 'n_edges_in', 'n_edges_out']
    >>> sorted(query_overview.diff_runs(con, 1, 2))
    ['connections', 'edges', 'firings', 'summary']
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from catalog import methods
from catalog.errors import CatalogError
from catalog.read.runs import fetch, resolve_run, rows

HEAD_SORTS = ("head", "firings", "edges_in", "edges_out")
CHANGES = ("added", "removed", "changed", "same")
NO_ROLE = "other"  # how a token without a role is written in `roles`


def run_method(con, run_id: int) -> str:
    """runs.method of the run ('sad' or 'accpp'; the registry's default for runs written before
    methods were recorded)."""
    return rows(con, "SELECT coalesce(method, ?) FROM runs WHERE run_id = ?", [methods.DEFAULT, run_id])[0][0]


def heads(con, run_id: int | None = None, sort: str = "head", n_roles: int = 3) -> pa.Table:
    """Every head of the run's model, one row each, those that never fire included.

    Columns: layer, head; n_firings and n_prompts (prompts with at least one firing); mean_attn
    (attention weight) and mean_score (raw score) of its firings; the signal size, which depends
    on the run's method: mean_n_svs (sad: singular vectors in a firing's sparse signal) or
    mean_atoms (accpp: atoms the greedy zeroed, per firing and side, from firing_sides); roles,
    its most frequent (dest_role->src_role) pairs, most firings first (a token without a role is
    'other'), firings to attention sinks left out unless the run kept sinks (`heads_notes`
    says so); n_edges_in (edges into its firings) and n_edges_out (edges from it into later
    heads' firings). `sort`: head (layer, head), or firings, edges_in, edges_out (descending).

        >>> heads(con, sort="firings").slice(0, 5)   # doctest: +SKIP
    """
    if sort not in HEAD_SORTS:
        raise CatalogError(f"unknown sort '{sort}' (sorts: {', '.join(HEAD_SORTS)})")
    run = resolve_run(con, run_id, ("models", "runs", "prompts", "tokens", "firings", "edges", "firing_roles"))
    if methods.method(run_method(con, run.run_id)).per_firing == "sides":  # atoms per side, no sparse signal
        size_cte = "size AS (SELECT layer, head, avg(n_atoms) AS mean_atoms FROM firing_sides WHERE run_id = $run GROUP BY ALL)"
        size_column = "s.mean_atoms"
    else:
        size_cte = "size AS (SELECT layer, head, avg(n_svs) AS mean_n_svs FROM firings WHERE run_id = $run GROUP BY ALL)"
        size_column = "s.mean_n_svs"
    order = {"head": "g.layer, g.head", "firings": "n_firings DESC, g.layer, g.head",
             "edges_in": "n_edges_in DESC, g.layer, g.head", "edges_out": "n_edges_out DESC, g.layer, g.head"}[sort]
    sql = f"""
    WITH grid AS (
        SELECT l::SMALLINT AS layer, h::SMALLINT AS head FROM range($n_layers) a(l), range($n_heads) b(h)
    ),
    fired AS (
        SELECT layer, head, count(*) AS n_firings, count(DISTINCT prompt_id) AS n_prompts,
               avg(attn_weight) AS mean_attn, avg(score) AS mean_score
        FROM firings WHERE run_id = $run GROUP BY layer, head
    ),
    {size_cte},
    pairs AS (
        SELECT layer, head, coalesce(dest_role, '{NO_ROLE}') || '->' || coalesce(src_role, '{NO_ROLE}') AS pair,
               count(*) AS n
        FROM firing_roles
        -- A sink draws firings from most heads and would top every head's pairs (docs/schema.md,
        -- "Attention sinks"); older runs (to_sink NULL) have no rule and keep every firing.
        WHERE run_id = $run AND (to_sink IS NOT TRUE OR (SELECT keep_sinks FROM runs WHERE run_id = $run))
        GROUP BY ALL
    ),
    roles AS (
        SELECT layer, head, list(pair ORDER BY n DESC, pair)[1:$n_roles] AS roles FROM pairs GROUP BY layer, head
    ),
    edges_in AS (SELECT layer, head, count(*) AS n FROM edges WHERE run_id = $run GROUP BY layer, head),
    edges_out AS (
        SELECT up_layer AS layer, up_head AS head, count(*) AS n FROM edges
        WHERE run_id = $run AND up_kind = 'head' GROUP BY up_layer, up_head
    )
    SELECT g.layer, g.head, coalesce(f.n_firings, 0) AS n_firings, coalesce(f.n_prompts, 0) AS n_prompts,
           f.mean_attn, f.mean_score, {size_column}, coalesce(r.roles, []) AS roles,
           coalesce(i.n, 0) AS n_edges_in, coalesce(o.n, 0) AS n_edges_out
    FROM grid g
    LEFT JOIN fired f USING (layer, head)
    LEFT JOIN size s USING (layer, head)
    LEFT JOIN roles r USING (layer, head)
    LEFT JOIN edges_in i USING (layer, head)
    LEFT JOIN edges_out o USING (layer, head)
    ORDER BY {order}
    """
    return fetch(con, sql, {"run": run.run_id, "n_layers": run.n_layers, "n_heads": run.n_heads,
                            "n_roles": int(n_roles)})


def heads_notes(con, run_id: int | None = None) -> list[str]:
    """What a reader of `heads` must know: how many firings go to attention sinks and whether the
    role pairs leave them out (none for runs without the sink rule or without sinks)."""
    run = resolve_run(con, run_id, ("runs", "firings"))
    n_sink, n_all, keep = rows(con, """
        SELECT count(*) FILTER (f.to_sink), count(*), any_value(r.keep_sinks)
        FROM firings f JOIN runs r USING (run_id) WHERE run_id = ?""", [run.run_id])[0]
    if not n_sink:
        return []
    kept = "they are counted in roles and traced" if keep else "roles leave them out and they have no edges"
    return [f"{n_sink:,} of {n_all:,} firings go to attention sinks (tokens.is_sink): {kept}"]


# Prompts of two runs are matched by text (prompt ids are per run); a text that occurs several
# times in a run is matched occurrence by occurrence, in prompt order.
_MATCHED_PROMPTS = """
    pa AS (SELECT prompt_id, text, row_number() OVER (PARTITION BY text ORDER BY prompt_id) AS k
           FROM prompts WHERE run_id = $a),
    pb AS (SELECT prompt_id, text, row_number() OVER (PARTITION BY text ORDER BY prompt_id) AS k
           FROM prompts WHERE run_id = $b),
    matched AS (SELECT pa.prompt_id AS prompt_a, pb.prompt_id AS prompt_b FROM pa JOIN pb USING (text, k))
"""

_FIRING_KEY = ("layer", "head", "dest_pos", "src_pos")
_EDGE_KEY = ("layer", "head", "dest_pos", "src_pos", "side", "up_kind", "up_layer", "up_head", "up_src_pos")


def _differs(a: str, b: str) -> str:
    """SQL: the two numbers differ by more than $tolerance relative to the larger."""
    return f"abs({a} - {b}) > $tolerance * greatest(abs({a}), abs({b}))"


def _diff_sql(table: str, key: tuple[str, ...], values: list[str], changed: str) -> str:
    """Rows of `table` in the matched prompts of both runs, full-outer-joined on the prompt pair and
    `key`, with a `change` column; `values` are compared (columns X_a, X_b), `changed` is the SQL
    that tells a change; delta is the first value's b - a."""
    on = " AND ".join(["a.prompt_a = b.prompt_a"] + [f"a.{c} IS NOT DISTINCT FROM b.{c}" for c in key])
    keys = ", ".join(f"coalesce(a.{c}, b.{c}) AS {c}" for c in key)
    compared = ", ".join(f"a.{v} AS {v}_a, b.{v} AS {v}_b" for v in values)
    picked = ", ".join(("t." + c) for c in key + tuple(values))
    first = values[0]
    return f"""
    WITH {_MATCHED_PROMPTS},
    a AS (SELECT m.prompt_a, m.prompt_b, {picked} FROM {table} t JOIN matched m ON t.prompt_id = m.prompt_a
          WHERE t.run_id = $a),
    b AS (SELECT m.prompt_a, m.prompt_b, {picked} FROM {table} t JOIN matched m ON t.prompt_id = m.prompt_b
          WHERE t.run_id = $b)
    SELECT CASE WHEN a.prompt_a IS NULL THEN 'added' WHEN b.prompt_a IS NULL THEN 'removed'
                WHEN {changed} THEN 'changed' ELSE 'same' END AS change,
           coalesce(a.prompt_a, b.prompt_a) AS prompt_a, coalesce(a.prompt_b, b.prompt_b) AS prompt_b,
           {keys}, {compared}, b.{first} - a.{first} AS delta
    FROM a FULL OUTER JOIN b ON {on}
    """


def _listed(sql: str, key: tuple[str, ...], first: str, top: int | None) -> str:
    """The diff rows of the chosen changes, changed first, then added, removed (and same); the
    largest difference or weight first."""
    return f"""
    SELECT * FROM ({sql}) WHERE list_contains($changes, change)
    ORDER BY CASE change WHEN 'changed' THEN 0 WHEN 'added' THEN 1 WHEN 'removed' THEN 2 ELSE 3 END,
             abs(coalesce(delta, {first}_b, {first}_a)) DESC, prompt_a, {", ".join(key)}
    {"LIMIT " + str(int(top)) if top is not None else ""}
    """


def _counted(sql: str) -> str:
    return f"SELECT change, count(*) AS n FROM ({sql}) GROUP BY change"


_FIRINGS_CHANGED = ("(abs(a.attn_weight - b.attn_weight) > $tolerance * greatest(abs(a.attn_weight), abs(b.attn_weight)) "
                    "OR abs(a.score - b.score) > $tolerance * greatest(abs(a.score), abs(b.score)) "
                    "OR a.n_svs IS DISTINCT FROM b.n_svs)")
_FIRINGS_SQL = _diff_sql("firings", _FIRING_KEY, ["attn_weight", "score", "n_svs"], _FIRINGS_CHANGED)
_EDGES_SQL = _diff_sql("edges", _EDGE_KEY, ["weight"], _differs("a.weight", "b.weight"))


@dataclass(frozen=True)
class RunPair:
    a: int
    b: int


def _two_runs(con, run_a: int, run_b: int) -> RunPair:
    tables = ("models", "runs", "prompts", "tokens", "firings", "edges")
    first, second = resolve_run(con, run_a, tables), resolve_run(con, run_b, tables)
    if first.run_id == second.run_id:
        raise CatalogError(f"give two different runs to compare (both are run {first.run_id})")
    return RunPair(first.run_id, second.run_id)


def _check_changes(changes) -> list[str]:
    changes = [changes] if isinstance(changes, str) else list(changes or ("added", "removed", "changed"))
    unknown = [c for c in changes if c not in CHANGES]
    if unknown:
        raise CatalogError(f"unknown change '{unknown[0]}' (changes: {', '.join(CHANGES)})")
    return changes


def diff_firings(con, run_a: int, run_b: int, changes=None, tolerance: float = 1e-5,
                 top: int | None = None) -> pa.Table:
    """Firings that appear in run_b only ('added'), in run_a only ('removed'), or in both with
    another attention weight or score (relative difference above `tolerance`) or signal size
    ('changed'); 'same' rows on request. Only prompts that both runs hold (matched by text).

    Columns: change, prompt_a, prompt_b (the prompt's id in each run), layer, head, dest_pos,
    src_pos, attn_weight_a/_b, score_a/_b, n_svs_a/_b, delta (attn_weight_b - attn_weight_a).
    Changed rows first, then added, removed; the largest difference or weight first.
    """
    pair = _two_runs(con, run_a, run_b)
    return fetch(con, _listed(_FIRINGS_SQL, _FIRING_KEY, "attn_weight", top),
                 {"a": pair.a, "b": pair.b, "tolerance": float(tolerance), "changes": _check_changes(changes)})


def diff_edges(con, run_a: int, run_b: int, changes=None, tolerance: float = 1e-5,
               top: int | None = None) -> pa.Table:
    """Edges that appear in run_b only ('added'), in run_a only ('removed'), or in both with a
    weight that differs by more than `tolerance` relative ('changed'). Edges are matched on the
    prompt's text and (layer, head, dest_pos, src_pos, side, up_kind, up_layer, up_head,
    up_src_pos), since prompt and edge ids are per run; only prompts both runs hold.

    Columns: change, prompt_a, prompt_b, the key above, weight_a, weight_b, delta (weight_b -
    weight_a). Changed rows first, then added, removed; the largest difference or weight first.
    """
    pair = _two_runs(con, run_a, run_b)
    return fetch(con, _listed(_EDGES_SQL, _EDGE_KEY, "weight", top),
                 {"a": pair.a, "b": pair.b, "tolerance": float(tolerance), "changes": _check_changes(changes)})


def diff_connections(con, run_a: int, run_b: int, tolerance: float = 1e-5, top: int | None = None) -> pa.Table:
    """The edge diff per connection: one row per (layer, head, side, up_kind, up_layer, up_head),
    the upstream component into the downstream head on one side, over the prompts both runs hold.

    Columns: layer, head, side, up_kind, up_layer, up_head; n_a and n_b (its edges in each run);
    added, removed, changed, same (edges, as in diff_edges); weight_a and weight_b (the sum of
    its edge weights in each run). Connections with the most added, removed or changed edges
    first, then by layer, head.
    """
    pair = _two_runs(con, run_a, run_b)
    group = "layer, head, side, up_kind, up_layer, up_head"
    sql = f"""
    SELECT {group},
           count(*) FILTER (WHERE change <> 'added') AS n_a, count(*) FILTER (WHERE change <> 'removed') AS n_b,
           count(*) FILTER (WHERE change = 'added') AS added, count(*) FILTER (WHERE change = 'removed') AS removed,
           count(*) FILTER (WHERE change = 'changed') AS changed, count(*) FILTER (WHERE change = 'same') AS same,
           sum(weight_a) AS weight_a, sum(weight_b) AS weight_b
    FROM ({_EDGES_SQL}) GROUP BY {group}
    ORDER BY added + removed + changed DESC, layer, head, side, up_kind, up_layer NULLS LAST, up_head NULLS LAST
    {"LIMIT " + str(int(top)) if top is not None else ""}
    """
    return fetch(con, sql, {"a": pair.a, "b": pair.b, "tolerance": float(tolerance)})


def diff_summary(con, run_a: int, run_b: int, tolerance: float = 1e-5) -> pa.Table:
    """One row per table (firings, edges): its rows in the prompts both runs hold, in run a (n_a)
    and in run b (n_b), and how many of them are the same, changed, added (b only), removed (a only)."""
    pair = _two_runs(con, run_a, run_b)
    out = []
    for name, sql in (("firings", _FIRINGS_SQL), ("edges", _EDGES_SQL)):
        counts = dict.fromkeys(CHANGES, 0)
        for row in fetch(con, _counted(sql), {"a": pair.a, "b": pair.b, "tolerance": float(tolerance)}).to_pylist():
            counts[row["change"]] = row["n"]
        out.append({"table": name, "n_a": counts["same"] + counts["changed"] + counts["removed"],
                    "n_b": counts["same"] + counts["changed"] + counts["added"], **counts})
    return pa.Table.from_pylist(out)


def diff_notes(con, run_a: int, run_b: int) -> list[str]:
    """What a reader of a diff must know: both runs' settings, the prompts left out, and whether
    the models or the weight units differ."""
    pair = _two_runs(con, run_a, run_b)
    notes, models, units = [], [], []
    for run_id in (pair.a, pair.b):
        method, model_id, unit, status, attn, sv, edge, settings = rows(con, """
            SELECT coalesce(method, ?), model_id, coalesce(weight_unit, ?), status,
                   attn_threshold, sv_threshold, edge_threshold, settings::VARCHAR
            FROM runs WHERE run_id = ?""", [methods.DEFAULT, methods.method(None).weight_unit, run_id])[0]
        what = (f"attn_threshold {attn}, sv_threshold {sv}, edge_threshold {edge}"
                if methods.method(method).run_settings == "thresholds" else settings)
        notes.append(f"run {run_id} ({status}): method {method}, model {model_id}, {what}")
        models.append(model_id)
        units.append(unit)
    n_a, n_b = (rows(con, "SELECT count(*) FROM prompts WHERE run_id = ?", [r])[0][0] for r in (pair.a, pair.b))
    common = fetch(con, f"WITH {_MATCHED_PROMPTS} SELECT count(*) AS n FROM matched",
                   {"a": pair.a, "b": pair.b}).column("n")[0].as_py()
    line = f"{common} prompts that both runs hold (matched by text) are compared"
    if common < max(n_a, n_b):
        line += f"; left out: {n_a - common} prompts only in run {pair.a}, {n_b - common} only in run {pair.b}"
    notes.append(line)
    if models[0] != models[1]:
        notes.append("the runs used different models: heads are matched by layer and index only")
    if units[0] != units[1]:
        notes.append(f"edge weights are in different units ({units[0]} vs {units[1]}): compare which edges "
                     "appear rather than their weights")
    return notes


def diff_runs(con, run_a: int, run_b: int, tolerance: float = 1e-5) -> dict[str, pa.Table]:
    """summary, connections, firings and edges of the comparison (changed, added and removed rows)."""
    return {"summary": diff_summary(con, run_a, run_b, tolerance),
            "connections": diff_connections(con, run_a, run_b, tolerance),
            "firings": diff_firings(con, run_a, run_b, tolerance=tolerance),
            "edges": diff_edges(con, run_a, run_b, tolerance=tolerance)}

"""The 2024 method's trace (SPEC.md, "Tracing a circuit") as one recursive SQL query.

Start from the root heads' firings whose destination token has `dest_role` and source token
`src_role`. For every key-side edge from (l', h') of a reached firing, the firings of (l', h')
whose destination is that firing's source token are reached too; for every query-side edge,
those whose destination is that firing's destination token. Firings whose source is position 0
(the attention sink) are not traced through. A firing is reached once per prompt however many
paths lead to it: the recursive CTE uses UNION on the firing key, and it terminates because every
step goes to a strictly lower layer (up_layer < layer).

The graph has head nodes "L.H" and token nodes "L.H@role" (aggregated over prompts; the tokens
without a role are one node "L.H@other": a position is a different word in each template, so
positions are never matched across prompts) or "L.H@pos" (one prompt, `prompt_id=N`). Its edges: "writes" from an upstream head to the downstream head's
token node (side, count, mean weight, singular directions), and "reads" from a token node to
its head.
"""

from __future__ import annotations

from dataclasses import replace

import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)

from catalog.errors import CatalogError
from catalog.heads import parse_head
from catalog.read.fragments import (EFFECT, aggregated_token, edge_token_join, edges_of_firing, effect_match,
                                    firing_offset, head_name_sql, no_svs, token_pos, top_svs)
from catalog.read.graph import TraceGraph
from catalog.read.runs import NotFound, Run, check_role, fetch, head_name, per_offset_forms, rows, rows_table

# The IOI name movers (Wang et al. 2022), traced from `end` to `IO` unless told otherwise.
DEFAULT_ROOTS = ("9.6", "9.9", "10.0")
DEFAULT_DEST_ROLE, DEFAULT_SRC_ROLE = "end", "IO"


def resolve_roots(run: Run, roots: list[str] | None) -> tuple[list[tuple[int, int]], list[str]]:
    """Parse the root heads. Default roots the model lacks are skipped with a note; given ones must exist."""
    notes = []
    if isinstance(roots, str):  # one head given as a bare string, not a list of heads
        roots = [roots]
    if roots:
        return [run.head(text) for text in roots], notes
    found = []
    for text in DEFAULT_ROOTS:
        try:
            found.append(run.head(text))
        except CatalogError:
            notes.append(f"default root {head_name(*parse_head(text))} skipped: the model has no such head")
    if not found:
        raise CatalogError(f"the model has none of the default roots "
                           f"{', '.join(head_name(*parse_head(t)) for t in DEFAULT_ROOTS)}: pass --root L.H")
    return found, notes


# How many roots a trace without --root takes from the data, where GPT-2's do not apply.
N_DATA_ROOTS = 3


def _firings_between(con, run: Run, heads: list[tuple[int, int]] | None, dest_role, src_role, prompt_id) -> list:
    """(layer, head, n_prompts, n_firings) of the heads (all if `heads` is None) that fire from
    dest_role to src_role (None: any token), most prompts first."""
    only = "" if heads is None else "AND (" + " OR ".join(
        f"(f.layer = {int(l)} AND f.head = {int(h)})" for l, h in heads) + ")"
    return rows(con, f"""
        SELECT f.layer, f.head, count(DISTINCT f.prompt_id) AS n_prompts, count(*) AS n_firings FROM firings f
        JOIN tokens d ON d.run_id = f.run_id AND d.prompt_id = f.prompt_id AND d.pos = f.dest_pos
        JOIN tokens s ON s.run_id = f.run_id AND s.prompt_id = f.prompt_id AND s.pos = f.src_pos
        WHERE f.run_id = ? {only} AND (?::INTEGER IS NULL OR f.prompt_id = ?)
          AND (?::VARCHAR IS NULL OR d.role = ?) AND (?::VARCHAR IS NULL OR s.role = ?)
        GROUP BY f.layer, f.head ORDER BY n_prompts DESC, n_firings DESC, f.layer DESC, f.head""",
                [run.run_id, prompt_id, prompt_id, dest_role, dest_role, src_role, src_role])


def roots_for(con, run: Run, roots: list[str] | None, dest_role: str | None, src_role: str | None,
              prompt_id: int | None = None) -> tuple[list[tuple[int, int]], list[str]]:
    """The root heads of a trace: those given; else GPT-2's name movers (DEFAULT_ROOTS) where the
    model has them and one of them fires between the roles; else the N_DATA_ROOTS heads that fire
    between the roles in most prompts, named with their counts in a note. No head firing between
    the roles is an error (one line asking for --root)."""
    if roots:
        return resolve_roots(run, roots)
    roles = f"from {dest_role or 'any token'} to {src_role or 'any token'}"
    where = f"run {run.run_id}" + (f", prompt {prompt_id}" if prompt_id is not None else "")
    defaults = ", ".join(head_name(*parse_head(t)) for t in DEFAULT_ROOTS)
    try:
        found, notes = resolve_roots(run, None)
    except CatalogError:
        found, notes, why = [], [], f"the model has none of GPT-2's default roots {defaults}"
    else:
        if _firings_between(con, run, found, dest_role, src_role, prompt_id):
            return found, notes
        why = f"GPT-2's default roots {defaults} have no firing {roles} in {where}"
    busiest = _firings_between(con, run, None, dest_role, src_role, prompt_id)[:N_DATA_ROOTS]
    if not busiest:
        raise CatalogError(f"{why}, and no head fires {roles} there: pass --root L.H (or other --dest-role/--src-role)")
    counts = ", ".join(f"{head_name(l, h)} ({p} prompts, {n} firings)" for l, h, p, n in busiest)
    return [(l, h) for l, h, _, _ in busiest], [
        f"no --root given and {why}: rooted at the {len(busiest)} heads that fire {roles} in most prompts: {counts}"]


_REACHED_SQL = """
WITH RECURSIVE reached(prompt_id, layer, head, dest_pos, src_pos) AS (
    SELECT f.prompt_id, f.layer, f.head, f.dest_pos, f.src_pos
    FROM firings f
    JOIN tokens d ON d.run_id = f.run_id AND d.prompt_id = f.prompt_id AND d.pos = f.dest_pos
    JOIN tokens s ON s.run_id = f.run_id AND s.prompt_id = f.prompt_id AND s.pos = f.src_pos
    WHERE f.run_id = $run AND ({is_root})
      AND ($dest_role IS NULL OR d.role = $dest_role) AND ($src_role IS NULL OR s.role = $src_role)
      AND ($prompt IS NULL OR f.prompt_id = $prompt)
  UNION  -- not UNION ALL: a firing reached along several paths counts once per prompt
    SELECT f.prompt_id, f.layer, f.head, f.dest_pos, f.src_pos
    FROM (
        -- Where each upstream head wrote: the source token on the key side, the destination on the
        -- query side. Computed first so that the join with firings is on plain equalities.
        SELECT r.prompt_id, e.up_layer, e.up_head,
               {token_pos} AS token_pos
        FROM reached r
        JOIN edges e ON {edge_of_reached}
        WHERE r.src_pos <> 0  -- the attention sink is not traced through
          AND ($prompt IS NULL OR e.prompt_id = $prompt)  -- redundant, but lets one prompt skip the scan
    ) step
    JOIN firings f ON f.run_id = $run AND f.prompt_id = step.prompt_id AND f.layer = step.up_layer
                  AND f.head = step.up_head AND f.dest_pos = step.token_pos
)
SELECT * FROM reached ORDER BY prompt_id, layer DESC, head, dest_pos, src_pos
"""


def reached_firings(con, run: Run, roots: list[tuple[int, int]], dest_role: str | None,
                    src_role: str | None, prompt_id: int | None = None) -> pa.Table:
    """Every firing the trace reaches: (prompt_id, layer, head, dest_pos, src_pos), once each."""
    # Layer and head are ints from parse_head, so inlining them is safe.
    is_root = " OR ".join(f"(f.layer = {int(l)} AND f.head = {int(h)})" for l, h in roots)
    params = {"run": run.run_id, "dest_role": dest_role, "src_role": src_role, "prompt": prompt_id}
    return fetch(con, _REACHED_SQL.format(is_root=is_root, **_FRAGMENTS), params)


# Edges of the reached firings, grouped by (upstream head, downstream head, token, side).
# {token} is token_pos for one prompt, token_role over all prompts (where role-less tokens drop out).
_EDGES_SQL = """
WITH traced AS (
    SELECT e.prompt_id, e.layer, e.head, e.dest_pos, e.src_pos, e.side, e.up_layer, e.up_head, e.weight,
           {token} AS token, {effect} AS effect
    FROM {reached} r
    JOIN edges e ON {edge_of_reached}
    {token_join}
),
grouped AS (
    SELECT up_layer, up_head, layer, head, token, side, count(DISTINCT prompt_id) AS n_prompts,
           count(*) AS n_edges, avg(weight) AS mean_weight, avg(effect) AS mean_effect
    FROM traced GROUP BY up_layer, up_head, layer, head, token, side
    HAVING $min_effect IS NULL OR avg(effect) >= $min_effect  -- only edges measured to matter
),
writes AS (
    SELECT {up_name} AS source, {down_name} || '@' || g.token AS target,
           'writes' AS kind, g.side, 'head' AS up_kind, g.up_layer, g.up_head, g.layer AS down_layer,
           g.head AS down_head, CAST(g.token AS VARCHAR) AS token, {count} AS count, g.n_edges, g.mean_weight,
           {no_svs} AS top_svs, g.layer AS sort_layer,  -- filled in after pruning: with_top_svs
           g.head AS sort_head, g.token AS sort_token, g.mean_effect
    FROM grouped g
),
reads AS (
    SELECT {head} || '@' || token AS source, {head} AS target,
           'reads' AS kind, string_agg(DISTINCT side, '+' ORDER BY side) AS side,
           NULL::VARCHAR AS up_kind, NULL::SMALLINT AS up_layer, NULL::SMALLINT AS up_head, layer AS down_layer,
           head AS down_head, CAST(token AS VARCHAR) AS token,
           {reads_count} AS count, count(*) AS n_edges, NULL::DOUBLE AS mean_weight,
           {no_svs} AS top_svs, layer AS sort_layer, head AS sort_head,
           token AS sort_token, NULL::DOUBLE AS mean_effect
    FROM traced
    {reads_filter}
    GROUP BY layer, head, token
)
SELECT source, target, kind, side, up_kind, up_layer, up_head, down_layer, down_head, token, count, n_edges,
       mean_weight, top_svs{effect_column}
FROM (SELECT * FROM writes UNION ALL SELECT * FROM reads)
-- Each token node's incoming edges (strongest first), then its edge to its head.
ORDER BY sort_layer DESC, sort_head, sort_token, kind DESC, count DESC, mean_weight DESC, source, side
"""


# The singular directions of the drawn "writes" edges ({kept}: up_layer, up_head, down_layer,
# down_head, token, side), after pruning: a pruned trace sums the directions of a few edges, not of
# every traced one. Joined from the reached firings, not from a grouped list: DuckDB would
# otherwise pre-aggregate all of the directions before the join (seconds on a large catalog). The
# stored lists (edge_sv_lists, one row per edge) are joined, then unnested: the edge_svs view
# would unnest every edge of the catalog first.
_SVS_SQL = """
WITH by_sv AS (
    SELECT up_layer, up_head, layer, head, token, side, pos_offset, sv, sum(w) AS sv_weight
    FROM (SELECT e.up_layer, e.up_head, e.layer, e.head, k.token, e.side, {sv_offset} AS pos_offset,
                 unnest(l.svs) AS sv, unnest(l.weights) AS w
          FROM {reached} r
          JOIN edges e ON {edge_of_reached}
          {token_join}
          JOIN {kept} k ON k.up_layer = e.up_layer AND k.up_head = e.up_head AND k.down_layer = e.layer
                       AND k.down_head = e.head AND k.side = e.side AND k.token = CAST({token} AS VARCHAR)
          JOIN edge_sv_lists l ON l.run_id = $run AND l.prompt_id = e.prompt_id AND l.edge_id = e.edge_id)
    GROUP BY ALL
)
SELECT up_layer, up_head, layer AS down_layer, head AS down_head, token, side, {top_svs} AS top_svs
FROM (SELECT b.*, sum(sv_weight) OVER (PARTITION BY up_layer, up_head, layer, head, token, side) AS total
      FROM by_sv b)
GROUP BY ALL
"""
SVS_KEY = ("up_layer", "up_head", "down_layer", "down_head", "token", "side")


def with_top_svs(con, run: Run, graph: TraceGraph, n_svs: int) -> TraceGraph:
    """The graph with the top_svs of its "writes" edges filled in (trace_heads leaves them empty
    so that pruning comes first)."""
    writes = graph.edges.filter(pa.compute.equal(graph.edges.column("kind"), "writes")).select(list(SVS_KEY))
    if not writes.num_rows:
        return graph
    per_offset = per_offset_forms(con, run)
    sql = _SVS_SQL.format(
        reached="_circuit_catalog_reached", kept="_circuit_catalog_kept", **_FRAGMENTS,
        sv_offset=firing_offset("e") if per_offset else "NULL",
        token="t.pos" if graph.prompt_id is not None else aggregated_token("t"),
        top_svs=top_svs("sv", "sv_weight", "total", "sv_weight DESC, pos_offset, sv", "$n_svs", "pos_offset")
        if per_offset else top_svs("sv", "sv_weight", "total", "sv_weight DESC", "$n_svs"))
    con.register("_circuit_catalog_reached", graph.firings)
    con.register("_circuit_catalog_kept", writes)
    try:
        found = fetch(con, sql, {"run": run.run_id, "n_svs": int(n_svs)})
    finally:
        con.unregister("_circuit_catalog_kept")
        con.unregister("_circuit_catalog_reached")
    by_key = {tuple(row[c] for c in SVS_KEY): row["top_svs"] for row in found.to_pylist()}
    column = graph.edges.column("top_svs")
    keys = graph.edges.select(list(SVS_KEY) + ["kind"]).to_pylist()
    filled = [by_key.get(tuple(k[c] for c in SVS_KEY), []) if k["kind"] == "writes" else old
              for k, old in zip(keys, column.to_pylist())]
    edges = graph.edges.set_column(graph.edges.column_names.index("top_svs"), "top_svs",
                                   pa.array(filled, column.type))
    return replace(graph, edges=edges)


# An edge's measured effect: the downstream attention drop when it is ablated (`intervene`).
_EFFECT = f"(SELECT {EFFECT} FROM interventions iv WHERE {effect_match('e', '$run')})"
# The fragments the templates above share with the other questions (catalog.read.fragments).
_FRAGMENTS = dict(edge_of_reached=edges_of_firing("e", "r"), token_pos=token_pos("e"),
                  token_join=edge_token_join("e", "t", "JOIN"),
                  up_name=head_name_sql("g.up_layer", "g.up_head"), down_name=head_name_sql("g.layer", "g.head"),
                  head=head_name_sql("layer", "head"))


def _traced_edges(con, run: Run, reached: pa.Table, prompt_id: int | None, n_svs: int, effect: bool = False,
                  min_effect: float | None = None, effect_mode: str = "local") -> pa.Table:
    view = "_circuit_catalog_reached"
    con.register(view, reached)  # a connection-local view of an Arrow table: fine on a read-only file
    try:
        one_prompt = prompt_id is not None
        per_offset = per_offset_forms(con, run)  # a rotary form: directions named by (pos_offset, sv)
        sql = _EDGES_SQL.format(
            reached=view, **_FRAGMENTS, no_svs=no_svs(per_offset),
            sv_offset=firing_offset("e") if per_offset else "NULL",
            top_svs=top_svs("sv", "sv_weight", "total", "sv_weight DESC, pos_offset, sv", "$n_svs", "pos_offset")
            if per_offset else top_svs("sv", "sv_weight", "total", "sv_weight DESC", "$n_svs"),
            # Over all prompts a token is its role, or "other" for any token without one (never dropped,
            # never matched by position across prompts).
            token="t.pos" if one_prompt else aggregated_token("t"),
            # Over all prompts an edge counts the prompts it appears in; in one prompt, its firings.
            count="g.n_edges" if one_prompt else "g.n_prompts",
            reads_count="count(DISTINCT (dest_pos, src_pos))" if one_prompt else "count(DISTINCT prompt_id)",
            effect=_EFFECT if effect else "NULL::DOUBLE", effect_column=", mean_effect" if effect else "",
            # With --min-effect, only the token nodes something still writes to are read from.
            reads_filter="WHERE (layer, head, token) IN (SELECT (layer, head, token) FROM grouped)"
            if min_effect is not None else "",
        )
        return fetch(con, sql, {"run": run.run_id, "n_svs": int(n_svs), "min_effect": min_effect,
                                "effect_mode": effect_mode})
    finally:
        con.unregister(view)


def _nodes(con, run: Run, edges: pa.Table, roots: list[tuple[int, int]], prompt_id: int | None) -> pa.Table:
    """One row per node of the edge list (root heads included even when nothing feeds them)."""
    found: dict[str, dict] = {}

    def add(name, kind, layer, head, token=None):
        row = found.setdefault(name, {"node": name, "kind": kind, "layer": layer, "head": head, "role": None,
                                      "pos": None, "token": None, "is_root": kind == "head" and (layer, head) in roots})
        if token is not None:  # a token node: its role (over all prompts) or position (one prompt)
            if prompt_id is not None:
                row["pos"] = int(token)
            else:
                row["role"] = token

    for layer, head in roots:
        add(head_name(layer, head), "head", layer, head)
    edge_rows = edges.select(["source", "target", "kind", "up_layer", "up_head", "down_layer", "down_head",
                              "token"]).to_pylist()  # not top_svs: slow to turn into Python, unused here
    for e in edge_rows:
        down = head_name(e["down_layer"], e["down_head"])
        add(down, "head", e["down_layer"], e["down_head"])
        add(f"{down}@{e['token']}", "token", e["down_layer"], e["down_head"], e["token"])
        if e["kind"] == "writes":
            add(e["source"], "head", e["up_layer"], e["up_head"])
    # Only the nodes the edges name (a head with no token node is a root or an upstream head).
    names = {n for e in edge_rows for n in (e["source"], e["target"])} | {
        head_name(l, h) for l, h in roots}
    nodes = [row for name, row in found.items() if name in names]
    if prompt_id is not None:
        tokens = {pos: (token, role) for pos, token, role in rows(
            con, "SELECT pos, token, role FROM tokens WHERE run_id = ? AND prompt_id = ?", [run.run_id, prompt_id])}
        for row in nodes:
            if row["kind"] == "token":
                row["token"], row["role"] = tokens.get(row["pos"], (None, None))
    nodes.sort(key=lambda r: (-r["layer"], r["head"], r["kind"] != "head", r["pos"] or 0, r["role"] or ""))
    schema = pa.schema([("node", pa.string()), ("kind", pa.string()), ("layer", pa.int32()), ("head", pa.int32()),
                        ("role", pa.string()), ("pos", pa.int32()), ("token", pa.string()), ("is_root", pa.bool_())])
    return rows_table(nodes, schema)


def _root_notes(con, run: Run, reached: pa.Table, roots: list[tuple[int, int]], dest_role, src_role, prompt_id,
                roles: str) -> list[str]:
    """Per root: no firing between these roles (and how often it fires at all), or how many of its
    firings the roles leave out."""
    notes = []
    started: dict[tuple[int, int], int] = {}
    for layer, head in zip(reached.column("layer").to_pylist(), reached.column("head").to_pylist()):
        started[(layer, head)] = started.get((layer, head), 0) + 1
    for layer, head in roots:
        name = head_name(layer, head)
        total = rows(con, "SELECT count(*) FROM firings WHERE run_id = ? AND layer = ? AND head = ? "
                          "AND (? IS NULL OR prompt_id = ?)", [run.run_id, layer, head, prompt_id, prompt_id])[0][0]
        where = f"in run {run.run_id}" + (f", prompt {prompt_id}" if prompt_id is not None else "")
        if (layer, head) not in started:
            notes.append(f"root {name} has no firing {roles}" + (
                f" (it fires {total} times {where} between other roles)" if total else f" (it never fires {where})"))
            continue
        if dest_role is None and src_role is None:
            continue
        # Reached firings of the root's head include those reached from other roots: count the roots' own.
        own = rows(con, """
            SELECT count(*) FROM firings f
            JOIN tokens d ON d.run_id = f.run_id AND d.prompt_id = f.prompt_id AND d.pos = f.dest_pos
            JOIN tokens s ON s.run_id = f.run_id AND s.prompt_id = f.prompt_id AND s.pos = f.src_pos
            WHERE f.run_id = ? AND f.layer = ? AND f.head = ? AND (? IS NULL OR f.prompt_id = ?)
              AND (?::VARCHAR IS NULL OR d.role = ?) AND (?::VARCHAR IS NULL OR s.role = ?)""",
                   [run.run_id, layer, head, prompt_id, prompt_id, dest_role, dest_role, src_role, src_role])[0][0]
        if own < total:
            notes.append(f"root {name}: {own} of its {total} firings {where} are {roles}; the other {total - own} "
                         "are not traced (--dest-role any --src-role any traces them all)")
    return notes


def trace_heads(con, run: Run, options) -> TraceGraph:
    """The circuit behind the root heads (options: catalog.read.trace.TraceOptions), unpruned."""
    dest_role, src_role, prompt_id = options.dest_role, options.src_role, options.prompt_id
    if options.roots:  # given roots are checked first: a bad head is the first thing to hear of
        resolve_roots(run, options.roots)
    check_role(con, run, dest_role)
    check_role(con, run, src_role)
    if prompt_id is not None and not rows(
            con, "SELECT 1 FROM prompts WHERE run_id = ? AND prompt_id = ?", [run.run_id, int(prompt_id)]):
        n = rows(con, "SELECT count(*) FROM prompts WHERE run_id = ?", [run.run_id])[0][0]
        raise NotFound(f"run {run.run_id} has no prompt {prompt_id} (prompts 0..{n - 1})")
    root_heads, notes = roots_for(con, run, options.roots, dest_role, src_role, prompt_id)
    reached = reached_firings(con, run, root_heads, dest_role, src_role, prompt_id)
    root_names = [head_name(l, h) for l, h in root_heads]
    fired = set(zip(reached.column("layer").to_pylist(), reached.column("head").to_pylist()))
    roles = f"from {dest_role or 'any token'} to {src_role or 'any token'}"
    notes += _root_notes(con, run, reached, root_heads, dest_role, src_role, prompt_id, roles)
    effect, min_effect, effect_mode = options.with_effect, options.min_effect, options.effect_mode
    edges = _traced_edges(con, run, reached, prompt_id, options.n_svs, effect, min_effect, effect_mode)
    if min_effect is not None:   # say how many edges the effect filter left out
        every = _traced_edges(con, run, reached, prompt_id, options.n_svs, effect, None, effect_mode)
        n_all, n_kept = (sum(1 for k in t.column("kind").to_pylist() if k == "writes") for t in (every, edges))
        if n_kept < n_all:
            notes.append(f"{n_all - n_kept} of {n_all} edges left out: their mean effect is below --min-effect "
                         f"{min_effect:g} (or not measured)")
    nodes = _nodes(con, run, edges, [lh for lh in root_heads if lh in fired], prompt_id)
    return TraceGraph(run.run_id, prompt_id, root_names, dest_role, src_role, reached, nodes, edges, notes)

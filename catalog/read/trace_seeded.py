"""The seeded trace: the stored ACC++ circuit of a run (ACCPP.md section 4), as a graph: one prompt, or combined.

An ACC++ run stores each prompt's circuit as rows: seeds (components that explain the output,
linked to the prompt's root), the decomposed firings, and their edges. The graph is rebuilt by
one recursive query from the head seeds: a firing's head-slice edge (up_layer, up_head,
up_src_pos) leads to the upstream firing at the token it writes to (the destination on the query
side, the source on the key side), when that firing was decomposed. As in the reference library,
a key-side head slice that reads a token after the firing's source (up_src_pos > src_pos) is part
of the firing's decomposition (the edges table) but no node of the graph.

Nodes: the root; firings "L9H9@i>j" (positions; over all prompts, token roles or "other"); leaves
"MLP L@t", "b_O L@t", "embed@t", "offset@t" (t the token written to; the offset node is shared by
every downstream head, as in the reference). Edges: "seed" (component -> root, weight in the
objective's unit) and "query" / "key" (component -> firing, attention-probability drop). Over
all prompts, nodes and edges are merged by label, `count` is the number of prompts they appear in
and `mean_weight` sums the weights and divides by the number of prompts with a graph (the
reference's combine_prompt_graphs).
"""

from __future__ import annotations

import pyarrow as pa

from catalog.errors import CatalogError
from catalog.read.fragments import EFFECT, NO_SVS, aggregated_token, edges_of_firing, effect_join, token_pos, top_svs
from catalog.read.graph import TraceGraph
from catalog.read.runs import NotFound, Run, check_kinds, fetch, rows, rows_table

# Label of a token: its position for one prompt, its role (or "other", never its position: the same
# position is a different word in each template) over all prompts.
_TOKEN = "CASE WHEN $one_prompt THEN CAST({t}.pos AS VARCHAR) ELSE " + aggregated_token("{t}") + " END"

_GRAPH_SQL = """
WITH RECURSIVE reached(prompt_id, layer, head, dest_pos, src_pos) AS (
    SELECT s.prompt_id, s.up_layer, s.up_head, s.pos, s.up_src_pos
    FROM seeds s
    JOIN firings f ON f.run_id = s.run_id AND f.prompt_id = s.prompt_id AND f.layer = s.up_layer
                  AND f.head = s.up_head AND f.dest_pos = s.pos AND f.src_pos = s.up_src_pos
    WHERE s.run_id = $run AND s.up_kind = 'head' AND ($prompt IS NULL OR s.prompt_id = $prompt)
  UNION
    SELECT f.prompt_id, f.layer, f.head, f.dest_pos, f.src_pos
    FROM reached r
    JOIN edges e ON {edge_of_reached}
    JOIN firings f ON f.run_id = $run AND f.prompt_id = e.prompt_id AND f.layer = e.up_layer
                  AND f.head = e.up_head AND f.src_pos = e.up_src_pos
                  AND f.dest_pos = {token_pos}
    WHERE e.up_kind = 'head' AND NOT (e.side = 'key' AND e.up_src_pos > e.src_pos)
),
graph_edges AS (   -- component -> firing, one row per stored edge of a reached firing
    SELECT e.prompt_id, e.edge_id, e.side, e.up_kind, e.up_layer, e.up_head, e.up_src_pos, e.up_attn,
           {token_pos} AS up_pos,
           e.layer, e.head, e.dest_pos, e.src_pos, e.weight
    FROM reached r
    JOIN edges e ON {edge_of_reached}
    WHERE NOT (e.up_kind = 'head' AND e.side = 'key' AND e.up_src_pos > e.src_pos)
      AND ($kinds IS NULL OR list_contains($kinds, e.up_kind))
  UNION ALL  -- seed -> root
    SELECT s.prompt_id, NULL, 'seed', s.up_kind, s.up_layer, s.up_head, s.up_src_pos, NULL, s.pos,
           NULL, NULL, NULL, NULL, s.weight
    FROM seeds s WHERE s.run_id = $run AND ($prompt IS NULL OR s.prompt_id = $prompt)
      AND ($kinds IS NULL OR list_contains($kinds, s.up_kind))
      -- as in the reference library, a prompt whose seeds hold no head has no graph
      AND EXISTS (SELECT 1 FROM seeds h WHERE h.run_id = s.run_id AND h.prompt_id = s.prompt_id
                  AND h.root_id = s.root_id AND h.up_kind = 'head')
),
labelled AS (
    SELECT g.*,
           CASE g.up_kind WHEN 'head' THEN 'L' || g.up_layer || 'H' || g.up_head || '@' || {tok_up} || '>' || {tok_src}
                          WHEN 'mlp' THEN 'MLP ' || g.up_layer || '@' || {tok_up}
                          WHEN 'attn_bias' THEN 'b_O ' || g.up_layer || '@' || {tok_up}
                          ELSE g.up_kind || '@' || {tok_up} END AS source,
           CASE WHEN g.side = 'seed' THEN 'root'
                ELSE 'L' || g.layer || 'H' || g.head || '@' || {tok_dest} || '>' || {tok_fsrc} END AS target,
           {tok_up} AS token
    FROM graph_edges g
    JOIN tokens tu ON tu.run_id = $run AND tu.prompt_id = g.prompt_id AND tu.pos = g.up_pos
    LEFT JOIN tokens ts ON ts.run_id = $run AND ts.prompt_id = g.prompt_id AND ts.pos = g.up_src_pos
    LEFT JOIN tokens td ON td.run_id = $run AND td.prompt_id = g.prompt_id AND td.pos = g.dest_pos
    LEFT JOIN tokens tf ON tf.run_id = $run AND tf.prompt_id = g.prompt_id AND tf.pos = g.src_pos
)
SELECT * FROM labelled
"""


def _graph_rows(con, run: Run, prompt_id: int | None, kinds) -> pa.Table:
    sql = _GRAPH_SQL.format(tok_up=_TOKEN.format(t="tu"), tok_src=_TOKEN.format(t="ts"),
                            tok_dest=_TOKEN.format(t="td"), tok_fsrc=_TOKEN.format(t="tf"),
                            edge_of_reached=edges_of_firing("e", "r"), token_pos=token_pos("e"))
    return fetch(con, sql, {"run": run.run_id, "prompt": prompt_id, "one_prompt": prompt_id is not None,
                            "kinds": kinds})


_EDGES_SQL = """
WITH sv_lists AS (
    SELECT l.source, l.target, l.side,
           {top_svs} AS top_svs
    FROM _accpp_graph l
    JOIN (SELECT prompt_id, edge_id, unnest(svs) AS sv, unnest(weights) AS weight,
                 unnest(coalesce(ranks, CAST(range(len(svs)) AS SMALLINT[]))) AS rank
          FROM edge_sv_lists WHERE run_id = $run AND $one_prompt) s ON s.prompt_id = l.prompt_id AND s.edge_id = l.edge_id
    WHERE $one_prompt
    GROUP BY ALL
)
SELECT g.source, g.target, g.side AS kind, g.side, any_value(g.up_kind) AS up_kind,
       any_value(g.up_layer) AS up_layer, any_value(g.up_head) AS up_head, any_value(g.layer) AS down_layer,
       any_value(g.head) AS down_head, any_value(g.token) AS token,
       count(DISTINCT g.prompt_id) AS count, count(*) AS n_edges,
       sum(g.weight) / $n_graphs AS mean_weight,
       coalesce(any_value(v.top_svs), {no_svs}) AS top_svs
       {effect_column}
FROM _accpp_graph g LEFT JOIN sv_lists v USING (source, target, side)
{effect_join}
GROUP BY g.source, g.target, g.side
{effect_filter}
ORDER BY g.side = 'seed' DESC, mean_weight DESC, g.source, g.target
"""


def trace_seeded(con, run: Run, options) -> TraceGraph:
    """The circuit of one prompt (options.prompt_id) or of every prompt combined, unpruned
    (options: catalog.read.trace.TraceOptions; roots and roles do not apply).

    With `effect`, the edges' mean_effect (the downstream attention drop when ablated, from
    `interventions`; seed edges have none); `min_effect` keeps the edges (and seeds) whose
    mean_effect is at least that.
    """
    if options.roots:
        raise CatalogError(f"run {run.run_id} is an {run.method_spec.label} run: its circuits are rooted at the "
                           "model's output (seeds), so --root does not apply")
    prompt_id, n_svs, kinds = options.prompt_id, options.n_svs, options.kinds
    effect, min_effect, effect_mode = options.with_effect, options.min_effect, options.effect_mode
    kinds = check_kinds(kinds)
    if prompt_id is not None and not rows(
            con, "SELECT 1 FROM prompts WHERE run_id = ? AND prompt_id = ?", [run.run_id, int(prompt_id)]):
        n = rows(con, "SELECT count(*) FROM prompts WHERE run_id = ?", [run.run_id])[0][0]
        raise NotFound(f"run {run.run_id} has no prompt {prompt_id} (prompts 0..{n - 1})")
    graph = _graph_rows(con, run, prompt_id, kinds)
    n_graphs = len(set(graph.column("prompt_id").to_pylist())) or 1
    con.register("_accpp_graph", graph)
    try:
        sql = _EDGES_SQL.format(
            top_svs=top_svs("s.sv", "s.weight", "l.weight", "s.rank", "$n_svs"), no_svs=NO_SVS,
            effect_column=f", avg({EFFECT}) AS mean_effect" if effect else "",
            effect_join=effect_join("g", "$run") if effect else "",
            effect_filter=(f"HAVING $min_effect IS NULL OR g.side = 'seed' OR avg({EFFECT}) >= $min_effect")
            if effect else "")
        edges = fetch(con, sql, {"run": run.run_id, "n_svs": int(n_svs), "n_graphs": n_graphs,
                                 "one_prompt": prompt_id is not None, "min_effect": min_effect,
                                 "effect_mode": effect_mode})
        # What the drawing leaves out of the drawn firings' stored edges, said rather than hidden.
        later, other_kind = rows(con, """
            SELECT count(*) FILTER (WHERE e.up_kind = 'head' AND e.side = 'key' AND e.up_src_pos > e.src_pos),
                   count(*) FILTER (WHERE NOT (e.up_kind = 'head' AND e.side = 'key' AND e.up_src_pos > e.src_pos)
                                    AND ?::VARCHAR[] IS NOT NULL AND NOT list_contains(?::VARCHAR[], e.up_kind))
            FROM (SELECT DISTINCT prompt_id, layer, head, dest_pos, src_pos FROM _accpp_graph WHERE side <> 'seed') f
            JOIN edges e ON e.run_id = ? AND e.prompt_id = f.prompt_id AND e.layer = f.layer AND e.head = f.head
                        AND e.dest_pos = f.dest_pos AND e.src_pos = f.src_pos""", [kinds, kinds, run.run_id])[0]
    finally:
        con.unregister("_accpp_graph")
    root = rows(con, "SELECT any_value(objective), count(*) FILTER (WHERE n_seeds = 0), count(DISTINCT objective), "
                     "string_agg(DISTINCT seeding, '/'), count(*) FILTER (WHERE n_seeds > 0) FROM roots "
                     "WHERE run_id = ? AND (? IS NULL OR prompt_id = ?)", [run.run_id, prompt_id, prompt_id])[0]
    if root[2] and root[2] > 1:   # combined: each prompt explains its own tokens, so name the objective's form
        form = {"linear": "logit(answer) - logit(wrong)"}.get(root[3], f"{root[3]} objective")
        root = (f"{form} of {root[4]} prompts",) + tuple(root[1:])
    notes = []
    if later:
        notes.append(f"{later} stored key-side edges from a head reading a token after the firing's source are "
                     "part of their firings' decompositions (edges table) but not drawn, as in the reference library")
    if other_kind:
        notes.append(f"{other_kind} edges of the drawn firings from components of other kinds left out (--kind "
                     f"{','.join(kinds)})")
    if root[1]:
        notes.append(f"{root[1]} prompt(s) have no seeds (their objective has no positive explanation), so no graph")
    headless = rows(con, "SELECT count(*) FROM roots r WHERE r.run_id = ? AND (? IS NULL OR r.prompt_id = ?) "
                         "AND r.n_seeds > 0 AND NOT EXISTS (SELECT 1 FROM seeds s WHERE s.run_id = r.run_id "
                         "AND s.prompt_id = r.prompt_id AND s.root_id = r.root_id AND s.up_kind = 'head')",
                    [run.run_id, prompt_id, prompt_id])[0][0]
    if headless:
        notes.append(f"{headless} prompt(s) have seeds but no head among them, so no graph (as in the reference "
                     "library; their seeds are in the seeds table)")
    nodes = _nodes(graph, root[0])
    firings = pa.table({c: graph.column(c) for c in ("prompt_id", "layer", "head", "dest_pos", "src_pos")})
    return TraceGraph(run.run_id, prompt_id, [root[0] or "root"], None, None, firings, nodes, edges, notes)


NODE_SCHEMA = pa.schema([("node", pa.string()), ("kind", pa.string()), ("layer", pa.int32()), ("head", pa.int32()),
                         ("role", pa.string()), ("pos", pa.string()), ("token", pa.string()),
                         ("count", pa.int64()), ("is_root", pa.bool_())])


def _nodes(graph: pa.Table, objective: str | None) -> pa.Table:
    """One row per node label, with its kind, layer, head and the prompts it appears in."""
    seen: dict[str, dict] = {}
    for edge in graph.to_pylist():
        for name, kind, layer, head in (
            (edge["source"], "firing" if edge["up_kind"] == "head" else edge["up_kind"], edge["up_layer"],
             edge["up_head"]),
            (edge["target"], "root" if edge["side"] == "seed" else "firing", edge["layer"], edge["head"]),
        ):
            node = seen.setdefault(name, {"node": name, "kind": kind, "layer": layer, "head": head,
                                          "role": None, "pos": name.partition("@")[2] or None,
                                          "token": objective if kind == "root" else None, "prompts": set(),
                                          "is_root": kind == "root"})
            node["prompts"].add(edge["prompt_id"])
    nodes = [dict({k: v for k, v in n.items() if k != "prompts"}, count=len(n["prompts"])) for n in seen.values()]
    nodes.sort(key=lambda n: (n["kind"] != "root", -(n["layer"] if n["layer"] is not None else -1), n["node"]))
    return rows_table(nodes, NODE_SCHEMA)

"""Tracing a circuit (SPEC.md, "Tracing a circuit") as one recursive SQL query.

Start from the root heads' firings whose destination token has `dest_role` and source token
`src_role`. For every key-side edge from (l', h') of a reached firing, the firings of (l', h')
whose destination is that firing's source token are reached too; for every query-side edge,
those whose destination is that firing's destination token. Firings whose source is position 0
(the attention sink) are not traced through. A firing is reached once per prompt however many
paths lead to it: the recursive CTE uses UNION on the firing key, and it terminates because every
step goes to a strictly lower layer (up_layer < layer).

The graph has head nodes "L.H" and token nodes "L.H@role" (aggregated over prompts; an edge
whose token has no role is left out, it cannot be matched across prompts) or "L.H@pos" (one
prompt, `prompt_id=N`). Its edges: "writes" from an upstream head to the downstream head's
token node (side, count, mean weight, singular directions), and "reads" from a token node to
its head.

    >>> from catalog.store import open_readonly
    >>> from catalog.read.trace import trace
    >>> graph = trace(open_readonly("ioi.duckdb"))           # 9.6, 9.9, 10.0 from end to IO
    >>> graph.edges.column_names                              # doctest: +SKIP
    ['source', 'target', 'kind', 'side', 'count', 'n_edges', 'mean_weight', 'top_svs']
    >>> trace(open_readonly("ioi.duckdb"), roots=["9.9"], prompt_id=0).nodes.num_rows   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from catalog.errors import CatalogError
from catalog.heads import parse_head
from catalog.read.query import HEAD_TABLES, Run, check_role, fetch, head_name, resolve_run, rows, run_info

# The IOI name movers (Wang et al. 2022), traced from `end` to `IO` unless told otherwise.
DEFAULT_ROOTS = ("9.6", "9.9", "10.0")
DEFAULT_DEST_ROLE, DEFAULT_SRC_ROLE = "end", "IO"


@dataclass
class TraceGraph:
    """A traced circuit: the reached firings, and the graph built from their edges."""

    run_id: int
    prompt_id: int | None           # None: aggregated over every prompt of the run, by token role
    roots: list[str]                # "L.H" of the root heads actually traced
    dest_role: str | None
    src_role: str | None
    firings: pa.Table               # prompt_id, layer, head, dest_pos, src_pos of every reached firing
    nodes: pa.Table                 # node, kind ('head' | 'token'), layer, head, role, pos, token, is_root
    edges: pa.Table                 # source, target, kind ('writes' | 'reads'), side, count, n_edges, mean_weight, top_svs
    notes: list[str] = field(default_factory=list)   # skipped default roots, roots that never fire, pruning
    run: dict = field(default_factory=dict)           # the run read (catalog.read.query.run_info)

    def document(self, rows_of=None) -> dict:
        """The graph as one JSON-ready object: run, scope, notes, nodes and edges (lists of rows).

        `rows_of` turns an Arrow table into row dicts (default: Table.to_pylist)."""
        rows_of = rows_of or (lambda table: table.to_pylist())
        return {"run_id": self.run_id, "run": self.run, "prompt_id": self.prompt_id, "roots": self.roots,
                "dest_role": self.dest_role, "src_role": self.src_role, "notes": self.notes,
                "n_firings": self.firings.num_rows, "nodes": rows_of(self.nodes), "edges": rows_of(self.edges)}

    def summary(self) -> str:
        """One line: what was traced and drawn."""
        kinds = self.edges.column("kind").to_pylist() if self.edges.num_rows else []
        tokens = self.edges.column("token").to_pylist() if "token" in self.edges.column_names else []
        unnamed = sum(1 for k, t in zip(kinds, tokens) if k == "writes" and t and t.startswith("pos")
                      and self.prompt_id is None)
        firings = {f for f in zip(*(self.firings.column(c).to_pylist() for c in self.firings.column_names))
                   if f[1] is not None}
        return (f"{len(firings)} firings reached: {self.nodes.num_rows} nodes, {self.edges.num_rows} edges"
                + (f" ({unnamed} of them at tokens without a role, as posN nodes)" if unnamed else "")
                + ("; " + "; ".join(n for n in self.notes if n.startswith("pruned")) if any(
                    n.startswith("pruned") for n in self.notes) else ""))


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
               CASE WHEN e.side = 'key' THEN r.src_pos ELSE r.dest_pos END AS token_pos
        FROM reached r
        JOIN edges e ON e.run_id = $run AND e.prompt_id = r.prompt_id AND e.layer = r.layer
                    AND e.head = r.head AND e.dest_pos = r.dest_pos AND e.src_pos = r.src_pos
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
    return fetch(con, _REACHED_SQL.format(is_root=is_root), params)


# Edges of the reached firings, grouped by (upstream head, downstream head, token, side).
# {token} is token_pos for one prompt, token_role over all prompts (where role-less tokens drop out).
_EDGES_SQL = """
WITH traced AS (
    SELECT e.prompt_id, e.layer, e.head, e.dest_pos, e.src_pos, e.side, e.up_layer, e.up_head, e.weight,
           {token} AS token, {effect} AS effect
    FROM {reached} r
    JOIN edges e ON e.run_id = $run AND e.prompt_id = r.prompt_id AND e.layer = r.layer AND e.head = r.head
                AND e.dest_pos = r.dest_pos AND e.src_pos = r.src_pos
    JOIN tokens t ON t.run_id = $run AND t.prompt_id = e.prompt_id
                 AND t.pos = CASE WHEN e.side = 'query' THEN e.dest_pos ELSE e.src_pos END
),
grouped AS (
    SELECT up_layer, up_head, layer, head, token, side, count(DISTINCT prompt_id) AS n_prompts,
           count(*) AS n_edges, avg(weight) AS mean_weight, avg(effect) AS mean_effect
    FROM traced GROUP BY up_layer, up_head, layer, head, token, side
    HAVING $min_effect IS NULL OR avg(effect) >= $min_effect  -- only edges measured to matter
),
by_sv AS (
    -- Joined from the reached firings, not from `traced`: DuckDB would otherwise pre-aggregate
    -- all of edge_svs before the join (seconds on a large catalog).
    SELECT e.up_layer, e.up_head, e.layer, e.head, {token} AS token, e.side, s.sv, sum(s.weight) AS sv_weight
    FROM {reached} r
    JOIN edges e ON e.run_id = $run AND e.prompt_id = r.prompt_id AND e.layer = r.layer AND e.head = r.head
                AND e.dest_pos = r.dest_pos AND e.src_pos = r.src_pos
    JOIN edge_svs s ON s.run_id = $run AND s.prompt_id = e.prompt_id AND s.edge_id = e.edge_id
    JOIN tokens t ON t.run_id = $run AND t.prompt_id = e.prompt_id
                 AND t.pos = CASE WHEN e.side = 'query' THEN e.dest_pos ELSE e.src_pos END
    GROUP BY ALL
),
sv_lists AS (
    SELECT up_layer, up_head, layer, head, token, side,
           list({{'sv': CAST(sv AS INTEGER), 'share': CAST(sv_weight / nullif(total, 0) AS FLOAT)}}
                ORDER BY sv_weight DESC)[1:$n_svs] AS top_svs
    FROM (SELECT b.*, sum(sv_weight) OVER (PARTITION BY up_layer, up_head, layer, head, token, side) AS total
          FROM by_sv b)
    GROUP BY ALL
),
writes AS (
    SELECT 'L' || g.up_layer || 'H' || g.up_head AS source, 'L' || g.layer || 'H' || g.head || '@' || g.token AS target,
           'writes' AS kind, g.side, 'head' AS up_kind, g.up_layer, g.up_head, g.layer AS down_layer,
           g.head AS down_head, CAST(g.token AS VARCHAR) AS token, {count} AS count, g.n_edges, g.mean_weight,
           coalesce(l.top_svs, []::STRUCT(sv INTEGER, share FLOAT)[]) AS top_svs, g.layer AS sort_layer,
           g.head AS sort_head, g.token AS sort_token, g.mean_effect
    FROM grouped g LEFT JOIN sv_lists l USING (up_layer, up_head, layer, head, token, side)
),
reads AS (
    SELECT 'L' || layer || 'H' || head || '@' || token AS source, 'L' || layer || 'H' || head AS target,
           'reads' AS kind, string_agg(DISTINCT side, '+' ORDER BY side) AS side,
           NULL::VARCHAR AS up_kind, NULL::SMALLINT AS up_layer, NULL::SMALLINT AS up_head, layer AS down_layer,
           head AS down_head, CAST(token AS VARCHAR) AS token,
           {reads_count} AS count, count(*) AS n_edges, NULL::DOUBLE AS mean_weight,
           []::STRUCT(sv INTEGER, share FLOAT)[] AS top_svs, layer AS sort_layer, head AS sort_head,
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


# An edge's measured effect: the downstream attention drop when it is ablated (`intervene`).
_EFFECT = ("(SELECT iv.attn_before - iv.attn_after FROM interventions iv WHERE iv.run_id = $run "
           "AND iv.prompt_id = e.prompt_id AND iv.edge_id = e.edge_id AND iv.mode = $effect_mode AND NOT iv.boost)")


def _traced_edges(con, run: Run, reached: pa.Table, prompt_id: int | None, n_svs: int, effect: bool = False,
                  min_effect: float | None = None, effect_mode: str = "local") -> pa.Table:
    view = "_circuit_catalog_reached"
    con.register(view, reached)  # a connection-local view of an Arrow table: fine on a read-only file
    try:
        one_prompt = prompt_id is not None
        sql = _EDGES_SQL.format(
            reached=view,
            # Over all prompts a token is its role, or "posN" for a token without one (never dropped).
            token="t.pos" if one_prompt else "coalesce(t.role, 'pos' || t.pos)",
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
            elif token.startswith("pos") and token[3:].isdigit():  # a token without a role, by position
                row["pos"] = int(token[3:])
            else:
                row["role"] = token

    for layer, head in roots:
        add(head_name(layer, head), "head", layer, head)
    for e in edges.to_pylist():
        down = head_name(e["down_layer"], e["down_head"])
        add(down, "head", e["down_layer"], e["down_head"])
        add(f"{down}@{e['token']}", "token", e["down_layer"], e["down_head"], e["token"])
        if e["kind"] == "writes":
            add(e["source"], "head", e["up_layer"], e["up_head"])
    # Only the nodes the edges name (a head with no token node is a root or an upstream head).
    names = {n for e in edges.to_pylist() for n in (e["source"], e["target"])} | {
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
    return pa.Table.from_pylist(nodes, schema=schema)


def trace(con, roots: list[str] | None = None, dest_role: str | None = DEFAULT_DEST_ROLE,
          src_role: str | None = DEFAULT_SRC_ROLE, prompt_id: int | None = None,
          run_id: int | None = None, n_svs: int = 3, kinds=None, effect: bool = False,
          min_effect: float | None = None, effect_mode: str = "local", min_count: int | None = None,
          min_weight: float | None = None, max_depth: int | None = None, top_k: int | None = None) -> TraceGraph:
    """Trace the circuit behind `roots` (default: 9.6, 9.9, 10.0 from `end` to `IO`).

    For an ACC++ run, the stored circuit rooted at the output instead (catalog.read.trace_accpp;
    roots and roles do not apply; `kinds` keeps components of these kinds).

    `dest_role`/`src_role` None means any token. `prompt_id` traces one prompt (nodes keep
    positions); None aggregates over every prompt of the run by token role.

    `effect` (implied by `min_effect`) adds mean_effect to the edges: the mean drop of the
    downstream attention when the edges are ablated (`interventions`, mode `effect_mode`);
    `min_effect` keeps the edges whose mean_effect is at least that.

    Pruning for large traces (see `prune`): `min_count` (edges in fewer prompts, or firings for
    one prompt, go), `min_weight` (|mean_weight| below it goes), `top_k` (the k strongest
    upstream edges of each token node / firing), `max_depth` (upstream steps from the roots). A note
    says how many edges each left out.
    """
    from catalog.read.query import check_effect_mode

    run = resolve_run(con, run_id, HEAD_TABLES)
    effect = effect or min_effect is not None
    if effect:
        check_effect_mode(con, effect_mode)
    if run.method == "accpp":  # its circuits are stored rooted at the output: no roots to choose
        from catalog.read.trace_accpp import accpp_trace

        if roots:
            raise CatalogError(f"run {run.run_id} is an ACC++ run: its circuits are rooted at the model's output "
                               "(seeds), so --root does not apply")
        graph = accpp_trace(con, run, prompt_id, n_svs, kinds, effect, min_effect, effect_mode)
        graph.run = run_info(con, run)
        return prune(graph, min_count, min_weight, max_depth, top_k)
    root_heads, notes = resolve_roots(run, roots)
    check_role(con, run, dest_role)
    check_role(con, run, src_role)
    if prompt_id is not None and not rows(
            con, "SELECT 1 FROM prompts WHERE run_id = ? AND prompt_id = ?", [run.run_id, int(prompt_id)]):
        n = rows(con, "SELECT count(*) FROM prompts WHERE run_id = ?", [run.run_id])[0][0]
        raise CatalogError(f"run {run.run_id} has no prompt {prompt_id} (prompts 0..{n - 1})")
    reached = reached_firings(con, run, root_heads, dest_role, src_role, prompt_id)
    root_names = [head_name(l, h) for l, h in root_heads]
    fired = set(zip(reached.column("layer").to_pylist(), reached.column("head").to_pylist()))
    roles = f"from {dest_role or 'any token'} to {src_role or 'any token'}"
    notes += _root_notes(con, run, reached, root_heads, dest_role, src_role, prompt_id, roles)
    edges = _traced_edges(con, run, reached, prompt_id, n_svs, effect, min_effect, effect_mode)
    if min_effect is not None:   # say how many edges the effect filter left out
        every = _traced_edges(con, run, reached, prompt_id, n_svs, effect, None, effect_mode)
        n_all, n_kept = (sum(1 for k in t.column("kind").to_pylist() if k == "writes") for t in (every, edges))
        if n_kept < n_all:
            notes.append(f"{n_all - n_kept} of {n_all} edges left out: their mean effect is below --min-effect "
                         f"{min_effect:g} (or not measured)")
    nodes = _nodes(con, run, edges, [lh for lh in root_heads if lh in fired], prompt_id)
    graph = TraceGraph(run.run_id, prompt_id, root_names, dest_role, src_role, reached, nodes, edges, notes,
                       run_info(con, run))
    return prune(graph, min_count, min_weight, max_depth, top_k)


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


def prune(graph: TraceGraph, min_count: int | None = None, min_weight: float | None = None,
          max_depth: int | None = None, top_k: int | None = None) -> TraceGraph:
    """The graph without its weak or far edges, and without what no longer leads to a root.

    Edges that carry weight ("writes"; ACC++: "query", "key", "seed") are dropped when their count
    is below `min_count` or |mean_weight| below `min_weight`; then each node written to (a token
    node; ACC++: a firing or the root) keeps its `top_k` strongest upstream edges (most prompts,
    then largest |mean_weight|); then only what is at most `max_depth` upstream steps from a root stays (a token
    node's "reads" edge to its head is no step). Nodes and "reads" edges that no longer lead to a
    root go too. Nothing changes when every option is None; otherwise a note counts what went.
    """
    if all(v is None for v in (min_count, min_weight, max_depth, top_k)):
        return graph
    for name, value in (("min_count", min_count), ("max_depth", max_depth), ("top_k", top_k)):
        if value is not None and value < (0 if name == "max_depth" else 1):
            raise CatalogError(f"{name} must be at least {0 if name == 'max_depth' else 1}, not {value}")
    edges = graph.edges.to_pylist()
    weighted = [e for e in edges if e["kind"] != "reads"]
    left_out = {}

    def drop(reason, keep):
        nonlocal weighted
        kept = [e for e in weighted if keep(e)]
        if len(kept) < len(weighted):
            left_out[reason] = len(weighted) - len(kept)
        weighted = kept

    if min_count is not None:
        drop(f"count below --min-count {min_count}", lambda e: (e["count"] or 0) >= min_count)
    if min_weight is not None:
        drop(f"|mean weight| below --min-weight {min_weight:g}", lambda e: abs(e["mean_weight"] or 0) >= min_weight)
    if top_k is not None:
        def owner(e):  # the node written to: a token node (2024 method), a firing or the root (ACC++)
            return e["target"]
        ranked = sorted(weighted, key=lambda e: (-(e["count"] or 0), -abs(e["mean_weight"] or 0), e["source"]))
        seen: dict = {}
        keep_ids = set()
        for e in ranked:
            if seen.get(owner(e), 0) < top_k:
                seen[owner(e)] = seen.get(owner(e), 0) + 1
                keep_ids.add(id(e))
        drop(f"beyond the --top-k {top_k} of their node", lambda e: id(e) in keep_ids)
    candidates = weighted + [e for e in edges if e["kind"] == "reads"]
    into: dict[str, list[dict]] = {}
    for e in candidates:
        into.setdefault(e["target"], []).append(e)
    roots = [n["node"] for n in graph.nodes.to_pylist() if n["is_root"]]
    depth = {r: 0 for r in roots}
    frontier, kept_ids = list(roots), set()
    while frontier:  # breadth first, upstream; a "reads" edge costs no step
        frontier.sort(key=lambda n: depth[n])
        node = frontier.pop(0)
        for e in into.get(node, []):
            step = depth[node] + (0 if e["kind"] == "reads" else 1)
            if max_depth is not None and step > max_depth:
                continue
            kept_ids.add(id(e))
            if e["source"] not in depth or step < depth[e["source"]]:
                depth[e["source"]] = step
                frontier.append(e["source"])
    # A token node that nothing writes to any more is no part of the circuit.
    written = {e["target"] for e in candidates if id(e) in kept_ids and e["kind"] != "reads"}
    kept = [e for e in edges if id(e) in kept_ids and (e["kind"] != "reads" or e["source"] in written)]
    far = len([e for e in weighted if id(e) not in kept_ids])
    if far:
        left_out[f"more than --max-depth {max_depth} steps from a root" if max_depth is not None
                 else "no longer leading to a root"] = far
    names = {n for e in kept for n in (e["source"], e["target"])} | set(roots)
    nodes = graph.nodes.filter(pa.array([n in names for n in graph.nodes.column("node").to_pylist()], pa.bool_()))
    n_weighted = sum(1 for e in edges if e["kind"] != "reads")
    n_kept = sum(1 for e in kept if e["kind"] != "reads")
    detail = ", ".join(f"{n} {reason}" for reason, n in left_out.items()) or "none"
    note = f"pruned: kept {n_kept} of {n_weighted} weighted edges (left out: {detail})"
    edges_table = pa.Table.from_pylist(kept, schema=graph.edges.schema)
    return TraceGraph(graph.run_id, graph.prompt_id, graph.roots, graph.dest_role, graph.src_role, graph.firings,
                      nodes, edges_table, graph.notes + [note], graph.run)

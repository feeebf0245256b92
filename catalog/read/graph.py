"""A traced circuit as a graph (`TraceGraph`), whichever tracer built it, and its pruning.

Both tracers (catalog.read.trace_heads, catalog.read.trace_seeded) build a TraceGraph; the
formats (catalog.formats.graph) draw it. Nothing here reads the catalog.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from catalog.errors import CatalogError
from catalog.read.fragments import NO_ROLE


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
        unnamed = sum(1 for k, t in zip(kinds, tokens) if k == "writes" and t == NO_ROLE
                      and self.prompt_id is None)
        firings = {f for f in zip(*(self.firings.column(c).to_pylist() for c in self.firings.column_names))
                   if f[1] is not None}
        return (f"{len(firings)} firings reached: {self.nodes.num_rows} nodes, {self.edges.num_rows} edges"
                + (f" ({unnamed} of them at tokens without a role, grouped as '{NO_ROLE}' across prompts)" if unnamed else "")
                + ("; " + "; ".join(n for n in self.notes if n.startswith("pruned")) if any(
                    n.startswith("pruned") for n in self.notes) else ""))


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
    # Without top_svs (slow to turn into Python, not needed to choose); rows in the table's order.
    edges = graph.edges.select([c for c in graph.edges.column_names if c != "top_svs"]).to_pylist()
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
    kept_rows = {id(e) for e in kept}
    edges_table = graph.edges.filter(pa.array([id(e) in kept_rows for e in edges], pa.bool_()))
    return TraceGraph(graph.run_id, graph.prompt_id, graph.roots, graph.dest_role, graph.src_role, graph.firings,
                      nodes, edges_table, graph.notes + [note], graph.run)


# A picture with more weighted edges than this is unreadable (and slow: 8,099 edges took minutes
# to draw): trace's PNG and HTML and the explorer's graph are pruned to at most this many.
PICTURE_EDGES = 300
AUTO_TOP_K = (3, 2, 1)


def weighted_edges(graph: TraceGraph) -> int:
    """How many of the graph's edges carry weight (all but a token node's "reads" edge to its head)."""
    return sum(1 for k in graph.edges.column("kind").to_pylist() if k != "reads") if graph.edges.num_rows else 0


def prune_for_picture(graph: TraceGraph, max_edges: int | None = None) -> TraceGraph:
    """The graph as a picture draws it: unchanged with at most `max_edges` weighted edges (default
    PICTURE_EDGES), else pruned by the first rule of this list that leaves at most that many: each
    node written to keeps its 3, 2 or 1 strongest upstream edges (`prune`'s top_k: most prompts,
    then largest |mean weight|); then 1 each, at most D steps from a root, for D from the deepest
    kept down to 0. A note says what was left out (edges and nodes, and by which rule) and how to
    draw otherwise. The data formats (json, graphml, dot, the tables) are never pruned this way."""
    limit = PICTURE_EDGES if max_edges is None else max_edges
    n_edges = weighted_edges(graph)
    if n_edges <= limit:
        return graph
    pruned, rule = None, None
    for top_k in AUTO_TOP_K:
        pruned, rule = prune(graph, top_k=top_k), {"top_k": top_k}
        if weighted_edges(pruned) <= limit:
            break
    else:
        for depth in range(_depth(pruned), -1, -1):
            pruned, rule = prune(graph, top_k=1, max_depth=depth), {"top_k": 1, "max_depth": depth}
            if weighted_edges(pruned) <= limit:
                break
    how = f"each node written to keeps its {rule['top_k']} strongest upstream edges (most prompts, then |mean weight|)"
    if "max_depth" in rule:
        how += f", at most {rule['max_depth']} steps from a root"
    options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in rule.items())
    note = (f"picture pruned automatically (over {limit} weighted edges): drawn {weighted_edges(pruned)} of "
            f"{n_edges} weighted edges and {pruned.nodes.num_rows} of {graph.nodes.num_rows} nodes; left out "
            f"{n_edges - weighted_edges(pruned)} edges and {graph.nodes.num_rows - pruned.nodes.num_rows} nodes "
            f"by the rule: {how} (as {options}); --format json, graphml or dot keep every edge")
    return TraceGraph(graph.run_id, graph.prompt_id, graph.roots, graph.dest_role, graph.src_role, graph.firings,
                      pruned.nodes, pruned.edges, graph.notes + [note], graph.run)


def _depth(graph: TraceGraph) -> int:
    """The most upstream steps from a root to any node of the graph (a "reads" edge is no step)."""
    into: dict[str, list[dict]] = {}
    for e in graph.edges.select(["source", "target", "kind"]).to_pylist():
        into.setdefault(e["target"], []).append(e)
    depth = {n["node"]: 0 for n in graph.nodes.to_pylist() if n["is_root"]}
    frontier = list(depth)
    while frontier:
        node = frontier.pop()
        for e in into.get(node, []):
            step = depth[node] + (0 if e["kind"] == "reads" else 1)
            if e["source"] not in depth or step < depth[e["source"]]:
                depth[e["source"]] = step
                frontier.append(e["source"])
    return max(depth.values(), default=0)

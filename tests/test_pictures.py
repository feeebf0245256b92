"""Pictures that do not mislead (issue 10, point 4): the scene both drawings (PNG and HTML) are
made from, checked on small hand-made circuits where a careless drawing goes wrong, and on a
traced one; and the pruning options of `trace`."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
from _catalog_fixture import busiest_heads, invoke

from catalog.formats.graph import ROW_HEIGHT, render_graph, scene
from catalog.store import open_readonly
from catalog.read.trace import TraceGraph, trace

NODE_COLUMNS = ["node", "kind", "layer", "head", "role", "pos", "token", "is_root"]


def _edge(source, target, kind, side, up=(None, None), down=(None, None), token=None, count=3, weight=1.0):
    up_kind = None if kind == "reads" else ("head" if source.startswith("L") else source.split(" ")[0].split("@")[0])
    return {"source": source, "target": target, "kind": kind, "side": side, "up_kind": up_kind, "up_layer": up[0],
            "up_head": up[1], "down_layer": down[0], "down_head": down[1], "token": token, "count": count,
            "n_edges": count, "mean_weight": None if kind == "reads" else weight,
            "top_svs": [] if kind == "reads" else [{"sv": 3, "share": 0.7}, {"sv": 1, "share": 0.4}]}


def _graph(nodes, edges, roots) -> TraceGraph:
    firings = pa.table({c: pa.array([], pa.int32()) for c in ("prompt_id", "layer", "head", "dest_pos", "src_pos")})
    return TraceGraph(1, None, roots, None, None, firings, pa.Table.from_pylist(nodes),
                      pa.Table.from_pylist(edges), [], {"run_id": 1})


def sad_graph() -> TraceGraph:
    """L2H1 writes to L9H9's end token on both sides, and to L7H3, which sits right in between."""
    def head(layer, index, root=False):
        return {"node": f"L{layer}H{index}", "kind": "head", "layer": layer, "head": index, "role": None, "pos": None,
                "token": None, "is_root": root}

    def tok(layer, index, role):
        return {"node": f"L{layer}H{index}@{role}", "kind": "token", "layer": layer, "head": index, "role": role,
                "pos": None, "token": None, "is_root": False}

    nodes = [head(9, 9, True), tok(9, 9, "end"), head(7, 3), tok(7, 3, "S2"), head(2, 1)]
    edges = [
        _edge("L2H1", "L9H9@end", "writes", "query", (2, 1), (9, 9), "end"),
        _edge("L2H1", "L9H9@end", "writes", "key", (2, 1), (9, 9), "end"),
        _edge("L7H3", "L9H9@end", "writes", "query", (7, 3), (9, 9), "end", weight=3.0),
        _edge("L2H1", "L7H3@S2", "writes", "key", (2, 1), (7, 3), "S2"),
        _edge("L9H9@end", "L9H9", "reads", "key+query", down=(9, 9), token="end"),
        _edge("L7H3@S2", "L7H3", "reads", "key", down=(7, 3), token="S2"),
    ]
    return _graph(nodes, edges, ["L9H9"])


def accpp_graph() -> TraceGraph:
    """One prompt's ACC++ circuit with a long seed edge from the embedding past the firings."""
    def node(name, kind, layer=None, head=None, root=False):
        return {"node": name, "kind": kind, "layer": layer, "head": head, "role": None,
                "pos": name.partition("@")[2] or None, "token": "logit(' Mary') - logit(' John')" if root else None,
                "count": 1, "is_root": root}

    nodes = [node("root", "root", root=True), node("L1H0@3>1", "firing", 1, 0), node("L0H2@3>0", "firing", 0, 2),
             node("MLP 0@3", "mlp", 0), node("offset@3", "offset"), node("embed@3", "embed")]
    edges = [
        _edge("L1H0@3>1", "root", "seed", "seed", (1, 0), token="3"),
        _edge("embed@3", "root", "seed", "seed", token="3"),
        _edge("MLP 0@3", "L1H0@3>1", "query", "query", (0, None), (1, 0), "3"),
        _edge("offset@3", "L1H0@3>1", "query", "query", down=(1, 0), token="3"),
        _edge("offset@3", "L1H0@3>1", "key", "key", down=(1, 0), token="3"),
        _edge("L0H2@3>0", "L1H0@3>1", "query", "query", (0, 2), (1, 0), "3"),
        _edge("embed@3", "L0H2@3>0", "query", "query", down=(0, 2), token="3"),
    ]
    return _graph(nodes, edges, ["logit(' Mary') - logit(' John')"])


def passes_through(sc) -> list[tuple[str, str, str]]:
    """(source, target, node) for every edge drawn through a node other than its two ends."""
    found = []
    for p in sc.edges:
        for s in sc.nodes:
            if s.name not in (p.edge["source"], p.edge["target"]) and any(s.contains(x, y, pad=1) for x, y in p.points):
                found.append((p.edge["source"], p.edge["target"], s.name))
    return found


def apart(a, b) -> float:
    """The closest two drawn edges come to each other away from their shared ends."""
    inner = lambda pts: pts[len(pts) // 5: len(pts) - len(pts) // 5] or pts
    return min(math.hypot(x1 - x2, y1 - y2) for x1, y1 in inner(a) for x2, y2 in inner(b))


@pytest.mark.parametrize("make", [sad_graph, accpp_graph])
def test_no_edge_runs_through_another_node_and_parallel_edges_stay_apart(make):
    sc = scene(make())
    assert len(sc.edges) == make().edges.num_rows
    assert passes_through(sc) == []
    pairs = {}
    for p in sc.edges:
        pairs.setdefault(frozenset((p.edge["source"], p.edge["target"])), []).append(p)
    parallel = [group for group in pairs.values() if len(group) > 1]
    assert parallel   # the query and key edge between the same two nodes
    for first, second in parallel:
        assert {first.side, second.side} == {"query", "key"} and apart(first.points, second.points) > 4


def test_rows_are_the_layers_present_and_token_nodes_name_their_head():
    sc = scene(sad_graph())
    assert [label for _, label in sc.axis] == ["layer 9", "layer 7", "layer 2"]   # no rows for layers 3..6, 8
    ys = [y for y, _ in sc.axis]
    assert [b - a for a, b in zip(ys, ys[1:])] == [ROW_HEIGHT, ROW_HEIGHT]
    shapes = {s.name: s for s in sc.nodes}
    assert shapes["L9H9@end"].lines == ["L9H9", "end"] and shapes["L7H3@S2"].lines == ["L7H3", "S2"]
    assert shapes["L9H9@end"].y > shapes["L9H9"].y   # just below its head
    acc = {s.name: s for s in scene(accpp_graph()).nodes}
    assert acc["L1H0@3>1"].lines == ["L1H0", "3>1"] and acc["MLP 0@3"].lines == ["MLP 0", "3"]
    assert [label for _, label in scene(accpp_graph()).axis] == ["output", "layer 1", "MLP, b_O 0", "layer 0",
                                                                 "embed, offset"]


@pytest.mark.parametrize("make", [sad_graph, accpp_graph])
def test_html_and_png_draw_the_same_scene(make, tmp_path):
    graph = make()
    sc = scene(graph)
    page = render_graph(graph, "html")
    assert page.count('<g class="edge"') == len(sc.edges) and page.count('<g class="node"') == len(sc.nodes)
    for _, label in sc.axis:   # the layer axis, as in the PNG
        assert f">{label}</text>" in page
    for s in sc.nodes:
        for line in s.lines:
            assert f">{line.replace('>', '&gt;').replace(chr(39), '&#x27;')}</text>" in page
    render_graph(graph, "png", tmp_path / "c.png")
    from PIL import Image

    with Image.open(tmp_path / "c.png") as image:
        assert image.size == (round(sc.width), round(sc.height + 30))


def test_a_traced_circuit_draws_clean(catalog_db):
    con = open_readonly(catalog_db)
    root = busiest_heads(catalog_db, min_layer=2)[0]
    graph = trace(con, roots=[root], dest_role=None, src_role=None)
    assert passes_through(scene(graph)) == []
    tokens = [s for s in scene(graph).nodes if "@" in s.name]
    assert tokens and all(s.lines[0] == s.name.split("@")[0] for s in tokens)


def test_pruning_options(catalog_db):
    con = open_readonly(catalog_db)
    root = busiest_heads(catalog_db, min_layer=2)[0]
    full = trace(con, roots=[root], dest_role=None, src_role=None)
    weighted = lambda g: [e for e in g.edges.to_pylist() if e["kind"] != "reads"]

    top = trace(con, roots=[root], dest_role=None, src_role=None, top_k=2)
    into = {}
    for e in weighted(top):
        into[e["target"]] = into.get(e["target"], 0) + 1
    assert into and max(into.values()) <= 2 and len(weighted(top)) < len(weighted(full))
    assert top.notes[-1].startswith(f"pruned: kept {len(weighted(top))} of {len(weighted(full))} weighted edges")

    counts = sorted({e["count"] for e in weighted(full)})
    threshold = counts[len(counts) // 2]
    by_count = trace(con, roots=[root], dest_role=None, src_role=None, min_count=threshold)
    assert weighted(by_count) and all(e["count"] >= threshold for e in weighted(by_count))

    weights = sorted(abs(e["mean_weight"]) for e in weighted(full))
    by_weight = trace(con, roots=[root], dest_role=None, src_role=None, min_weight=weights[len(weights) // 2])
    assert all(abs(e["mean_weight"]) >= weights[len(weights) // 2] for e in weighted(by_weight))

    shallow = trace(con, roots=[root], dest_role=None, src_role=None, max_depth=1)
    root_name = "L{}H{}".format(*root.split("."))
    assert {(e["down_layer"], e["down_head"]) for e in weighted(shallow)} == {tuple(int(x) for x in root.split("."))}
    assert {n for n in shallow.nodes.column("node").to_pylist()} == (
        {root_name} | {e["source"] for e in weighted(shallow)} | {e["target"] for e in weighted(shallow)})

    for pruned in (top, by_count, by_weight, shallow):   # everything left still leads to a root
        sources = {e["source"]: e["target"] for e in pruned.edges.to_pylist()}
        for node in pruned.nodes.column("node").to_pylist():
            seen = set()
            while node in sources and node not in seen:
                seen.add(node)
                node = sources[node]
            assert node == root_name

    result = invoke("trace", "--db", catalog_db, "--root", root, "--dest-role", "any", "--src-role", "any",
                    "--top-k", "2", "--format", "csv")
    assert result.exit_code == 0 and "pruned: kept" in result.stderr and "--top-k 2" in result.stderr
    assert invoke("trace", "--db", catalog_db, "--root", root, "--top-k", "0").exit_code == 1


def test_the_out_file_extension_picks_the_format_unless_format_is_given(catalog_db, tmp_path):
    root = busiest_heads(catalog_db, 1)[0]
    args = ("trace", "--db", catalog_db, "--root", root, "--dest-role", "any", "--src-role", "any")
    png, html, txt = tmp_path / "c.png", tmp_path / "c.HTML", tmp_path / "c.txt"
    result = invoke(*args, "--out", png)
    assert result.exit_code == 0 and "--format png, from the extension" in result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert invoke(*args, "--out", html).exit_code == 0 and "<html" in html.read_text().lower()
    assert invoke(*args, "--out", txt).exit_code == 0 and txt.read_text().startswith("source")  # the table
    assert invoke(*args, "--format", "csv", "--out", png).exit_code == 0  # an explicit format wins
    assert png.read_text().startswith("source,")


def test_a_large_picture_is_pruned_automatically_with_a_note(catalog_db, tmp_path, monkeypatch):
    """Over the picture limit, the drawing keeps each node's strongest upstream edges, by the
    loosest rule of (top-k 3, 2, 1, then fewer steps) that fits, and a note counts what went."""
    from catalog.read import graph as graph_module
    from catalog.read.graph import prune, prune_for_picture

    con = open_readonly(catalog_db)
    root = busiest_heads(catalog_db, min_layer=2)[0]
    full = trace(con, roots=[root], dest_role=None, src_role=None)
    weighted = lambda g: [e for e in g.edges.to_pylist() if e["kind"] != "reads"]  # noqa: E731
    n_full = len(weighted(full))
    assert prune_for_picture(full, max_edges=n_full) is full  # within the limit: nothing changes

    by_k = {k: len(weighted(prune(full, top_k=k))) for k in (3, 2, 1)}
    limit = by_k[2]  # top-k 2 fits, 3 does not (on this catalog)
    assert by_k[3] > limit
    drawn = prune_for_picture(full, max_edges=limit)
    assert len(weighted(drawn)) <= limit
    same = prune(full, top_k=2)
    assert drawn.edges.to_pylist() == same.edges.to_pylist() and drawn.nodes.equals(same.nodes)
    note = drawn.notes[-1]
    assert note.startswith(f"picture pruned automatically (over {limit} weighted edges): drawn {len(weighted(drawn))} "
                           f"of {n_full} weighted edges and {drawn.nodes.num_rows} of {full.nodes.num_rows} nodes")
    assert f"left out {n_full - len(weighted(drawn))} edges and {full.nodes.num_rows - drawn.nodes.num_rows} nodes" in note
    assert "(as --top-k 2)" in note

    tight = prune_for_picture(full, max_edges=max(1, by_k[1] // 2))  # top-k 1 is too many: fewer steps too
    assert len(weighted(tight)) <= max(1, by_k[1] // 2) and "--top-k 1 --max-depth" in tight.notes[-1]

    # The CLI's pictures: pruned by default (here with a limit the catalog exceeds), not with --all-edges
    monkeypatch.setattr(graph_module, "PICTURE_EDGES", limit)
    args = ("trace", "--db", catalog_db, "--root", root, "--dest-role", "any", "--src-role", "any", "--format", "html")
    result = invoke(*args, "--out", tmp_path / "c.html")
    assert result.exit_code == 0 and "picture pruned automatically" in result.stderr
    assert "picture pruned automatically" in (tmp_path / "c.html").read_text()
    assert f"{drawn.nodes.num_rows} nodes, {drawn.edges.num_rows} edges" in result.stderr  # the summary: what is drawn
    everything = invoke(*args, "--all-edges", "--out", tmp_path / "all.html")
    assert everything.exit_code == 0 and "picture pruned" not in everything.stderr
    assert f"{full.nodes.num_rows} nodes, {full.edges.num_rows} edges" in everything.stderr
    data = invoke(*args[:-1], "json")  # the data formats keep every edge
    assert data.exit_code == 0 and "picture pruned" not in data.stderr

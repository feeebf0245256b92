"""Tracing: the recursive SQL checked against a plain Python recursion over the stored rows, and the
graph formats (GraphML round trip, DOT, self-contained HTML, PNG)."""

from __future__ import annotations

import json
from collections import defaultdict

import networkx as nx
import pytest
from _catalog_fixture import (
    LATEST_RUN,
    assert_one_line_error,
    busiest_heads,
    fetch_dicts,
    invoke,
    token_roles,
)

from catalog.errors import CatalogError
from catalog.formats.table import render
from catalog.read.query import Run
from catalog.store import open_readonly
from catalog.read.trace import resolve_roots, trace

EDGE_KEY = ("prompt_id", "edge_id")


def hn(text: str) -> str:
    """ "2.1" -> "L2H1", the display name of a head in every result."""
    layer, head = text.split(".")
    return f"L{layer}H{head}"


def parse_svs(items: list[dict]) -> list[tuple[int, float]]:
    """[{"sv": 3, "share": 0.45}, ...] -> [(3, 0.45), ...]."""
    return [(item["sv"], item["share"]) for item in items]


def python_trace(db, roots, dest_role, src_role, prompt_id=None, run_id=LATEST_RUN):
    """SPEC.md "Tracing a circuit", written as a plain recursion: the set of reached firings."""
    roles = token_roles(db, run_id)
    firings = [(f["prompt_id"], f["layer"], f["head"], f["dest_pos"], f["src_pos"])
               for f in fetch_dicts(db, "SELECT * FROM firings WHERE run_id = ?", [run_id])]
    sources_at = defaultdict(list)  # (prompt, layer, head, dest_pos) -> source positions
    for p, l, h, d, s in firings:
        sources_at[(p, l, h, d)].append(s)
    edges_of = defaultdict(list)
    for e in fetch_dicts(db, "SELECT * FROM edges WHERE run_id = ?", [run_id]):
        edges_of[(e["prompt_id"], e["layer"], e["head"], e["dest_pos"], e["src_pos"])].append(e)

    reached = set()

    def visit(firing):
        if firing in reached:  # reached along another path: counts once
            return
        reached.add(firing)
        p, l, h, d, s = firing
        if s == 0:  # the attention sink is not traced through
            return
        for e in edges_of[firing]:
            token = s if e["side"] == "key" else d
            for source in sources_at[(p, e["up_layer"], e["up_head"], token)]:
                visit((p, e["up_layer"], e["up_head"], token, source))

    for p, l, h, d, s in firings:
        if ((l, h) in roots and prompt_id in (None, p)
                and dest_role in (None, roles[(p, d)]) and src_role in (None, roles[(p, s)])):
            visit((p, l, h, d, s))
    return reached


def python_graph_edges(db, reached, one_prompt: bool, run_id=LATEST_RUN):
    """The traced graph's "writes" and "reads" edges, aggregated as SPEC.md says."""
    roles = token_roles(db, run_id)
    svs = defaultdict(dict)
    for s in fetch_dicts(db, "SELECT * FROM edge_svs WHERE run_id = ?", [run_id]):
        svs[tuple(s[c] for c in EDGE_KEY)][s["sv"]] = s["weight"]
    writes = defaultdict(lambda: {"prompts": set(), "weights": [], "svs": defaultdict(float)})
    reads = defaultdict(lambda: {"prompts": set(), "firings": set(), "sides": set()})
    for e in fetch_dicts(db, "SELECT * FROM edges WHERE run_id = ?", [run_id]):
        firing = (e["prompt_id"], e["layer"], e["head"], e["dest_pos"], e["src_pos"])
        if firing not in reached:
            continue
        pos = e["dest_pos"] if e["side"] == "query" else e["src_pos"]
        token = pos if one_prompt else roles[(e["prompt_id"], pos)]
        if token is None:  # no role: one group "other", never matched by position across prompts
            token = "other"
        target = f"L{e['layer']}H{e['head']}@{token}"
        w = writes[(f"L{e['up_layer']}H{e['up_head']}", target, e["side"])]
        w["prompts"].add(e["prompt_id"])
        w["weights"].append(e["weight"])
        for sv, weight in svs[tuple(e[c] for c in EDGE_KEY)].items():
            w["svs"][sv] += weight
        w["typed"] = ("head", e["up_layer"], e["up_head"], e["layer"], e["head"], str(token))
        r = reads[(target, f"L{e['layer']}H{e['head']}")]
        r["prompts"].add(e["prompt_id"])
        r["firings"].add(firing)
        r["sides"].add(e["side"])
    return writes, reads


def check_graph(db, graph, reached, one_prompt):
    writes, reads = python_graph_edges(db, reached, one_prompt)
    got = graph.edges.to_pylist()
    got_writes = {(r["source"], r["target"], r["side"]): r for r in got if r["kind"] == "writes"}
    got_reads = {(r["source"], r["target"]): r for r in got if r["kind"] == "reads"}
    assert set(got_writes) == set(writes) and set(got_reads) == set(reads)
    for key, want in writes.items():
        row = got_writes[key]
        assert tuple(row[c] for c in ("up_kind", "up_layer", "up_head", "down_layer", "down_head", "token")) == \
            want["typed"]
        assert row["count"] == (len(want["weights"]) if one_prompt else len(want["prompts"]))
        assert row["n_edges"] == len(want["weights"])
        assert row["mean_weight"] == pytest.approx(sum(want["weights"]) / len(want["weights"]), rel=1e-5, abs=1e-6)
        total = sum(want["svs"].values())
        top = sorted(want["svs"].items(), key=lambda kv: -kv[1])[:3]
        assert [sv for sv, _ in parse_svs(row["top_svs"])] == [sv for sv, _ in top]
        assert [s for _, s in parse_svs(row["top_svs"])] == pytest.approx([w / total for _, w in top], abs=0.006)
    for key, want in reads.items():
        row = got_reads[key]
        assert row["count"] == (len(want["firings"]) if one_prompt else len(want["prompts"]))
        assert row["side"] == "+".join(sorted(want["sides"]))


@pytest.fixture(scope="module")
def con(catalog_db):
    connection = open_readonly(catalog_db)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def root(catalog_db):
    """A top-layer head with many edges (the random model has no IOI name movers)."""
    return busiest_heads(catalog_db, min_layer=2)[0]


@pytest.fixture(scope="module")
def role_pair(catalog_db, root):
    """The commonest (dest_role, src_role) of the root's firings with both roles known."""
    layer, head = (int(x) for x in root.split("."))
    return tuple(fetch_dicts(catalog_db, """
        SELECT dest_role, src_role, count(*) AS n FROM firing_roles
        WHERE run_id = ? AND layer = ? AND head = ? AND dest_role IS NOT NULL AND src_role IS NOT NULL
        GROUP BY ALL ORDER BY n DESC, dest_role, src_role LIMIT 1""", [LATEST_RUN, layer, head])[0].values())[:2]


def _heads(*names):
    return {tuple(int(x) for x in n.split(".")) for n in names}


@pytest.mark.parametrize("roles", ["any", "pair"])
def test_aggregated_trace_matches_python_recursion(catalog_db, con, root, role_pair, roles):
    dest_role, src_role = (None, None) if roles == "any" else role_pair
    second = busiest_heads(catalog_db, min_layer=1)[1]
    graph = trace(con, roots=[root, second], dest_role=dest_role, src_role=src_role)
    reached = python_trace(catalog_db, _heads(root, second), dest_role, src_role)
    got = [tuple(r.values()) for r in graph.firings.to_pylist()]
    assert len(got) == len(set(got))  # UNION: each firing once per prompt
    assert set(got) == reached and reached
    check_graph(catalog_db, graph, reached, one_prompt=False)
    assert {n for n in graph.nodes.column("node").to_pylist()} == (
        {e for r in graph.edges.to_pylist() for e in (r["source"], r["target"])} | {hn(root), hn(second)} & {
            f"L{l}H{h}" for _, l, h, _, _ in reached})


def test_single_prompt_trace_keeps_positions(catalog_db, con, root):
    prompt = fetch_dicts(catalog_db, "SELECT prompt_id, count(*) AS n FROM firings WHERE run_id = ? "
                         "GROUP BY prompt_id ORDER BY n DESC, prompt_id LIMIT 1", [LATEST_RUN])[0]["prompt_id"]
    graph = trace(con, roots=[root], dest_role=None, src_role=None, prompt_id=prompt)
    reached = python_trace(catalog_db, _heads(root), None, None, prompt_id=prompt)
    assert set(tuple(r.values()) for r in graph.firings.to_pylist()) == reached
    check_graph(catalog_db, graph, reached, one_prompt=True)
    tokens = [n for n in graph.nodes.to_pylist() if n["kind"] == "token"]
    assert tokens and all(n["node"].endswith(f"@{n['pos']}") and n["token"] is not None for n in tokens)


def test_cli_table_json_and_root_lists(catalog_db, con, root):
    second = busiest_heads(catalog_db, min_layer=1)[1]
    graph = trace(con, roots=[root, second], dest_role=None, src_role=None)
    for roots in (["--root", f"{root},{second}"], ["--root", root, "--root", second]):
        result = invoke("trace", "--db", catalog_db, *roots, "--dest-role", "any", "--src-role", "any",
                        "--format", "json")
        assert result.exit_code == 0, result.output
        document = json.loads(result.stdout)  # one object: nodes, edges, the run and the notes
        assert document["edges"] == json.loads(render(graph.edges, "json"))
        assert document["nodes"] == json.loads(render(graph.nodes, "json"))
        assert document["run_id"] == document["run"]["run_id"] == LATEST_RUN
        assert document["roots"] == [hn(root), hn(second)] and document["notes"] == graph.notes
        assert document["n_firings"] == graph.firings.num_rows
        assert f"note: run {LATEST_RUN} (sad" in result.stderr and "firings reached" in result.stderr
    table = invoke("trace", "--db", catalog_db, "--root", root, "--dest-role", "any", "--src-role", "any")
    assert table.stdout.startswith("source")


def test_graphml_round_trips_through_networkx(catalog_db, con, root, tmp_path):
    out = tmp_path / "circuit.graphml"
    result = invoke("trace", "--db", catalog_db, "--root", root, "--dest-role", "any", "--src-role", "any",
                    "--format", "graphml", "--out", out)
    assert result.exit_code == 0, result.output
    g = nx.read_graphml(out, force_multigraph=True)
    graph = trace(con, roots=[root], dest_role=None, src_role=None)
    assert set(g.nodes) == set(graph.nodes.column("node").to_pylist())
    read_back = sorted((u, v, d["kind"], d["side"], d["count"]) for u, v, d in g.edges(data=True))
    stored = sorted((r["source"], r["target"], r["kind"], r["side"], r["count"]) for r in graph.edges.to_pylist())
    assert read_back == stored
    assert g.nodes[hn(root)]["is_root"] is True and g.nodes[hn(root)]["layer"] == int(root.split(".")[0])


def test_dot_html_and_png(catalog_db, con, root, tmp_path):
    args = ["trace", "--db", catalog_db, "--root", root, "--dest-role", "any", "--src-role", "any"]
    n_edges = trace(con, roots=[root], dest_role=None, src_role=None).edges.num_rows
    dot = invoke(*args, "--format", "dot")
    assert dot.exit_code == 0 and dot.stdout.startswith("digraph")
    assert sum(" -> " in line for line in dot.stdout.splitlines()) == n_edges

    page = invoke(*args, "--format", "html").stdout
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    lowered = page.lower()
    assert "http://" not in lowered and "https://" not in lowered and "<script" not in lowered
    assert lowered.count('<g class="edge"') == n_edges
    assert "layer 2" in page and "layer 0" in page   # the layer axis, as in the PNG

    png = tmp_path / "circuit.png"
    result = invoke(*args, "--format", "png", "--out", png)
    assert result.exit_code == 0, result.output
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    from PIL import Image

    with Image.open(png) as image:
        image.verify()


def test_default_roots_skip_heads_a_small_model_lacks():
    gpt2_like = Run(run_id=1, model_id=1, n_layers=10, n_heads=12, status="finished")
    roots, notes = resolve_roots(gpt2_like, None)
    assert roots == [(9, 6), (9, 9)] and notes == ["default root L10H0 skipped: the model has no such head"]
    with pytest.raises(CatalogError, match="no head"):
        resolve_roots(gpt2_like, ["10.0"])  # an explicit unknown head is an error


@pytest.mark.parametrize("args", [
    ["--dest-role", "IO", "--src-role", "end"],  # no root given, and no head fires forward to pick one
    ["--root", "9.12"],
    ["--root", "x.y"],
    ["--root", "2.1", "--dest-role", "nobody"],
    ["--root", "2.1", "--src-role", "nobody"],
    ["--root", "2.1", "--prompt", "999"],
    ["--root", "2.1", "--run", "99"],
    ["--root", "2.1", "--format", "png"],   # png needs --out
])
def test_bad_trace_input_is_one_line_error(catalog_db, args):
    assert_one_line_error(invoke("trace", "--db", catalog_db, *args))


def test_roots_without_matching_firings_give_a_note_not_an_error(catalog_db, root):
    # A source after the destination cannot fire: the trace is empty, with a note on stderr.
    result = invoke("trace", "--db", catalog_db, "--root", root, "--dest-role", "IO", "--src-role", "end")
    assert result.exit_code == 0, result.output
    assert f"note: root {hn(root)} has no firing from IO to end" in result.stderr
    assert "(no rows)" in result.stdout


def test_roles_say_how_many_root_firings_they_leave_out(catalog_db, con, root, role_pair):
    dest_role, src_role = role_pair
    layer, head = (int(x) for x in root.split("."))
    total = fetch_dicts(catalog_db, "SELECT count(*) AS n FROM firings WHERE run_id = ? AND layer = ? AND head = ?",
                        [LATEST_RUN, layer, head])[0]["n"]
    own = fetch_dicts(catalog_db, """SELECT count(*) AS n FROM firing_roles WHERE run_id = ? AND layer = ?
        AND head = ? AND dest_role = ? AND src_role = ?""", [LATEST_RUN, layer, head, dest_role, src_role])[0]["n"]
    graph = trace(con, roots=[root], dest_role=dest_role, src_role=src_role)
    assert 0 < own < total
    assert graph.notes[0] == (f"root {hn(root)}: {own} of its {total} firings in run {LATEST_RUN} are from "
                              f"{dest_role} to {src_role}; the other {total - own} are not traced "
                              "(--dest-role any --src-role any traces them all)")

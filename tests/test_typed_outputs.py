"""Typed outputs (issue 10, points 1, 2, 7): every format of edges, head and trace read back by the
tools researchers use (pandas, networkx, json, Parquet) and compared with the stored rows."""

from __future__ import annotations

import io
import json
import re
from collections import defaultdict

import networkx as nx
import pandas as pd
import pyarrow.parquet as pq
import pytest
from _catalog_fixture import LATEST_RUN, busiest_heads, fetch_dicts, invoke

from catalog.read import query
from catalog.heads import parse_head
from catalog.store import open_readonly
from catalog.read.trace import trace

HEAD_NAME = re.compile(r"^L\d+H\d+$")


@pytest.fixture(scope="module")
def con(catalog_db):
    connection = open_readonly(catalog_db)
    yield connection
    connection.close()


def stored_shares(db, head: str) -> dict[tuple, list[tuple[int, float]]]:
    """(up_layer, up_head, side) -> [(sv, share)] of edges into `head`, all directions, from edge_svs."""
    layer, index = (int(x) for x in head.split("."))
    found = fetch_dicts(db, """
        SELECT e.up_layer, e.up_head, e.side, s.sv, sum(s.weight) AS w
        FROM edges e JOIN edge_svs s USING (run_id, prompt_id, edge_id)
        WHERE e.run_id = ? AND e.layer = ? AND e.head = ? GROUP BY ALL""", [LATEST_RUN, layer, index])
    by_group = defaultdict(list)
    for r in found:
        by_group[(r["up_layer"], r["up_head"], r["side"])].append((r["sv"], r["w"]))
    shares = {}
    for key, terms in by_group.items():
        total = sum(w for _, w in terms)
        shares[key] = sorted(((sv, w / total) for sv, w in terms), key=lambda t: -t[1])
    return shares


def check_rows_against_store(rows: list[dict], shares: dict) -> None:
    """Integer keys, an unambiguous display name, and {sv, share} lists equal to the stored terms."""
    assert rows
    for row in rows:
        assert isinstance(row["up_layer"], int) and isinstance(row["up_head"], int)
        assert row["upstream"] == f"L{row['up_layer']}H{row['up_head']}" and HEAD_NAME.match(row["upstream"])
        want = shares[(row["up_layer"], row["up_head"], row["side"])][:3]
        got = [(s["sv"], s["share"]) for s in row["top_svs"]]
        assert [sv for sv, _ in got] == [sv for sv, _ in want]
        assert [share for _, share in got] == pytest.approx([share for _, share in want], rel=1e-5)


def test_edges_csv_json_arrow_parquet_read_back(catalog_db, con, tmp_path):
    head = busiest_heads(catalog_db)[0]
    shares = stored_shares(catalog_db, head)
    table = query.edges_into(con, head)

    # Arrow (the Python API): integer columns and a list of structs.
    assert str(table.schema.field("top_svs").type) == "list<l: struct<sv: int32, share: float>>"
    check_rows_against_store(table.to_pylist(), shares)

    # Parquet, written from the Arrow table and read back by pandas: the same structs.
    pq.write_table(table, tmp_path / "edges.parquet")
    frame = pd.read_parquet(tmp_path / "edges.parquet")
    rows = frame.to_dict("records")
    for row in rows:
        row["top_svs"] = [dict(s) for s in row["top_svs"]]
        row["up_layer"], row["up_head"] = int(row["up_layer"]), int(row["up_head"])
    check_rows_against_store(rows, shares)
    assert query.result_run(pq.read_table(tmp_path / "edges.parquet"))["run_id"] == LATEST_RUN  # metadata kept

    # CSV read by pandas with no hints: names stay names ("L6H10", never the float 6.1), keys are integers.
    csv = invoke("edges", "--db", catalog_db, "--into", head, "--format", "csv")
    assert csv.exit_code == 0, csv.output
    frame = pd.read_csv(io.StringIO(csv.stdout))
    assert pd.api.types.is_string_dtype(frame["upstream"]) and frame["upstream"].str.match(HEAD_NAME).all()
    assert pd.api.types.is_integer_dtype(frame["up_layer"]) and pd.api.types.is_integer_dtype(frame["up_head"])
    rows = frame.to_dict("records")
    for row in rows:
        row["top_svs"] = json.loads(row["top_svs"])
        row["up_layer"], row["up_head"] = int(row["up_layer"]), int(row["up_head"])
    check_rows_against_store(rows, shares)

    # JSON: a list of objects, shares as numbers (float32 precision), never "11:0.12" strings.
    document = json.loads(invoke("edges", "--db", catalog_db, "--into", head, "--format", "json").stdout)
    check_rows_against_store(document, shares)
    assert all(isinstance(s["share"], float) and len(repr(s["share"])) <= 12 for r in document for s in r["top_svs"])


def test_edges_from_carries_down_layer_and_down_head(catalog_db, con):
    head = busiest_heads(catalog_db, min_layer=0)[-1]
    rows = query.edges_from(con, head).to_pylist()
    for row in rows:
        assert row["downstream"] == f"L{row['down_layer']}H{row['down_head']}"
        assert all(isinstance(s["sv"], int) for s in row["top_svs"])


def test_parse_head_reads_both_spellings():
    assert parse_head("9.9") == parse_head("L9H9") == parse_head("l9h9") == (9, 9)
    assert query.head_name(6, 10) == "L6H10"


def test_trace_csv_json_and_graphml_read_back(catalog_db, con, tmp_path):
    root = busiest_heads(catalog_db, min_layer=2)[0]
    graph = trace(con, roots=[root], dest_role=None, src_role=None)
    edges = graph.edges.to_pylist()
    args = ["trace", "--db", catalog_db, "--root", root, "--dest-role", "any", "--src-role", "any"]

    frame = pd.read_csv(io.StringIO(invoke(*args, "--format", "csv").stdout))
    assert pd.api.types.is_string_dtype(frame["source"]) and pd.api.types.is_string_dtype(frame["target"])
    assert pd.api.types.is_integer_dtype(frame["down_layer"]) and pd.api.types.is_integer_dtype(frame["down_head"])
    assert len(frame) == len(edges)
    for got, want in zip(frame.to_dict("records"), edges):
        assert (got["source"], got["target"], got["side"]) == (want["source"], want["target"], want["side"])
        assert json.loads(got["top_svs"]) == [{"sv": s["sv"], "share": pytest.approx(s["share"], rel=1e-6)}
                                              for s in want["top_svs"]]
        if want["kind"] == "writes":
            assert got["source"] == f"L{int(got['up_layer'])}H{int(got['up_head'])}"
            assert got["target"] == f"L{got['down_layer']}H{got['down_head']}@{got['token']}"

    document = json.loads(invoke(*args, "--format", "json").stdout)
    assert set(document) >= {"run_id", "run", "roots", "notes", "nodes", "edges", "n_firings"}
    assert [(e["source"], e["target"], e["side"]) for e in document["edges"]] == \
        [(e["source"], e["target"], e["side"]) for e in edges]

    g = nx.read_graphml(io.StringIO(invoke(*args, "--format", "graphml").stdout), force_multigraph=True)
    assert "sv" in g.graph["top_svs_format"] and "signed" in g.graph["top_svs_format"]
    read_back = {(u, v, d["side"]): json.loads(d["top_svs"]) for u, v, d in g.edges(data=True)}
    for e in edges:
        assert read_back[(e["source"], e["target"], e["side"])] == [
            {"sv": s["sv"], "share": pytest.approx(s["share"], rel=1e-6)} for s in e["top_svs"]]


def test_aggregated_trace_leaves_no_edge_out(catalog_db, con):
    """Over all prompts, an edge at a token without a role is kept, at the one node 'other' (never
    matched by position across prompts: issue 20)."""
    root = busiest_heads(catalog_db, min_layer=2)[0]
    graph = trace(con, roots=[root], dest_role=None, src_role=None)
    layer, index = (int(x) for x in root.split("."))
    reached = graph.firings.to_pylist()
    keys = {(r["prompt_id"], r["layer"], r["head"], r["dest_pos"], r["src_pos"]) for r in reached}
    stored = [e for e in fetch_dicts(catalog_db, "SELECT * FROM edges WHERE run_id = ?", [LATEST_RUN])
              if (e["prompt_id"], e["layer"], e["head"], e["dest_pos"], e["src_pos"]) in keys]
    writes = [e for e in graph.edges.to_pylist() if e["kind"] == "writes"]
    assert sum(e["n_edges"] for e in writes) == len(stored)   # every stored edge of a reached firing is drawn
    assert any(e["token"] == "other" for e in writes)
    assert not any(e["token"].startswith("pos") for e in writes)
    result = invoke("trace", "--db", catalog_db, "--root", root, "--dest-role", "any", "--src-role", "any",
                    "--format", "csv")
    assert "grouped as 'other' across prompts" in result.stderr and "firings reached" in result.stderr


def test_head_json_is_one_object_with_integer_keys(catalog_db):
    head = busiest_heads(catalog_db)[0]
    document = json.loads(invoke("head", "--db", catalog_db, head, "--format", "json").stdout)
    assert isinstance(document, dict)
    layer, index = (int(x) for x in head.split("."))
    assert (document["name"], document["layer"], document["head"]) == (f"L{layer}H{index}", layer, index)
    assert all(isinstance(r["up_layer"], int) for r in document["upstream"])

"""The output-format registry (catalog.formats): every format renders, data formats read back unchanged."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import networkx as nx
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog import formats
from catalog.errors import CatalogError
from catalog.read.graph import TraceGraph

TABLE = pa.table({
    "upstream": ["L6H10", "MLP 3"],
    "up_layer": pa.array([6, 3], pa.int16()),
    "n_prompts": pa.array([12, 3], pa.int64()),
    "mean_weight": pa.array([0.25, -1.5], pa.float64()),
    "share": pa.array([0.1, 0.75], pa.float32()),
})


def small_graph() -> TraceGraph:
    nodes = [{"node": "L9H9", "kind": "head", "layer": 9, "head": 9, "role": None, "pos": None, "token": None,
              "is_root": True},
             {"node": "L9H9@end", "kind": "token", "layer": 9, "head": 9, "role": "end", "pos": None, "token": None,
              "is_root": False},
             {"node": "L7H3", "kind": "head", "layer": 7, "head": 3, "role": None, "pos": None, "token": None,
              "is_root": False}]
    edge = {"up_kind": "head", "token": "end", "count": 4, "n_edges": 4}
    edges = [dict(edge, source="L7H3", target="L9H9@end", kind="writes", side="query", up_layer=7, up_head=3,
                  down_layer=9, down_head=9, mean_weight=0.5, top_svs=[{"sv": 2, "share": 0.75}]),
             dict(edge, source="L9H9@end", target="L9H9", kind="reads", side="query", up_kind=None, up_layer=None,
                  up_head=None, down_layer=9, down_head=9, mean_weight=None, top_svs=[])]
    firings = pa.table({c: pa.array([9], pa.int32()) for c in ("prompt_id", "layer", "head", "dest_pos", "src_pos")})
    return TraceGraph(1, None, ["L9H9"], "end", "IO", firings, pa.Table.from_pylist(nodes),
                      pa.Table.from_pylist(edges), [], {"run_id": 1})


def test_the_registry_holds_every_format_the_cli_and_service_name():
    assert formats.names() == ("table", "csv", "json", "parquet", "arrow", "graphml", "dot", "html", "png")
    assert formats.TEXT_TABLE_FORMATS == ("table", "csv", "json")
    assert formats.GRAPH_FORMATS == ("graphml", "dot", "html", "png")
    for f in formats.FORMATS.values():
        assert f.kind in ("table", "graph") and f.extension and "/" in f.content_type


def test_an_unknown_format_is_one_catalog_error():
    with pytest.raises(CatalogError, match="unknown format 'xlsx'"):
        formats.get("xlsx")


@pytest.mark.parametrize("name", formats.names("table"))
def test_every_table_format_renders(name):
    body = formats.get(name).render(TABLE)
    assert isinstance(body, bytes) == formats.get(name).binary
    assert len(body) > 0


def test_csv_reads_back_through_pandas_unchanged():
    back = pd.read_csv(io.StringIO(formats.get("csv").render(TABLE)))
    assert list(back.columns) == TABLE.column_names
    assert back["upstream"].tolist() == ["L6H10", "MLP 3"]
    assert back["n_prompts"].tolist() == [12, 3]
    assert back["mean_weight"].tolist() == [0.25, -1.5]
    assert back["share"].tolist() == [0.1, 0.75]   # float32 written at its own precision, not 0.10000000149


def test_json_reads_back_through_pandas_unchanged():
    back = pd.read_json(io.StringIO(formats.get("json").render(TABLE)))
    assert back.to_dict("records") == [
        {"upstream": "L6H10", "up_layer": 6, "n_prompts": 12, "mean_weight": 0.25, "share": 0.1},
        {"upstream": "MLP 3", "up_layer": 3, "n_prompts": 3, "mean_weight": -1.5, "share": 0.75}]


def test_parquet_and_arrow_read_back_with_their_types():
    assert pq.read_table(io.BytesIO(formats.get("parquet").render(TABLE))).equals(TABLE)
    assert pd.read_parquet(io.BytesIO(formats.get("parquet").render(TABLE)))["up_layer"].tolist() == [6, 3]
    assert pa.ipc.open_stream(formats.get("arrow").render(TABLE)).read_all().equals(TABLE)


def test_the_terminal_table_aligns_columns():
    lines = formats.get("table").render(TABLE).splitlines()
    assert lines[0].split() == TABLE.column_names
    assert lines[2].split()[:3] == ["L6H10", "6", "12"]


def test_graphml_reads_back_through_networkx_unchanged():
    back = nx.parse_graphml(formats.get("graphml").render(small_graph()))
    assert set(back.nodes) == {"L9H9", "L9H9@end", "L7H3"}
    (attrs,) = [d for u, v, d in back.edges(data=True) if u == "L7H3"]
    assert attrs["kind"] == "writes" and attrs["side"] == "query" and attrs["count"] == 4
    assert attrs["mean_weight"] == 0.5
    assert json.loads(attrs["top_svs"]) == [{"sv": 2, "share": 0.75}]


def test_the_drawings_render():
    graph = small_graph()
    assert formats.get("dot").render(graph).startswith("digraph circuit {")
    assert "<svg" in formats.get("html").render(graph)
    assert formats.get("png").render(graph)[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_read_side_and_the_formats_import_neither_torch_nor_click():
    code = ("import sys, catalog.read, catalog.read.query, catalog.read.trace, catalog.read.browse, catalog.formats, "
            "catalog.formats.table, catalog.formats.graph, catalog.formats.files; "
            "print(sorted(m for m in ('torch', 'click', 'catalog.cli', 'catalog.service') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

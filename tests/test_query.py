"""Query API and CLI (edges, head, export), each checked against plain Python over the stored rows."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from _catalog_fixture import (
    LATEST_RUN,
    OLDER_RUN,
    assert_one_line_error,
    busiest_heads,
    fetch_dicts,
    invoke,
    token_roles,
)

from catalog.read import query
from catalog.errors import CatalogError
from catalog.formats.table import render
from catalog.store import Catalog, LATEST_VERSION, open_readonly

DOCS = Path(__file__).resolve().parents[1] / "docs" / "query.md"


def expected_edges(db, head: str, direction: str, run_id=LATEST_RUN, side=None, role=None) -> dict:
    """Plain-Python edges_into / edges_from: {group key: row} from the stored edges and edge_svs."""
    layer, head_index = (int(x) for x in head.split("."))
    roles = token_roles(db, run_id)
    groups = defaultdict(lambda: {"prompts": set(), "weights": [], "svs": Counter()})
    keys_of_edge = {}
    for e in fetch_dicts(db, "SELECT * FROM edges WHERE run_id = ?", [run_id]):
        fixed = (e["layer"], e["head"]) if direction == "into" else (e["up_layer"], e["up_head"])
        token_role = roles[(e["prompt_id"], e["dest_pos"] if e["side"] == "query" else e["src_pos"])]
        if fixed != (layer, head_index) or side not in (None, e["side"]) or role not in (None, token_role):
            continue
        if direction == "into":
            key = (f"L{e['up_layer']}H{e['up_head']}", e["up_layer"], e["up_head"], e["side"])
        else:
            key = (f"L{e['layer']}H{e['head']}", e["layer"], e["head"], e["side"], token_role)
        groups[key]["prompts"].add(e["prompt_id"])
        groups[key]["weights"].append(e["weight"])
        keys_of_edge[(e["prompt_id"], e["edge_id"])] = key
    for s in fetch_dicts(db, "SELECT * FROM edge_svs WHERE run_id = ?", [run_id]):
        edge_id = (s["prompt_id"], s["edge_id"])
        if edge_id in keys_of_edge:
            groups[keys_of_edge[edge_id]]["svs"][s["sv"]] += s["weight"]
    result = {}
    for key, g in groups.items():
        total_sv = sum(g["svs"].values())
        svs = sorted(g["svs"].items(), key=lambda kv: -kv[1])[:3]
        result[key] = {"n_prompts": len(g["prompts"]), "n_firings": len(g["weights"]),
                       "mean_weight": sum(g["weights"]) / len(g["weights"]), "total_weight": sum(g["weights"]),
                       "svs": [(sv, w / total_sv) for sv, w in svs]}
    return result


def check_edge_table(table, expected: dict, key_columns: list[str]) -> None:
    got = table.to_pylist()
    assert len(got) == len(expected)
    for row in got:
        want = expected[tuple(row[c] for c in key_columns)]
        assert (row["n_prompts"], row["n_firings"]) == (want["n_prompts"], want["n_firings"])
        assert row["mean_weight"] == pytest.approx(want["mean_weight"], rel=1e-5, abs=1e-6)
        assert row["total_weight"] == pytest.approx(want["total_weight"], rel=1e-5, abs=1e-6)
        got_svs = [(item["sv"], item["share"]) for item in row["top_svs"]]  # a list of {sv, share}
        assert [sv for sv, _ in got_svs] == [sv for sv, _ in want["svs"]]
        assert [s for _, s in got_svs] == pytest.approx([s for _, s in want["svs"]], abs=0.006)
    order = [(-r["n_prompts"], -r["total_weight"]) for r in got]
    assert order == sorted(order)


@pytest.fixture(scope="module")
def con(catalog_db):
    connection = open_readonly(catalog_db)
    yield connection
    connection.close()


@pytest.mark.parametrize("side,role", [(None, None), ("query", None), ("key", None), (None, "end"), ("key", "S2")])
def test_edges_into_matches_python(catalog_db, con, side, role):
    for head in busiest_heads(catalog_db):
        table = query.edges_into(con, head, side=side, role=role)
        check_edge_table(table, expected_edges(catalog_db, head, "into", side=side, role=role),
                         ["upstream", "up_layer", "up_head", "side"])


@pytest.mark.parametrize("side,role", [(None, None), ("query", "end"), ("key", None)])
def test_edges_from_matches_python(catalog_db, con, side, role):
    for head in busiest_heads(catalog_db, min_layer=0):
        table = query.edges_from(con, head, side=side, role=role)
        expected = expected_edges(catalog_db, head, "from", side=side, role=role)
        check_edge_table(table, expected, ["downstream", "down_layer", "down_head", "side", "token_role"])


def test_edges_cli_agrees_with_api_and_reads_l_h_names(catalog_db, con):
    head = busiest_heads(catalog_db)[0]
    layer, h = head.split(".")
    result = invoke("edges", "--db", catalog_db, "--into", f"L{layer}H{h}", "--top", "3", "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(render(query.edges_into(con, head, top=3), "json"))
    table = invoke("edges", "--db", catalog_db, "--from", "0.0", "--side", "key")
    assert table.exit_code == 0 and table.stdout.startswith("downstream")
    csv = invoke("edges", "--db", catalog_db, "--into", head, "--format", "csv")
    assert csv.stdout.splitlines()[0] == ("upstream,up_kind,up_layer,up_head,side,n_prompts,n_firings,mean_weight,"
                                          "total_weight,top_svs")
    # stderr names the run read; stdout holds only the CSV
    assert csv.stderr.startswith(f"note: run {LATEST_RUN} (sad, finished, 8 prompts")


def test_default_run_is_latest_finished_and_run_option_selects(catalog_db, con):
    finished = fetch_dicts(catalog_db, "SELECT max(run_id) AS r FROM runs WHERE status = 'finished'")[0]["r"]
    assert query.resolve_run(con).run_id == finished == LATEST_RUN
    head = busiest_heads(catalog_db, run_id=OLDER_RUN)[0]
    older = query.edges_into(con, head, run_id=OLDER_RUN)
    check_edge_table(older, expected_edges(catalog_db, head, "into", run_id=OLDER_RUN),
                     ["upstream", "up_layer", "up_head", "side"])
    assert query.result_run(older)["run_id"] == OLDER_RUN and not query.result_run(older)["latest_finished"]
    result = invoke("edges", "--db", catalog_db, "--into", head, "--run", OLDER_RUN, "--format", "json")
    assert json.loads(result.stdout) == json.loads(render(older, "json"))
    assert f"note: run {OLDER_RUN} (sad, finished, 4 prompts" in result.stderr


def test_head_summary_matches_python(catalog_db, con):
    head = busiest_heads(catalog_db)[0]
    layer, h = (int(x) for x in head.split("."))
    tables = query.head_summary(con, head, top=100)
    model_id = fetch_dicts(catalog_db, "SELECT model_id FROM runs WHERE run_id = ?", [LATEST_RUN])[0]["model_id"]
    sigmas = fetch_dicts(catalog_db, "SELECT sv, sigma, pos_offset FROM singular_vectors WHERE model_id = ? AND layer = ? "
                         "AND head = ? ORDER BY sv", [model_id, layer, h])
    assert tables["spectrum"].to_pylist() == sigmas[:100]
    assert tables["spectrum"].column("sigma").to_pylist() == sorted(tables["spectrum"].column("sigma").to_pylist(), reverse=True)

    firings = [f for f in fetch_dicts(catalog_db, "SELECT * FROM firings WHERE run_id = ?", [LATEST_RUN])
               if (f["layer"], f["head"]) == (layer, h)]
    activity = tables["activity"].to_pylist()[0]
    assert activity["n_firings"] == len(firings)
    assert activity["n_prompts"] == len({f["prompt_id"] for f in firings})
    assert activity["mean_n_svs"] == pytest.approx(sum(f["n_svs"] for f in firings) / len(firings))

    roles = token_roles(catalog_db)
    pairs = Counter((roles[(f["prompt_id"], f["dest_pos"])], roles[(f["prompt_id"], f["src_pos"])]) for f in firings)
    got_pairs = {(r["dest_role"], r["src_role"]): r["n_firings"] for r in tables["role_pairs"].to_pylist()}
    assert got_pairs == dict(pairs)

    sizes = Counter(f["n_svs"] for f in firings)
    got_sizes = {r["n_svs"]: r["n_firings"] for r in tables["signal_size"].to_pylist()}
    assert got_sizes == dict(sizes)
    assert sum(r["share"] for r in tables["signal_size"].to_pylist()) == pytest.approx(1.0)

    used = Counter(s["sv"] for s in fetch_dicts(catalog_db, "SELECT * FROM firing_svs WHERE run_id = ?", [LATEST_RUN])
                   if (s["layer"], s["head"]) == (layer, h))
    assert {r["sv"]: r["n_firings"] for r in tables["top_svs"].to_pylist()} == dict(used)
    assert tables["upstream"].to_pylist() == query.edges_into(con, head, top=5).to_pylist()
    assert tables["downstream"].to_pylist() == query.edges_from(con, head, top=5).to_pylist()


def test_head_cli_table_and_json(catalog_db, con):
    head = busiest_heads(catalog_db)[0]
    layer, h = head.split(".")
    text = invoke("head", "--db", catalog_db, head)
    assert text.exit_code == 0, text.output
    for title in ("Spectrum", "Firing token roles", "Signal size", "Most used singular vectors", "Main upstream heads"):
        assert title in text.stdout
    document = json.loads(invoke("head", "--db", catalog_db, head, "--format", "json").stdout)
    assert isinstance(document, dict)  # one object, not a list holding one
    assert (document["name"], document["layer"], document["head"]) == (f"L{layer}H{h}", int(layer), int(h))
    assert document["run_id"] == document["run"]["run_id"] == LATEST_RUN
    assert document["role_pairs"] == query.head_summary(con, head)["role_pairs"].to_pylist()


def test_export_writes_every_table_as_parquet(catalog_db, tmp_path):
    result = invoke("export", "--db", catalog_db, "--format", "parquet", tmp_path / "out")
    assert result.exit_code == 0, result.output
    tables = [r["table_name"] for r in fetch_dicts(
        catalog_db, "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE'")]
    assert "edges" in tables and "firing_roles" not in tables and "edge_svs" not in tables
    tables.append("edge_svs")  # a view since migration 010, exported with the rows users know
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.parquet")) == sorted(tables)
    for name in tables:
        stored = fetch_dicts(catalog_db, f'SELECT count(*) AS n FROM "{name}"')[0]["n"]
        assert pq.read_table(tmp_path / "out" / f"{name}.parquet").num_rows == stored


@pytest.mark.parametrize("args", [
    ["edges", "--into", "9.12"],           # no such layer (3 layers)
    ["edges", "--into", "2.7"],            # no such head (4 per layer)
    ["edges", "--into", "x.y"],            # not a head at all
    ["edges", "--from", "L9H9"],
    ["edges", "--into", "2.1", "--run", "99"],
    ["edges", "--into", "2.1", "--role", "nobody"],
    ["edges", "--into", "2.1", "--from", "1.1"],
    ["head", "9.12"],
    ["head", "2.1", "--run", "99"],
])
def test_bad_input_is_one_line_error(catalog_db, args):
    assert_one_line_error(invoke(args[0], "--db", catalog_db, *args[1:]))


def _catalog_without_tables(path: Path) -> Path:
    # Migrations recorded as applied, but the tables are missing: a damaged or foreign file.
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE schema_migrations (version INTEGER, name VARCHAR, applied_at TIMESTAMP)")
        for version in range(1, LATEST_VERSION + 1):
            con.execute("INSERT INTO schema_migrations VALUES (?, 'x', now())", [version])
    return path


def test_bad_catalog_files_are_one_line_errors(tmp_path):
    plain = tmp_path / "plain.duckdb"
    duckdb.connect(str(plain)).close()
    Catalog(tmp_path / "empty.duckdb").close()  # migrated, no run
    no_tables = _catalog_without_tables(tmp_path / "no_tables.duckdb")
    for db in (tmp_path / "missing.duckdb", plain, tmp_path / "empty.duckdb", no_tables):
        for args in (["edges", "--db", db, "--into", "0.0"], ["head", "--db", db, "0.0"],
                     ["export", "--db", db, tmp_path / "x"]):
            if args[0] == "export" and db in (tmp_path / "empty.duckdb", no_tables):
                continue  # exporting an empty or partial catalog is allowed
            assert_one_line_error(invoke(*args))
    assert "no finished run" in invoke("edges", "--db", tmp_path / "empty.duckdb", "--into", "0.0").output
    assert "edges" in invoke("edges", "--db", no_tables, "--into", "0.0").output


def test_python_api_raises_catalog_error(con):
    with pytest.raises(CatalogError, match="no head"):
        query.edges_into(con, "9.9")
    with pytest.raises(CatalogError, match="role"):
        query.edges_from(con, "0.0", role="nobody")


def test_query_modules_import_no_torch_or_pandas():
    code = ("import catalog.cli.query, catalog.read.query, catalog.read.trace, catalog.formats.graph, sys; "
            "heavy = [m for m in ('torch', 'pandas', 'transformer_lens', 'transformers', 'sqlalchemy', "
            "'networkx', 'matplotlib') if m in sys.modules]; assert not heavy, heavy")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr


def test_docs_sql_examples_run(catalog_db, tmp_path):
    """Every ```sql block of docs/query.md runs against a catalog (the docs cannot go stale)."""
    blocks = re.findall(r"```sql\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 4
    with duckdb.connect(str(catalog_db), read_only=True) as con:
        for block in blocks:
            for statement in con.extract_statements(block.replace("'/tmp/", f"'{tmp_path}/")):
                con.execute(statement).fetchall()


def test_empty_answers_explain_themselves(catalog_db, con):
    """An empty edges answer says why, on stderr, and in the table's notes (issue 10, point 3)."""
    silent = fetch_dicts(catalog_db, """
        SELECT l.layer, h.head FROM range(3) l(layer), range(4) h(head)
        WHERE (l.layer, h.head) NOT IN (SELECT (layer, head) FROM firings WHERE run_id = ?)
        ORDER BY l.layer DESC, h.head""", [LATEST_RUN])
    if silent:
        name = f"{silent[0]['layer']}.{silent[0]['head']}"
        table = query.edges_into(con, name)
        assert table.num_rows == 0
        assert query.result_notes(table) == [f"L{silent[0]['layer']}H{silent[0]['head']} never fires in run "
                                              f"{LATEST_RUN}, so nothing feeds it"]
    result = invoke("edges", "--db", catalog_db, "--into", "0.0")
    assert result.exit_code == 0 and "(no rows)" in result.stdout
    assert "note: L0H0 " in result.stderr and ("layer 0" in result.stderr or "never fires" in result.stderr)
    head = busiest_heads(catalog_db)[0]
    sides = {r["side"] for r in query.edges_into(con, head).to_pylist()}
    roles_seen = {r["token_role"] for r in query.edges_from(con, head).to_pylist()}
    # A role the run has, with a side that has no edge of that role: the note names the role.
    for role in ("IO", "S1", "S2", "end"):
        table = query.edges_into(con, head, side="key", role=role)
        if not table.num_rows:
            assert f"none whose token has role {role}" in query.result_notes(table)[0] or "key side" in \
                query.result_notes(table)[0]
            break
    assert sides and roles_seen is not None


def test_top_and_min_effect_say_what_they_left_out(catalog_db, con):
    head = busiest_heads(catalog_db)[0]
    full = query.edges_into(con, head)
    top = query.edges_into(con, head, top=1)
    left_out = lambda table: [n for n in query.result_notes(table) if "(side_shares)" not in n]  # noqa: E731
    assert left_out(full) == []
    if full.num_rows > 1:
        assert left_out(top) == [f"showing the first 1 of {full.num_rows} rows (top 1)"]
        result = invoke("edges", "--db", catalog_db, "--into", head, "--top", "1", "--format", "csv")
        assert f"note: showing the first 1 of {full.num_rows} rows" in result.stderr

"""Migration 010 stores edge_svs as one row per edge (table edge_sv_lists) and keeps `edge_svs`
as a view with the same rows: an older catalog upgraded in place answers every question as
before, and a batch written through the store reads back unchanged."""

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from _catalog_fixture import busiest_heads

from catalog.read import query
from catalog.read.trace import trace
from catalog.schema.rows import edge_sv_lists
from catalog.store import Catalog, apply_migrations, schema_version

# an ACC++-like edge whose ranks are the greedy's order, not 0..n-1, and one with a single direction
UNEVEN = [(2, 0, 900, 3, 7, 0.125), (2, 0, 900, 5, 2, -0.5), (2, 0, 900, 9, 7, 0.25), (2, 0, 901, 0, 11, 1.5)]


@pytest.fixture
def v9_catalog(catalog_db, tmp_path):
    """The real test catalog (two ingested runs) rewritten as a version-9 catalog: every table
    created by migrations 1..9, edge_svs a table of rows again; plus the UNEVEN rows."""
    path = tmp_path / "v10.duckdb"
    con = duckdb.connect(str(path))
    apply_migrations(con, upto=9)
    con.execute(f"ATTACH '{catalog_db}' AS src (READ_ONLY)")
    tables = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
                                        "AND table_name <> 'schema_migrations'").fetchall()]
    assert "edge_svs" in tables and "edge_sv_lists" not in tables
    for table in sorted(tables, key=lambda t: (t not in ("models", "runs"), t != "models")):  # referenced first
        con.execute(f"INSERT INTO {table} SELECT * FROM src.{table}")
    con.execute("INSERT INTO edge_svs VALUES " + ", ".join(str(row) for row in UNEVEN))
    con.execute("DETACH src")
    con.close()
    return path


def _rows(con):
    """Every row of edge_svs, and of the two tables that lost their indexes."""
    return [con.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()
            for table in ("edge_svs", "firing_svs", "side_shares")]


# What the readers join on an older catalog, which has only the rows: the edges' lists built from
# them in the connection (a temporary view; the stored ones are checked row by row above).
LISTS_OF_ROWS = """CREATE TEMPORARY VIEW edge_sv_lists AS
    SELECT run_id, prompt_id, edge_id, list(sv ORDER BY rank) AS svs, list(weight ORDER BY rank) AS weights,
           list(rank ORDER BY rank) AS ranks
    FROM edge_svs GROUP BY ALL"""


def _answers(path, older=False):
    """What the query layer answers on the catalog: edges into and from its busiest heads, their
    summaries, a trace (every table compared as rows)."""
    heads = busiest_heads(path)[:2]
    with duckdb.connect(str(path), read_only=True) as con:  # not open_readonly: it refuses an old version
        if older:
            con.execute(LISTS_OF_ROWS)
        found = {}
        for head in heads:
            found[f"into {head}"] = query.edges_into(con, head).to_pylist()
            found[f"from {head}"] = query.edges_from(con, head).to_pylist()
            found[f"head {head}"] = {k: t.to_pylist() for k, t in query.head_summary(con, head).items()}
        graph = trace(con, roots=heads[:1], dest_role=None, src_role=None)
        found["trace"] = (graph.nodes.to_pylist(), graph.edges.to_pylist(), graph.notes)
    return found


def test_migration_10_keeps_every_row_and_answer(v9_catalog):
    con = duckdb.connect(str(v9_catalog))
    before_rows = _rows(con)
    before_types = con.execute("SELECT table_name, column_name, data_type, CASE WHEN table_name <> 'edge_svs' THEN is_nullable END "
                       "FROM information_schema.columns "
                               "WHERE table_name IN ('edge_svs', 'firing_svs', 'side_shares') ORDER BY ALL").fetchall()
    con.close()
    before = _answers(v9_catalog, older=True)

    con = duckdb.connect(str(v9_catalog))
    applied = apply_migrations(con)
    assert applied[0] == 10 and schema_version(con) == applied[-1]
    assert _rows(con) == before_rows and min(len(rows) for rows in before_rows) > 100
    # the same columns and types (nullability too, but a view's columns all say they are nullable);
    # firing_svs and side_shares without a primary key
    assert not con.execute("SELECT table_name FROM duckdb_constraints() WHERE constraint_type = 'PRIMARY KEY' "
                           "AND table_name IN ('firing_svs', 'side_shares', 'edge_sv_lists')").fetchall()
    assert con.execute("SELECT table_name, column_name, data_type, CASE WHEN table_name <> 'edge_svs' THEN is_nullable END "
                       "FROM information_schema.columns "
                       "WHERE table_name IN ('edge_svs', 'firing_svs', 'side_shares') ORDER BY ALL").fetchall() == before_types
    assert con.execute("SELECT table_type FROM information_schema.tables WHERE table_name = 'edge_svs'").fetchall() == [
        ("VIEW",)]
    # one stored row per edge with directions; ranks kept only where they are not 0..n-1
    n_edges = con.execute("SELECT count(DISTINCT (run_id, prompt_id, edge_id)) FROM edge_svs").fetchone()[0]
    assert con.execute("SELECT count(*) FROM edge_sv_lists").fetchone()[0] == n_edges
    assert con.execute("SELECT edge_id, ranks FROM edge_sv_lists WHERE ranks IS NOT NULL").fetchall() == [
        (900, [3, 5, 9])]
    con.close()
    assert _answers(v9_catalog) == before


def test_a_batch_written_through_the_store_reads_back_as_rows(tmp_path):
    """edge_svs rows in any order, some edges with uneven ranks, go in through write_batch and the
    view gives exactly them back."""
    rng = np.random.default_rng(0)
    rows = []
    for prompt in range(3):
        for edge in range(40):
            n = int(rng.integers(1, 6))
            ranks = sorted(rng.choice(12, n, replace=False)) if edge % 7 == 0 else range(n)
            rows += [(prompt, edge, int(r), int(rng.integers(0, 64)), float(np.float32(rng.normal()))) for r in ranks]
    shuffled = [rows[i] for i in rng.permutation(len(rows))]
    data = pa.table({name: pa.array([r[i] for r in shuffled], type_) for i, (name, type_) in enumerate(
        [("prompt_id", pa.int32()), ("edge_id", pa.int32()), ("rank", pa.int16()), ("sv", pa.int16()),
         ("weight", pa.float32())])})
    assert edge_sv_lists(data).num_rows == 3 * 40
    empty = pa.table({"prompt_id": pa.array([], pa.int32())})
    with Catalog(tmp_path / "c.duckdb") as cat:
        cat.con.execute("INSERT INTO models (model_id, name, n_layers, n_heads, d_model, d_head, weights_digest, "
                        "processing) VALUES (1, 'm', 1, 1, 2, 2, 'd', 'p')")
        cat.con.execute("INSERT INTO runs (run_id, model_id, dataset, n_prompts, prompts_digest, batch_size, params, "
                        "status, package_version, started_at) VALUES (1, 1, 'x', 3, 'd', 3, '{}', 'running', '0', "
                        "current_timestamp)")
        cat.write_batch(1, 0, 0, 2, {"firings": empty, "edges": empty, "edge_svs": data})
        got = cat.con.execute("SELECT prompt_id, edge_id, rank, sv, weight FROM edge_svs ORDER BY ALL").fetchall()
    assert got == sorted(rows)

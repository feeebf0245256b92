"""Migration 004 upgrades a version-3 catalog in place and keeps every number of its runs."""

import duckdb
import pytest

from catalog.store import apply_migrations, schema_version


@pytest.fixture
def v3_catalog(tmp_path):
    """A version-3 catalog with one run of the 2024 method: two firings, three edges, their terms."""
    path = tmp_path / "v3.duckdb"
    con = duckdb.connect(str(path))
    apply_migrations(con, upto=3)
    con.execute("INSERT INTO models VALUES (1, 'gpt2', 2, 2, 4, 2, 'digest', 'fold', current_timestamp)")
    con.execute("INSERT INTO singular_vectors VALUES (1, 1, 0, 0, 2.5, [1, 0, 0, 0, 0], [0, 1, 0, 0, 0]), "
                "(1, 1, 0, 1, 1.5, [0, 1, 0, 0, 0], [1, 0, 0, 0, 0])")
    con.execute("""INSERT INTO runs VALUES (1, 1, 'ioi', 1, 0, 'pd', 0.5, 1.0, 0.7, true, 16, '{}', 'finished',
                   '0.1.0', current_timestamp, current_timestamp)""")
    con.execute("INSERT INTO run_batches VALUES (1, 0, 0, 0, 2, 3, current_timestamp)")
    con.execute("INSERT INTO prompts VALUES (1, 0, 'When Mary and John', 4, 3, 'ioi-01', 'ABBA')")
    con.execute("INSERT INTO tokens VALUES (1, 0, 0, 1, 'When', NULL), (1, 0, 1, 2, ' Mary', 'IO'), "
                "(1, 0, 2, 3, ' and', NULL), (1, 0, 3, 4, ' John', 'end')")
    con.execute("INSERT INTO firings VALUES (1, 0, 1, 0, 3, 1, 0.9, 4.0, 2), (1, 0, 1, 1, 2, 1, 0.8, 3.0, 1)")
    con.execute("INSERT INTO firing_svs VALUES (1, 0, 1, 0, 3, 1, 0, 1, 3.0, 1.0, 1.0), "
                "(1, 0, 1, 0, 3, 1, 1, 0, 1.0, 1.0, 1.0), (1, 0, 1, 1, 2, 1, 0, 0, 3.0, 1.0, 1.0)")
    con.execute("INSERT INTO edges VALUES (1, 0, 1, 0, 3, 1, 'query', 0, 1, 0.75), "
                "(1, 0, 1, 0, 3, 1, 'key', 0, 0, -0.25), (1, 0, 1, 1, 2, 1, 'key', 0, 1, 0.5)")
    con.execute("INSERT INTO edge_svs VALUES (1, 0, 1, 0, 3, 1, 'query', 0, 1, 1, 0.5), "
                "(1, 0, 1, 0, 3, 1, 'query', 0, 1, 0, 0.25), (1, 0, 1, 0, 3, 1, 'key', 0, 0, 1, -0.25), "
                "(1, 0, 1, 1, 2, 1, 'key', 0, 1, 0, 0.5)")
    con.close()
    return path


def test_migration_4_keeps_every_number(v3_catalog):
    con = duckdb.connect(str(v3_catalog))
    before = con.execute("""SELECT e.layer, e.head, e.dest_pos, e.src_pos, e.side, e.up_layer, e.up_head, e.weight,
                                   list(s.sv ORDER BY f.rank), list(s.weight ORDER BY f.rank)
                            FROM edges e JOIN edge_svs s USING (run_id, prompt_id, layer, head, dest_pos, src_pos,
                                                               side, up_layer, up_head)
                            JOIN firing_svs f USING (run_id, prompt_id, layer, head, dest_pos, src_pos, sv)
                            GROUP BY ALL ORDER BY ALL""").fetchall()
    firings = con.execute("SELECT * FROM firings ORDER BY ALL").fetchall()
    columns = ", ".join(r[0] for r in con.execute("DESCRIBE firings").fetchall())
    assert apply_migrations(con)[0] == 4 and schema_version(con) >= 4
    after = con.execute("""SELECT e.layer, e.head, e.dest_pos, e.src_pos, e.side, e.up_layer, e.up_head, e.weight,
                                  list(s.sv ORDER BY s.rank), list(s.weight ORDER BY s.rank)
                           FROM edges e JOIN edge_svs s USING (run_id, prompt_id, edge_id)
                           GROUP BY ALL ORDER BY ALL""").fetchall()
    assert after == before and len(after) == 3
    assert con.execute(f"SELECT {columns} FROM firings ORDER BY ALL").fetchall() == firings
    assert con.execute("SELECT DISTINCT up_kind, up_src_pos FROM edges").fetchall() == [("head", None)]
    # Edge ids are 0.. within the prompt, in (layer, head, dest, src, side, up_layer, up_head) order.
    assert con.execute("SELECT edge_id, head, side FROM edges ORDER BY edge_id").fetchall() == [
        (0, 0, "key"), (1, 0, "query"), (2, 1, "key")]
    assert con.execute("SELECT method, weight_unit, settings, attn_threshold FROM runs").fetchall() == [
        ("sad", "score", None, 0.5)]
    assert con.execute("SELECT DISTINCT form FROM singular_vectors").fetchall() == [("augmented",)]
    assert con.execute("SELECT text, logit_diff FROM prompts").fetchall() == [("When Mary and John", None)]
    assert con.execute("SELECT count(*) FROM run_batches").fetchall() == [(1,)]
    con.close()
    # The upgraded file opens again (nothing left in the write-ahead log that cannot be replayed).
    assert duckdb.connect(str(v3_catalog), read_only=True).execute("SELECT count(*) FROM edge_roles").fetchall() == [(3,)]

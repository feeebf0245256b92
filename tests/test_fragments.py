"""The SQL fragments the read side shares (catalog.read.fragments), run on tiny in-memory tables."""

from __future__ import annotations

import duckdb
import pytest

from catalog.read import fragments


@pytest.fixture
def con():
    con = duckdb.connect()
    con.execute("""CREATE TABLE edges AS SELECT * FROM (VALUES
        (1, 0, 10, 5, 2, 'query'), (1, 0, 11, 5, 2, 'key')) t(run_id, prompt_id, edge_id, dest_pos, src_pos, side)""")
    con.execute("""CREATE TABLE tokens AS SELECT * FROM (VALUES
        (1, 0, 2, 'IO'), (1, 0, 5, 'end')) t(run_id, prompt_id, pos, role)""")
    con.execute("""CREATE TABLE interventions AS SELECT * FROM (VALUES
        (1, 0, 10, 'local', false, 0.9, 0.4), (1, 0, 10, 'local', true, 0.9, 1.0), (1, 0, 10, 'global', false, 0.9, 0.8))
        t(run_id, prompt_id, edge_id, mode, boost, attn_before, attn_after)""")
    yield con
    con.close()


def test_an_edge_writes_to_the_destination_on_the_query_side_and_the_source_on_the_key_side(con):
    found = con.sql(f"SELECT e.side, t.role FROM edges e {fragments.edge_token_join('e', 't')} ORDER BY e.edge_id")
    assert found.fetchall() == [("query", "end"), ("key", "IO")]
    assert con.sql(f"SELECT {fragments.token_pos('e')} FROM edges e ORDER BY edge_id").fetchall() == [(5,), (2,)]


def test_the_effect_is_the_attention_drop_of_the_ablation_in_the_chosen_mode(con):
    sql = f"SELECT e.edge_id, {fragments.EFFECT} FROM edges e {fragments.effect_join('e')} ORDER BY e.edge_id"
    local = con.execute(sql.replace("$effect_mode", "?"), ["local"]).fetchall()
    assert [(edge, round(float(effect), 6) if effect is not None else None) for edge, effect in local] == [(10, 0.5), (11, None)]
    assert round(float(con.execute(sql.replace("$effect_mode", "?"), ["global"]).fetchall()[0][1]), 6) == 0.1


def test_top_svs_lists_the_largest_shares_first_and_keeps_n(con):
    sql = (f"SELECT {fragments.top_svs('sv', 'w', 'total', 'w DESC', '2')} "
           "FROM (VALUES (1, 0.5, 1.0), (2, 1.0, 1.0), (3, -0.5, 1.0)) t(sv, w, total)")
    assert con.execute(sql).fetchall()[0][0] == [{"sv": 2, "share": 1.0}, {"sv": 1, "share": 0.5}]


def test_component_and_head_names(con):
    sql = (f"SELECT {fragments.component_name()} FROM (VALUES ('head', 9, 9), ('mlp', 3, NULL), "
           "('attn_bias', 2, NULL), ('embed', NULL, NULL)) t(up_kind, up_layer, up_head)")
    assert [r[0] for r in con.sql(sql).fetchall()] == ["L9H9", "MLP 3", "b_O 2", "embed"]


def test_edges_of_firing_matches_only_the_firing_they_feed(con):
    sql = (f"SELECT e.edge_id FROM (VALUES (0, 9, 9, 5, 2)) r(prompt_id, layer, head, dest_pos, src_pos) "
           f"JOIN (SELECT *, 9 AS layer, 9 AS head FROM edges) e ON {fragments.edges_of_firing('e', 'r')}")
    assert con.execute(sql.replace("$run", "?"), [1]).fetchall() == [(10,), (11,)]
    assert con.execute(sql.replace("$run", "?"), [2]).fetchall() == []

"""Output that another tool reads back as stored: each format of catalog.formats.table read with json and
pandas and compared with the catalog's rows (float32 values exactly, at their own precision)."""

import io
import json
import re

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from catalog.cli import main
from catalog.formats.table import float32_text, render

FIRINGS = ("SELECT prompt_id, layer, head, dest_pos, src_pos, attn_weight, score, n_svs FROM firings "
           "WHERE run_id = 2 ORDER BY prompt_id, layer, head, dest_pos, src_pos")
# Lists and a list of structs per firing: its signal's directions and contributions.
SIGNALS = ("SELECT prompt_id, layer, head, dest_pos, src_pos, list(sv ORDER BY rank) AS svs, "
           "list(contribution ORDER BY rank) AS contributions, "
           "list({'sv': sv, 'contribution': contribution} ORDER BY rank) AS terms "
           "FROM firing_svs WHERE run_id = 2 GROUP BY ALL ORDER BY ALL LIMIT 200")
TOKENS = "SELECT prompt_id, pos, token, role FROM tokens WHERE run_id = 2 ORDER BY prompt_id, pos"


def stored(db, sql):
    with duckdb.connect(str(db), read_only=True) as con:
        cursor = con.execute(sql)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]


def sql_output(db, sql, fmt):
    result = CliRunner().invoke(main, ["sql", "--db", str(db), sql, "--format", fmt])
    assert result.exit_code == 0, result.output
    return result.stdout


def same_float32(a, b) -> bool:
    return np.float32(a) == np.float32(b)


def test_float32_text_is_short_and_exact():
    values = np.concatenate([np.random.default_rng(0).standard_normal(2000).astype(np.float32),
                             np.float32([0.1, 1e-8, 3.4028235e38, 1.17549435e-38, 6.1, 16777217])])
    for value in values:
        text = float32_text(float(value))
        assert np.float32(text) == value and np.float32(float(text)) == value
        assert len(re.sub(r"e.*|[-.]", "", text).lstrip("0")) <= 9
    assert float32_text(float(np.float32(0.1))) == "0.1"  # not 0.10000000149011612


def test_json_carries_float32_precision_and_reads_back_exactly(catalog_db):
    text = sql_output(catalog_db, FIRINGS, "json")
    got, want = json.loads(text), stored(catalog_db, FIRINGS)
    assert len(got) == len(want) > 50
    for g, w in zip(got, want):
        assert {k: g[k] for k in ("prompt_id", "layer", "head", "dest_pos", "src_pos", "n_svs")} == \
               {k: w[k] for k in ("prompt_id", "layer", "head", "dest_pos", "src_pos", "n_svs")}
        assert same_float32(g["attn_weight"], w["attn_weight"]) and same_float32(g["score"], w["score"])
    # no float64 noise: every number has at most 9 significant digits (float32 needs no more)
    for number in re.findall(r"-?\d+\.\d+(?:e[-+]?\d+)?", text):
        assert len(re.sub(r"e.*|[-.]", "", number).lstrip("0")) <= 9, number


def test_csv_reads_back_with_pandas(catalog_db):
    pd = pytest.importorskip("pandas")
    frame = pd.read_csv(io.StringIO(sql_output(catalog_db, FIRINGS, "csv")))
    want = stored(catalog_db, FIRINGS)
    assert len(frame) == len(want)
    for column in ("prompt_id", "layer", "head", "dest_pos", "src_pos", "n_svs"):
        assert frame[column].dtype.kind == "i" and frame[column].tolist() == [w[column] for w in want]
    for column in ("attn_weight", "score"):
        assert (frame[column].to_numpy().astype(np.float32) == np.float32([w[column] for w in want])).all()


def test_list_and_struct_cells_read_back_from_csv_and_json(catalog_db):
    pd = pytest.importorskip("pandas")
    want = stored(catalog_db, SIGNALS)
    frame = pd.read_csv(io.StringIO(sql_output(catalog_db, SIGNALS, "csv")))
    document = json.loads(sql_output(catalog_db, SIGNALS, "json"))
    assert len(frame) == len(document) == len(want) > 10
    for cells, row, w in zip(frame.to_dict("records"), document, want):
        svs, contributions, terms = (json.loads(cells[c]) for c in ("svs", "contributions", "terms"))
        for got in ((svs, contributions, terms), (row["svs"], row["contributions"], row["terms"])):
            assert got[0] == w["svs"]
            assert len(got[1]) == len(w["contributions"])
            assert all(same_float32(g, s) for g, s in zip(got[1], w["contributions"]))
            assert [t["sv"] for t in got[2]] == [t["sv"] for t in w["terms"]]
            assert all(same_float32(g["contribution"], s["contribution"]) for g, s in zip(got[2], w["terms"]))


def test_string_cells_keep_their_text(catalog_db):
    pd = pytest.importorskip("pandas")
    want = stored(catalog_db, TOKENS)
    frame = pd.read_csv(io.StringIO(sql_output(catalog_db, TOKENS, "csv")), dtype={"token": str, "role": str},
                        keep_default_na=False)
    assert frame["token"].tolist() == [w["token"] for w in want]  # leading spaces, quotes, commas kept
    assert frame["role"].tolist() == [w["role"] or "" for w in want]
    assert json.loads(sql_output(catalog_db, TOKENS, "json")) == want


def test_render_of_a_float32_table():
    table = pa.table({"x": pa.array([0.1, 6.1, None], pa.float32()), "name": ["6.10", "a,b", None],
                      "xs": pa.array([[0.1, 0.2], [], None], pa.list_(pa.float32()))})
    assert json.loads(render(table, "json")) == [{"x": 0.1, "name": "6.10", "xs": [0.1, 0.2]},
                                                 {"x": 6.1, "name": "a,b", "xs": []},
                                                 {"x": None, "name": None, "xs": None}]
    assert render(table, "csv").splitlines() == ["x,name,xs", '0.1,6.10,"[0.1, 0.2]"', '6.1,"a,b",[]', ",,"]

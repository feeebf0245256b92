"""The migrations are the source of the column types; the Arrow types writers use must agree.

A writer's Arrow type that differs from its DuckDB column is cast on insert, silently: a float64
written into a FLOAT column loses digits that a later reader thinks are stored, an int32 value
written into a SMALLINT column can overflow on some catalogs only. This test builds a fresh
catalog and holds every column a writer names against the type its migration declares.
"""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow as pa
import pytest

from catalog.schema.rows import TYPES, table
from catalog.store import Catalog

# Arrow type -> the DuckDB type a migration must declare for it.
DUCKDB_TYPE = {
    pa.int16(): "SMALLINT", pa.int32(): "INTEGER", pa.int64(): "BIGINT", pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE", pa.string(): "VARCHAR", pa.bool_(): "BOOLEAN", pa.list_(pa.float32()): "FLOAT[]",
}


@pytest.fixture(scope="module")
def schema(tmp_path_factory) -> dict[str, dict[str, str]]:
    """{table: {column: DuckDB type}} of a freshly migrated catalog."""
    cat = Catalog(tmp_path_factory.mktemp("schema") / "fresh.duckdb")
    try:
        rows = cat.con.execute("""SELECT table_name, column_name, data_type FROM information_schema.columns
                                  WHERE table_schema = 'main'""").fetchall()
        kinds = dict(cat.con.execute("SELECT table_name, table_type FROM information_schema.tables").fetchall())
    finally:
        cat.close()
    out: dict[str, dict[str, str]] = {}
    for name, column, data_type in rows:
        if kinds.get(name) in ("BASE TABLE", "VIEW"):  # edge_svs: a view over edge_sv_lists since 010
            out.setdefault(name, {})[column] = data_type
    return out


def _method_tables() -> dict[str, pa.Schema]:
    """The Arrow schema of every table the two methods write, keyed 'method/table'."""
    from catalog.methods.accpp.circuit import COLUMNS as ACCPP_COLUMNS
    from catalog.methods.sad.batch import COLUMNS as SAD_COLUMNS

    out = {f"sad/{name}": table(columns, []).schema for name, columns in SAD_COLUMNS.items()}
    for name, columns in ACCPP_COLUMNS.items():
        # circuit.py writes seeds.weight as float64 (a seed's weight is a logit-scale sum).
        override = {"weight": pa.float64()} if name == "seeds" else None
        out[f"accpp/{name}"] = table(columns, [], override).schema
    return out


def _ingest_tables() -> dict[str, pa.Schema]:
    """The prompts/tokens tables ingest builds, and the per-prompt outputs both methods write."""
    import torch

    from catalog.jobs.ingest import _prompt_tables
    from catalog.methods.shared.tensors import prompt_outputs
    from catalog.testing import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    item = SimpleNamespace(text="When Mary and John", template="t0", name_order="ABBA", roles={"IO": 1, "end": 3})
    prompts, tokens = _prompt_tables([item], [[1, 2, 3, 4]], [5], [6], tokenizer)
    outputs = prompt_outputs(torch.zeros(1, 4, 8), [3], [5], [6], [0], tokenizer)
    return {"ingest/prompts": prompts.schema, "ingest/tokens": tokens.schema, "outputs/prompts": outputs.schema}


def _mismatches(writers: dict[str, pa.Schema], schema: dict[str, dict[str, str]]) -> list[str]:
    problems = []
    for key, arrow in writers.items():
        name = key.split("/")[1]
        assert name in schema, f"{key}: no table {name} in a fresh catalog"
        for field in arrow:
            declared = schema[name].get(field.name)
            wanted = DUCKDB_TYPE.get(field.type)
            if declared is None:
                problems.append(f"{key}.{field.name}: no such column")
            elif declared != wanted:
                problems.append(f"{key}.{field.name}: written as {field.type}, declared {declared}")
    return problems


def test_every_method_column_has_the_type_its_migration_declares(schema):
    writers = _method_tables()
    assert {"sad/firings", "accpp/firing_sides", "accpp/seeds"} <= set(writers)
    assert _mismatches(writers, schema) == []


def test_prompt_token_and_output_columns_have_the_declared_types(schema):
    writers = _ingest_tables()
    assert "logit_diff" in writers["outputs/prompts"].names
    assert _mismatches(writers, schema) == []


def test_every_typed_column_exists_in_some_table(schema):
    columns = {column for table_columns in schema.values() for column in table_columns}
    assert set(TYPES) - columns == set()


def test_the_check_notices_a_wrong_type(schema):
    wrong = {"sad/firings": pa.schema([("score", pa.float64()), ("layer", pa.int32())])}
    assert _mismatches(wrong, schema) == ["sad/firings.score: written as double, declared FLOAT",
                                          "sad/firings.layer: written as int32, declared SMALLINT"]

"""Migration 006 upgrades a version-5 catalog in place: models become GPT-2 family rows, singular
vectors and firings position-free (pos_offset NULL), runs BOS-free; nothing else changes."""

import duckdb
import pytest
from test_migration_004 import v3_catalog  # noqa: F401  (the fixture: a version-3 catalog with one run)

from catalog.store import apply_migrations, schema_version

KEPT = ("models", "singular_vectors", "runs", "run_batches", "prompts", "tokens", "firings", "firing_svs",
        "edges", "edge_svs")


def _columns(con, table):
    return [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]


def test_migration_6_keeps_every_row_and_adds_the_family_columns(v3_catalog):  # noqa: F811
    con = duckdb.connect(str(v3_catalog))
    apply_migrations(con, upto=5)
    assert schema_version(con) == 5
    before = {t: (_columns(con, t), con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall()) for t in KEPT}
    assert apply_migrations(con, upto=6) == [6]
    for table, (columns, rows) in before.items():
        # the old columns, in their old order, hold the same rows
        assert con.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY ALL").fetchall() == rows, table
    assert con.execute("SELECT * FROM model_families").fetchall() == [
        (1, "gpt2", "learned", None, None, 2, "LayerNorm", False, pytest.approx(2 ** 0.5))]
    assert con.execute("SELECT DISTINCT pos_offset FROM singular_vectors").fetchall() == [(None,)]
    assert con.execute("SELECT DISTINCT pos_offset FROM firings").fetchall() == [(None,)]
    assert con.execute("SELECT has_bos FROM runs").fetchall() == [(False,)]
    # a rotary form may be stored beside the position-free one, a repeated rotary form may not
    con.execute("INSERT INTO singular_vectors VALUES (1, 'augmented', 0, 0, 3, 0, 1.0, [1], [1])")
    with pytest.raises(duckdb.ConstraintException):
        con.execute("INSERT INTO singular_vectors VALUES (1, 'augmented', 0, 0, 3, 0, 2.0, [1], [1])")
    con.close()

"""The catalog file: migrations, the read-only SQL command, and bad input at the CLI boundary."""

import hashlib

import duckdb
import pytest
from click.testing import CliRunner

from catalog.schema import tables
from catalog.cli import main
from catalog.errors import CatalogError
from catalog.store import LATEST_VERSION, Catalog, apply_migrations, migrations, open_readonly, schema_version


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line_error(result):
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def v1_catalog(tmp_path):
    """A catalog created at schema version 1, holding one model."""
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    assert apply_migrations(con, upto=1) == [1]
    con.execute("INSERT INTO models (model_id, name, n_layers, n_heads, d_model, d_head, weights_digest, processing)"
                " VALUES (1, 'old', 1, 1, 2, 1, 'abc', 'none')")
    con.execute("INSERT INTO singular_vectors VALUES (1, 0, 0, 0, 2.5, [1.0, 0.0, 0.0], [0.0, 1.0, 0.0])")
    con.close()
    return path


def test_opening_an_old_catalog_applies_missing_migrations(v1_catalog):
    with Catalog(v1_catalog) as cat:
        assert schema_version(cat.con) == LATEST_VERSION
        versions = cat.con.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
        assert [v for v, _ in versions] == [m.version for m in migrations()]  # every shipped one, in order
        assert cat.model_by_digest("abc")["name"] == "old"
        assert cat.con.execute("SELECT sigma, u FROM singular_vectors").fetchall() == [(2.5, [1.0, 0.0, 0.0])]
        names = {r[0] for r in cat.con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        assert {"runs", "firings", "edges", "edge_svs", "firing_roles", "edge_roles"} <= names


def test_read_only_commands_ask_for_migrate_and_migrate_upgrades(v1_catalog):
    with pytest.raises(CatalogError, match="circuit-catalog migrate"):
        open_readonly(v1_catalog)
    result = CliRunner().invoke(main, ["migrate", "--db", str(v1_catalog)])
    assert result.exit_code == 0 and f"now at version {LATEST_VERSION}" in result.output
    open_readonly(v1_catalog).close()


def test_a_failing_migration_leaves_the_catalog_at_its_version(v1_catalog, monkeypatch):
    import catalog.store as store

    broken = store.migrations()[:1] + [store.Migration(2, "broken", "CREATE TABLE x (a INT); SELECT nonsense;")]
    monkeypatch.setattr(store, "migrations", lambda: broken)
    con = duckdb.connect(str(v1_catalog))
    with pytest.raises(duckdb.Error):
        apply_migrations(con)
    assert schema_version(con) == 1
    assert not con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'x'").fetchall()[0][0]
    con.close()


def test_a_migration_numbered_below_the_latest_that_arrives_later_is_applied(v1_catalog, monkeypatch):
    """Branches merged one after another can ship migration N after a catalog already has N + 1:
    the missing one is still applied (by the versions recorded, not the highest), and read-only
    commands ask for migrate until it is."""
    import catalog.store as store

    upgraded = store.upgrade(v1_catalog)
    shipped = store.migrations()
    gap = next(v for v in range(1, LATEST_VERSION + 2) if v not in {m.version for m in shipped})
    later = store.Migration(gap, "merged_later", "CREATE TABLE merged_later (a INTEGER);")
    monkeypatch.setattr(store, "migrations", lambda: sorted(shipped + [later], key=lambda m: m.version))
    monkeypatch.setattr(store, "LATEST_VERSION", max(gap, LATEST_VERSION))  # no gap left: a new last one
    if gap < LATEST_VERSION:  # a true gap: the catalog already has a higher version
        assert max(upgraded) > gap
    with pytest.raises(CatalogError, match="circuit-catalog migrate"):
        open_readonly(v1_catalog)
    assert store.upgrade(v1_catalog) == [gap]
    open_readonly(v1_catalog).close()


def test_sqlalchemy_tables_mirror_the_migrations(tmp_path):
    with Catalog(tmp_path / "c.duckdb") as cat:
        for table in (tables.models, tables.runs):
            columns = [r[0] for r in cat.con.execute(f"DESCRIBE {table.name}").fetchall()]
            assert columns == [c.name for c in table.columns]


@pytest.fixture
def small_catalog(tmp_path):
    path = tmp_path / "c.duckdb"
    with Catalog(path) as cat:
        cat.con.execute("INSERT INTO models (model_id, name, n_layers, n_heads, d_model, d_head, weights_digest,"
                        " processing) VALUES (1, 'm', 2, 2, 4, 2, 'd', 'p')")
    return path


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_sql_answers_in_each_format(small_catalog, fmt):
    result = CliRunner().invoke(main, ["sql", "--db", str(small_catalog), "SELECT name, n_layers FROM models",
                                       "--format", fmt])
    assert result.exit_code == 0, result.output
    assert "m" in result.output and "2" in result.output
    if fmt == "json":
        import json

        assert json.loads(result.output) == [{"name": "m", "n_layers": 2}]
    if fmt == "csv":
        assert result.output.splitlines() == ["name,n_layers", "m,2"]


@pytest.mark.parametrize("statement", [
    "DELETE FROM models",
    "INSERT INTO models (model_id) VALUES (9)",
    "DROP TABLE models",
    "CREATE TABLE t AS SELECT 1",
    "UPDATE models SET name = 'x'",
    "SELECT 1; DELETE FROM models",
    "ATTACH 'other.duckdb' AS other",
    "COPY models TO 'out.csv'",
])
def test_sql_refuses_writes_and_leaves_the_file_untouched(small_catalog, statement):
    before = _digest(small_catalog)
    result = CliRunner().invoke(main, ["sql", "--db", str(small_catalog), statement])
    assert "read-only" in _one_line_error(result)
    assert _digest(small_catalog) == before


@pytest.mark.parametrize("args, message", [
    (["sql", "--db", "{missing}", "SELECT 1"], "no catalog at"),
    (["sql", "--db", "{corrupt}", "SELECT 1"], "not a readable DuckDB catalog"),
    (["sql", "--db", "{catalog}", "SELEC nonsense"], "SQL error"),
    (["sql", "--db", "{catalog}", "SELECT * FROM no_such_table"], "SQL error"),
    (["migrate", "--db", "{missing}"], "no catalog at"),
])
def test_bad_input_gives_one_line_error(tmp_path, small_catalog, args, message):
    corrupt = tmp_path / "corrupt.duckdb"
    corrupt.write_bytes(b"this is not a database" * 100)
    paths = {"missing": tmp_path / "none.duckdb", "corrupt": corrupt, "catalog": small_catalog}
    argv = [a.format(**paths) for a in args]
    before = _digest(corrupt)
    assert message in _one_line_error(CliRunner().invoke(main, argv))
    assert _digest(corrupt) == before
    assert not paths["missing"].exists()

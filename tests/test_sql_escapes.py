"""User SQL is read-only by construction, on both faces (the `sql` command and POST /api/v1/sql):
every escape attempt below is refused with one line by both, nothing changes afterwards (no
setting, no file, no table), and no answer or error carries a path of the machine."""

from __future__ import annotations

import shutil

import httpx
import pytest

from _catalog_fixture import invoke
from catalog.testing.service import ServerProcess

TOKEN = "escape-test-token"

ESCAPES = [
    # settings, directly and inside EXPLAIN ANALYZE (which runs its statement)
    "SET threads = 1",
    "SET memory_limit = '50MB'",
    "RESET threads",
    "PRAGMA threads = 1",
    "PRAGMA memory_limit = '50MB'",
    "EXPLAIN ANALYZE SET threads = 1",
    "EXPLAIN ANALYZE SET memory_limit = '50MB'",
    "EXPLAIN ANALYZE PRAGMA threads = 1",
    "explain   analyse set threads=1",
    "EXPLAIN (FORMAT json) SET threads = 1",
    "SET enable_external_access = true",
    "SET lock_configuration = false",
    "SET VARIABLE leak = 1",
    "PRAGMA enable_profiling",
    "PRAGMA enable_profiling = 'json'",
    "PRAGMA profiling_output = 'profile.json'",
    "PRAGMA database_list",
    "USE system",
    # writes to the file and to temporary objects
    "CHECKPOINT",
    "FORCE CHECKPOINT",
    "EXPLAIN ANALYZE CHECKPOINT",
    "CALL checkpoint()",
    "CALL force_checkpoint()",
    "SELECT * FROM checkpoint()",
    "CREATE TEMP TABLE t AS SELECT 1",
    "CREATE TEMP MACRO m() AS 1",
    "CREATE MACRO m2() AS 1",
    "CREATE VIEW v AS SELECT 1",
    "CREATE SEQUENCE s",
    "EXPLAIN ANALYZE CREATE TEMP TABLE t2 AS SELECT 1",
    "INSERT INTO runs SELECT * FROM runs",
    "DELETE FROM firings",
    "UPDATE runs SET status = 'x'",
    "DROP TABLE firings",
    "ALTER TABLE runs ADD COLUMN x INTEGER",
    "VACUUM",
    "ANALYZE",
    "BEGIN TRANSACTION",
    "PREPARE p AS SELECT 1",
    "SELECT 1; DROP TABLE firings",
    # files, other databases, extensions
    "COPY (SELECT 1) TO 'x.csv'",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO 'x.csv'",
    "COPY runs FROM 'x.csv'",
    "EXPORT DATABASE 'exported'",
    "IMPORT DATABASE 'exported'",
    "ATTACH 'other.duckdb' AS other",
    "ATTACH ':memory:' AS mem",
    "DETACH system",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_blob('/etc/passwd')",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_csv_auto('/etc/passwd')",
    "SELECT * FROM read_json_auto('/etc/passwd')",
    "SELECT * FROM read_parquet('x.parquet')",
    "SELECT * FROM parquet_metadata('x.parquet')",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM sniff_csv('/etc/passwd')",
    "SELECT * FROM '/etc/passwd'",
    "SELECT * FROM 'x.csv'",
    "SELECT (SELECT count(*) FROM read_text('/etc/passwd'))",
    "WITH f AS (SELECT * FROM read_text('/etc/passwd')) SELECT * FROM f",
    "EXPLAIN ANALYZE SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM query('SET threads = 1')",
    "SELECT * FROM query_table('runs')",
    "SELECT getenv('HOME')",
    "SELECT * FROM pragma_database_list()",
    "CALL pragma_database_list()",
    "PIVOT runs ON status USING count(*)",
]


@pytest.fixture(scope="module")
def faces(catalog_db, tmp_path_factory):
    """(cli_db, client): a copy for the CLI (read in this process) and a served copy."""
    folder = tmp_path_factory.mktemp("escapes")
    cli_db, served_db = folder / "cli.duckdb", folder / "served.duckdb"
    shutil.copy(catalog_db, cli_db)
    shutil.copy(catalog_db, served_db)
    server = ServerProcess(served_db, token=TOKEN)
    client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    try:
        yield cli_db, client
    finally:
        client.close()
        server.stop()


def cli_sql(db, text):
    return invoke("sql", "--db", db, text)


def service_sql(client, text):
    return client.post("/api/v1/sql", json={"sql": text})


def test_the_list_is_long_enough():
    assert len(ESCAPES) >= 40 and len(set(ESCAPES)) == len(ESCAPES)


@pytest.mark.parametrize("text", ESCAPES)
def test_both_faces_refuse(faces, text, tmp_path, monkeypatch):
    cli_db, client = faces
    monkeypatch.chdir(tmp_path)  # where a relative file would be written
    result = cli_sql(cli_db, text)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    response = service_sql(client, text)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"} and "\n" not in response.json()["error"]
    assert list(tmp_path.iterdir()) == []  # nothing written here by the CLI


def test_nothing_changed_afterwards(faces):
    cli_db, client = faces
    settings = "SELECT current_setting('threads') AS threads, current_setting('memory_limit') AS memory"
    before = service_sql(client, settings).json()["rows"]
    for text in ESCAPES[:12]:
        service_sql(client, text)
    assert service_sql(client, settings).json()["rows"] == before
    assert service_sql(client, "SELECT count(*) AS n FROM duckdb_tables() WHERE temporary").json()["rows"] == [{"n": 0}]
    assert service_sql(client, "SELECT count(*) AS n FROM firings").json()["rows"][0]["n"] > 0


ALLOWED = ["SELECT count(*) AS n FROM firings", "DESCRIBE runs", "SHOW TABLES", "SUMMARIZE runs",
           "FROM runs", "EXPLAIN SELECT 1", "EXPLAIN ANALYZE SELECT count(*) FROM edges",
           "PRAGMA table_info('runs')", "PRAGMA show_tables", "CALL duckdb_tables()",
           "SELECT * FROM pragma_table_info('runs')", "SELECT * FROM range(3)"]


@pytest.mark.parametrize("text", ALLOWED)
def test_both_faces_still_read(faces, text):
    cli_db, client = faces
    result = cli_sql(cli_db, text)
    assert result.exit_code == 0, result.output
    assert service_sql(client, text).status_code == 200


@pytest.mark.parametrize("text", ["SELECT * FROM duckdb_databases()", "SELECT * FROM duckdb_settings()",
                                  "SELECT current_setting('temp_directory') AS t", "SELECT * FROM no_such_table",
                                  "SELECT * FROM duckdb_extensions()"])
def test_no_path_of_the_machine_in_answers_or_errors(faces, text):
    cli_db, client = faces
    folder = str(cli_db.parent)
    served_folder = folder  # both copies live in the same folder
    result = cli_sql(cli_db, text)
    assert folder not in result.output and str(cli_db) not in result.output
    response = service_sql(client, text)
    assert served_folder not in response.text and "/root" not in response.text, response.text[:500]

"""Migration 007 adds the service's job table to a version-6 catalog and changes nothing else;
docs/schema.md documents every table, view and column a fresh catalog has, and the README lists its tables."""

import re
from pathlib import Path

import duckdb
from test_migration_004 import v3_catalog  # noqa: F401  (the fixture: a version-3 catalog with one run)

from catalog.store import Catalog, apply_migrations, schema_version

SCHEMA_DOC = Path(__file__).resolve().parents[1] / "docs" / "schema.md"


def _contents(con):
    tables = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
                                        "AND table_name <> 'service_jobs' ORDER BY 1").fetchall()]
    return {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in tables}


def test_migration_7_adds_an_empty_job_table_and_keeps_every_row(v3_catalog):  # noqa: F811
    con = duckdb.connect(str(v3_catalog))
    apply_migrations(con, upto=6)
    before = _contents(con)
    assert apply_migrations(con, upto=7) == [7] and schema_version(con) == 7
    assert _contents(con).keys() == before.keys()
    for table, rows in before.items():
        if table != "schema_migrations":
            assert _contents(con)[table] == rows, table
    assert con.execute("SELECT count(*) FROM service_jobs").fetchall() == [(0,)]
    con.close()


FIRING_KEY = {"run_id", "prompt_id", "layer", "head", "dest_pos", "src_pos"}  # a "firing key" row


def _documented() -> dict[str, set[str]]:
    """Section `### \\`name\\`` -> the column names in the first cell of its table's rows, with
    the document's two shorthands: a "firing key" row, and a view of "Every column of `table`"."""
    documented, extends, current = {}, {}, None
    for line in SCHEMA_DOC.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^### `(\w+)`", line)
        if heading:
            name = heading.group(1)
            current = documented.setdefault(name, set())
        elif line.startswith("## "):
            current = None
        elif current is not None and line.startswith("Every column of `"):
            extends[name] = re.match(r"Every column of `(\w+)`", line).group(1)
        elif current is not None and line.startswith("| "):
            first = line.split("|")[1]
            if first.strip().startswith("firing key"):
                current.update(FIRING_KEY)
            current.update(re.findall(r"`(\w+)`", first))
    for view, table in extends.items():
        documented[view] |= documented[table]
    return documented


def test_every_table_view_and_column_is_documented(tmp_path):
    with Catalog(tmp_path / "fresh.duckdb") as cat:
        columns = {}
        for table, column in cat.con.execute("SELECT table_name, column_name FROM information_schema.columns "
                                             "WHERE table_schema = 'main'").fetchall():
            columns.setdefault(table, set()).add(column)
    documented = _documented()
    assert set(columns) <= set(documented), sorted(set(columns) - set(documented))
    missing = {t: sorted(cols - documented[t]) for t, cols in columns.items() if cols - documented[t]}
    assert not missing, missing


def test_the_readme_lists_every_table(tmp_path):
    readme = (SCHEMA_DOC.parents[1] / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)? \|", readme, flags=re.M))
    listed = {name for pair in listed for name in pair if name}
    with Catalog(tmp_path / "fresh.duckdb") as cat:
        tables = {r[0] for r in cat.con.execute("SELECT table_name FROM information_schema.tables "
                                                "WHERE table_schema = 'main' AND table_type = 'BASE TABLE'").fetchall()}
    assert tables <= listed, sorted(tables - listed)

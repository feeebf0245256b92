"""scripts/compare_catalogs.py: same rows in any order are the same; a changed value is counted."""

import subprocess
import sys
from pathlib import Path

import duckdb

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_catalogs.py"


def _catalog(path: Path, rows: list[tuple], written_at: str) -> Path:
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE firings (prompt_id INTEGER, score FLOAT, role VARCHAR, written_at TIMESTAMP)")
        con.executemany(f"INSERT INTO firings VALUES (?, ?, ?, TIMESTAMP '{written_at}')", rows)
        con.execute("CREATE TABLE runs (run_id INTEGER, package_version VARCHAR)")
        con.execute(f"INSERT INTO runs VALUES (1, '{written_at}')")
    return path


def _compare(a, b, *extra):
    result = subprocess.run([sys.executable, str(SCRIPT), str(a), str(b), *extra], capture_output=True, text=True)
    return result.returncode, result.stdout.splitlines()


def test_rows_in_another_order_with_other_timestamps_are_the_same(tmp_path):
    a = _catalog(tmp_path / "a.duckdb", [(0, 1.5, "IO"), (1, -2.0, None)], "2024-01-01")
    b = _catalog(tmp_path / "b.duckdb", [(1, -2.0, None), (0, 1.5, "IO")], "2025-06-30")
    assert _compare(a, b) == (0, ["firings: same", "runs: same"])


def test_a_changed_float_differs_unless_within_rtol(tmp_path):
    a = _catalog(tmp_path / "a.duckdb", [(0, 1.5, "IO"), (1, -2.0, None), (2, 3.0, "S")], "2024-01-01")
    b = _catalog(tmp_path / "b.duckdb", [(0, 1.5, "IO"), (1, -2.0001, None), (2, 3.0, "S1")], "2024-01-01")
    assert _compare(a, b) == (1, ["firings: 2 rows differ", "runs: same"])
    code, lines = _compare(a, b, "--rtol", "1e-3")
    assert (code, lines[0]) == (1, "firings: 1 rows differ")  # the role still differs


def test_a_missing_catalog_is_one_error_line(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "x.duckdb"), str(tmp_path / "y.duckdb")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr == f"error: no catalog at {tmp_path / 'x.duckdb'}\n"

"""The catalog that test_query.py and test_trace.py read, built once per session by the real ingest.

A random 3-layer GPT-2 (4 heads, d_model 64) and two runs on IOI prompts: run 1 (4 prompts,
seed 1) and run 2 (8 prompts, seed 0), so that "the latest finished run" (run 2) differs from
an explicit --run 1. The `catalog_db` fixture that builds it lives in conftest.py (session
scope, shared by both test files); the helpers to read it are here.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
from click.testing import CliRunner

LATEST_RUN, OLDER_RUN = 2, 1


def fetch_dicts(db: Path, sql: str, params: list | None = None) -> list[dict]:
    """Rows of a direct SQL query (the tests' independent view of what is stored)."""
    with duckdb.connect(str(db), read_only=True) as con:  # a plain connection, as a notebook's
        cursor = con.execute(sql, params or [])
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]


def invoke(*args: str):
    """Run the CLI in-process; returns click's Result (exit_code, stdout, stderr, output)."""
    from catalog.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result) -> None:
    """A user mistake: non-zero exit, one line starting with 'error:', no traceback."""
    assert result.exit_code != 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def busiest_heads(db: Path, run_id: int = LATEST_RUN, min_layer: int = 1) -> list[str]:
    """Heads ("L.H") with edges, the most edges first: heads worth querying in a random model."""
    found = fetch_dicts(db, """
        SELECT layer, head, count(*) AS n FROM edges WHERE run_id = ? AND layer >= ?
        GROUP BY layer, head ORDER BY n DESC, layer DESC, head""", [run_id, min_layer])
    return [f"{r['layer']}.{r['head']}" for r in found]


def token_roles(db: Path, run_id: int = LATEST_RUN) -> dict[tuple[int, int], str | None]:
    """(prompt_id, pos) -> role."""
    return {(r["prompt_id"], r["pos"]): r["role"]
            for r in fetch_dicts(db, "SELECT prompt_id, pos, role FROM tokens WHERE run_id = ?", [run_id])}


def parse_svs(items: list[str]) -> list[tuple[int, float]]:
    """["3:0.45", ...] -> [(3, 0.45), ...]."""
    return [(int(sv), float(share)) for sv, share in (item.split(":") for item in items)]

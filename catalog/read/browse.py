"""Questions the service and its explorer ask beyond catalog.read.query: the run list with progress,
the layer x head grid, one firing with its sparse signal, one prompt with its tokens.

Same conventions as catalog.read.query: a DuckDB connection (read-only file, or a cursor of the
service's connection), `run_id` None for the latest finished run, heads as "L.H", CatalogError
for user mistakes. Plain SQL over the tables of docs/schema.md; rows of tables whose layout
changes between schema versions (edges) are read with `SELECT *` so that every column of the
installed version comes back.

    >>> from catalog.store import open_readonly
    >>> from catalog.read import browse as query_extra
    >>> con = open_readonly("ioi.duckdb")
    >>> query_extra.head_grid(con, dest_role="end").column_names      # doctest: +SKIP
    ['layer', 'head', 'n_firings', 'n_prompts', 'mean_n_svs']
"""

from __future__ import annotations

import pyarrow as pa

from catalog.errors import CatalogError
from catalog.read.fragments import same_form
from catalog.read.runs import (HEAD_TABLES, RUN_TABLES, NotFound, check_role, fetch, require_tables, resolve_run,
                               rows)


# Per run: prompts, firings and edges committed so far (run_batches is written with each batch).
_PROGRESS_SQL = """
SELECT r.run_id, r.n_prompts,
       coalesce(sum(b.last_prompt - b.first_prompt + 1), 0)::BIGINT AS prompts_done,
       count(b.batch) AS batches_done,
       coalesce(sum(b.n_firings), 0)::BIGINT AS firings,
       coalesce(sum(b.n_edges), 0)::BIGINT AS edges,
       r.status
FROM runs r LEFT JOIN run_batches b USING (run_id)
WHERE $run IS NULL OR r.run_id = $run
GROUP BY r.run_id, r.n_prompts, r.status
ORDER BY r.run_id
"""


def list_runs(con) -> pa.Table:
    """Every run: its row of `runs` (all columns), the model's name and shape, and its progress."""
    require_tables(con, RUN_TABLES + ("run_batches",))
    return fetch(con, f"""
        SELECT r.*, m.name AS model_name, m.n_layers, m.n_heads,
               p.prompts_done, p.batches_done, p.firings, p.edges
        FROM runs r JOIN models m USING (model_id)
        JOIN ({_PROGRESS_SQL}) p USING (run_id)
        ORDER BY r.run_id""", {"run": None})


def run_progress(con, run_id: int) -> dict:
    """prompts_done of n_prompts, batches_done, firings, edges, status of one run (NotFound if absent)."""
    require_tables(con, RUN_TABLES + ("run_batches",))
    found = fetch(con, _PROGRESS_SQL, {"run": int(run_id)}).to_pylist()
    if not found:
        raise NotFound(f"no run {run_id} in the catalog")
    return found[0]


def head_grid(con, run_id: int | None = None, dest_role: str | None = None,
              src_role: str | None = None) -> pa.Table:
    """Every head of the run's model with how often it fires (zero for heads that never do).

    Columns: layer, head, n_firings, n_prompts, mean_n_svs. `dest_role`/`src_role` keep firings
    whose destination/source token has that role ("which heads fire at end?").
    """
    run = resolve_run(con, run_id, HEAD_TABLES)
    check_role(con, run, dest_role)
    check_role(con, run, src_role)
    return fetch(con, """
        WITH heads AS (
            SELECT l.layer, h.head
            FROM range($n_layers) l(layer), range($n_heads) h(head)
        ),
        counts AS (
            SELECT layer, head, count(*) AS n_firings, count(DISTINCT prompt_id) AS n_prompts,
                   avg(n_svs) AS mean_n_svs
            FROM firing_roles
            WHERE run_id = $run AND ($dest_role IS NULL OR dest_role = $dest_role)
              AND ($src_role IS NULL OR src_role = $src_role)
            GROUP BY layer, head
        )
        SELECT h.layer::INTEGER AS layer, h.head::INTEGER AS head,
               coalesce(c.n_firings, 0) AS n_firings, coalesce(c.n_prompts, 0) AS n_prompts, c.mean_n_svs
        FROM heads h LEFT JOIN counts c ON c.layer = h.layer AND c.head = h.head
        ORDER BY h.layer, h.head""",
        {"run": run.run_id, "n_layers": run.n_layers, "n_heads": run.n_heads,
         "dest_role": dest_role, "src_role": src_role})


def head_firings(con, head: str, run_id: int | None = None, prompt_id: int | None = None,
                 limit: int = 50) -> pa.Table:
    """Firings of one head (with token roles and texts), strongest attention first."""
    run = resolve_run(con, run_id, HEAD_TABLES)
    layer, head_index = run.head(head)
    return fetch(con, """
        SELECT prompt_id, dest_pos, src_pos, dest_role, src_role, dest_token, src_token,
               attn_weight, score, n_svs
        FROM firing_roles
        WHERE run_id = $run AND layer = $layer AND head = $head AND ($prompt IS NULL OR prompt_id = $prompt)
        ORDER BY attn_weight DESC, prompt_id, dest_pos, src_pos
        LIMIT $limit""",
        {"run": run.run_id, "layer": layer, "head": head_index, "prompt": prompt_id, "limit": int(limit)})


def _firing_key(alias: str) -> str:
    """WHERE clause of one firing, on the parameters $run, $prompt, $layer, $head, $dest, $src."""
    return (f"{alias}run_id = $run AND {alias}prompt_id = $prompt AND {alias}layer = $layer "
            f"AND {alias}head = $head AND {alias}dest_pos = $dest AND {alias}src_pos = $src")


def firing(con, prompt_id: int, head: str, dest_pos: int, src_pos: int, run_id: int | None = None) -> dict:
    """One firing: its row (with token roles), its sparse signal (with sigma) and its edges.

    Returns {"run_id", "firing": {...}, "signal": Table, "edges": Table}; NotFound when the head
    did not fire from dest_pos to src_pos in that prompt.
    """
    run = resolve_run(con, run_id, HEAD_TABLES)
    layer, head_index = run.head(head)
    p = {"run": run.run_id, "model": run.model_id, "prompt": int(prompt_id), "layer": layer,
         "head": head_index, "dest": int(dest_pos), "src": int(src_pos), "form": run.sv_form}
    key = _firing_key("")
    found = fetch(con, f"SELECT * FROM firing_roles WHERE {key}", p).to_pylist()
    if not found:
        raise NotFound(f"head {layer}.{head_index} has no firing from {dest_pos} to {src_pos} "
                       f"in prompt {prompt_id} of run {run.run_id}")
    signal = fetch(con, f"""
        SELECT f.rank, f.sv, s.sigma, f.contribution, f.contribution / sum(f.contribution) OVER () AS share,
               f.dest_proj, f.src_proj
        FROM firing_svs f
        LEFT JOIN singular_vectors s ON s.model_id = $model AND s.form = $form AND s.layer = f.layer
             AND s.head = f.head AND s.sv = f.sv AND {same_form("s", "f")}
        WHERE {_firing_key("f.")}
        ORDER BY f.rank""", p)
    edges = fetch(con, f"SELECT * FROM edges WHERE {key} ORDER BY side, weight DESC", p)
    return {"run_id": run.run_id, "firing": found[0], "signal": signal, "edges": edges}


def prompt(con, prompt_id: int, run_id: int | None = None) -> dict:
    """One prompt: its row of `prompts` and its tokens with their roles (NotFound if absent)."""
    run = resolve_run(con, run_id, RUN_TABLES)
    p = {"run": run.run_id, "prompt": int(prompt_id)}
    found = fetch(con, "SELECT * FROM prompts WHERE run_id = $run AND prompt_id = $prompt", p).to_pylist()
    if not found:
        n = rows(con, "SELECT count(*) FROM prompts WHERE run_id = ?", [run.run_id])[0][0]
        raise NotFound(f"run {run.run_id} has no prompt {prompt_id} (prompts 0..{n - 1})")
    tokens = fetch(con, """
        SELECT pos, token_id, token, role FROM tokens WHERE run_id = $run AND prompt_id = $prompt ORDER BY pos""", p)
    return {"run_id": run.run_id, "prompt": found[0], "tokens": tokens}


def list_prompts(con, run_id: int | None = None, limit: int = 1000) -> pa.Table:
    """prompt_id, text, n_tokens of a run's prompts, in order (for a prompt picker)."""
    run = resolve_run(con, run_id, RUN_TABLES)
    return fetch(con, """
        SELECT prompt_id, text, n_tokens FROM prompts WHERE run_id = $run ORDER BY prompt_id LIMIT $limit""",
        {"run": run.run_id, "limit": int(limit)})


def run_roles(con, run_id: int | None = None) -> list[str]:
    """The token roles that occur in a run, in the order of their mean position (as they are read)."""
    run = resolve_run(con, run_id, RUN_TABLES)
    return [r[0] for r in rows(con, """
        SELECT role FROM tokens WHERE run_id = ? AND role IS NOT NULL
        GROUP BY role ORDER BY avg(pos), role""", [run.run_id])]

"""Overview commands: heads (every head of a run in one table) and diff (two runs compared).
Parsing and output only; the answers come from catalog.read.overview (Arrow tables).

Imports neither torch nor pandas: these commands must answer in well under a second.
"""

from __future__ import annotations

from contextlib import closing

import click

from catalog.read import overview as query_overview
from catalog.cli.query import db_option
from catalog import methods
from catalog.errors import CatalogError
from catalog.cli.output import format_option
from catalog.formats.table import render
from catalog.read.runs import resolve_run, rows
from catalog.store import open_readonly


def _note(text: str) -> None:
    click.echo(f"note: {text}", err=True)


@click.command()
@db_option
@click.option("--run", "run_id", type=int, default=None, help="Run id. Default: the latest finished run.")
@click.option("--sort", type=click.Choice(query_overview.HEAD_SORTS), default="head", show_default=True,
              help="Order: by head (layer, head), or most firings / edges in / edges out first.")
@format_option()
def heads(db_path, run_id, sort, fmt):
    """Every head of the run's model in one table: firings, token roles, signal size, edges.

    Heads that never fire are listed too (n_firings 0). The signal size is mean_n_svs for a
    2024-method run (singular vectors per sparse signal) and mean_atoms for an ACC++ run (atoms
    zeroed per firing side). roles: the head's most frequent dest_role->src_role pairs.

    Example: circuit-catalog heads --db ioi.duckdb --sort firings --format csv
    """
    with closing(open_readonly(db_path)) as con:
        run = resolve_run(con, run_id)
        table = query_overview.heads(con, run.run_id, sort=sort)
        method, n_prompts = rows(con, "SELECT coalesce(method, $2), (SELECT count(*) FROM prompts WHERE "
                                      "run_id = $1) FROM runs WHERE run_id = $1", [run.run_id, methods.DEFAULT])[0]
        notes = query_overview.heads_notes(con, run.run_id)
    _note(f"run {run.run_id} ({method}, {run.status}, {n_prompts} prompts): {run.n_layers}x{run.n_heads} heads")
    for note in notes:  # firings to attention sinks left out of the role pairs
        _note(note)
    click.echo(render(table, fmt))


@click.command()
@db_option
@click.option("--run", "runs", type=int, multiple=True, required=True, metavar="ID",
              help="A run to compare; give it twice: --run A --run B (changes are from A to B).")
@click.option("--show", type=click.Choice(["summary", "connections", "firings", "edges"]), default="summary",
              show_default=True, help="The counts per table; the edge counts per connection (upstream component -> "
                                      "head, side); or the firings or edges themselves.")
@click.option("--change", "changes", type=click.Choice(query_overview.CHANGES), multiple=True,
              help="With --show firings|edges: only these changes (repeatable). Default: added, removed, changed.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=1e-5, show_default=True,
              help="A weight (attention, score) counts as changed above this relative difference.")
@click.option("--top", type=click.IntRange(min=1), default=None,
              help="With --show connections|firings|edges: the first N rows.")
@format_option()
def diff(db_path, runs, show, changes, tolerance, top, fmt):
    """Compare two runs (two thresholds, say): firings and edges that appear, disappear or change.

    Prompts are matched by their text (prompt and edge ids are per run), firings on (layer,
    head, dest_pos, src_pos), edges on (layer, head, dest_pos, src_pos, side, up_kind, up_layer,
    up_head, up_src_pos). Only prompts that both runs hold are compared; a note says how many
    were left out. added: only in B; removed: only in A; changed: in both, other weight.

    \b
    Examples:
      circuit-catalog diff --db ioi.duckdb --run 1 --run 2
      circuit-catalog diff --db ioi.duckdb --run 1 --run 2 --show connections --top 10
      circuit-catalog diff --db ioi.duckdb --run 1 --run 2 --show edges --change added --top 20
    """
    if len(runs) != 2:
        raise CatalogError(f"give two runs to compare: --run A --run B ({len(runs)} given)")
    if changes and show in ("summary", "connections"):
        raise CatalogError("--change applies to --show firings or --show edges")
    if top is not None and show == "summary":
        raise CatalogError("--top applies to --show connections, firings or edges")
    run_a, run_b = runs
    with closing(open_readonly(db_path)) as con:
        if show == "summary":
            table = query_overview.diff_summary(con, run_a, run_b, tolerance=tolerance)
        elif show == "connections":
            table = query_overview.diff_connections(con, run_a, run_b, tolerance=tolerance, top=top)
        else:
            listing = query_overview.diff_firings if show == "firings" else query_overview.diff_edges
            table = listing(con, run_a, run_b, changes=changes or None, tolerance=tolerance, top=top)
        notes = query_overview.diff_notes(con, run_a, run_b)
    for note in notes:
        _note(note)
    click.echo(render(table, fmt))


COMMANDS = [heads, diff]

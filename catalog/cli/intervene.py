"""CLI command `intervene`: causal checks of a run's edges (catalog.jobs.intervene).

torch and transformer_lens are imported inside the command, never here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from catalog.cli.options import click_options
from catalog.jobs.settings import InterveneSettings


@click.command()
@click.option("--db", "db_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The catalog file (DuckDB).")
@click_options(InterveneSettings)
def intervene(db_path, **options):
    """Remove (or --boost) each selected edge's signal and store what changes in `interventions`.

    One row per edge, mode and direction: the downstream attention before and after, the signal's
    norm, norm_ratio and cos_sim of the patched input, the logit difference (answer - wrong)
    before and after, the KL divergence at the end token, and the largest logit change of the
    batch's other prompts (0). Edges already stored for this mode and direction are skipped.

    Example: circuit-catalog intervene --db ioi.duckdb --heads 9.9 --mode local
    """
    from catalog.jobs.intervene import intervene_run

    try:
        summary = intervene_run(db_path, **options, say=_progress)
        if _progress.shown:
            click.echo(err=True)  # end the progress line
    except KeyboardInterrupt:  # each batch of prompts is committed whole or not at all
        click.echo(f"interrupted: the batches committed so far are kept in {db_path}; run the same command "
                   "again to intervene on the rest", err=True)
        sys.exit(130)
    mode, direction = options["mode"], "boost" if options["boost"] else "ablate"
    notes = []
    if summary["already_stored"]:
        notes.append(f"{summary['already_stored']} already stored")
    if summary["skipped_offsets"]:
        notes.append(f"{summary['skipped_offsets']} AH-offset edges skipped (an offset cannot be intervened on globally)")
    change = summary["mean_attn_change"]
    rate = summary["stored"] / summary["intervene_s"] if summary["intervene_s"] else 0.0
    click.echo(
        f"run {summary['run_id']} ({summary['method']}), {mode} {direction}: {summary['stored']} of "
        f"{summary['selected']} selected edges intervened"
        + (f", mean attention change {change:+.4f}" if change is not None else "")
        + (f", {rate:.0f} edges/s" if rate else "")
        + (f" ({'; '.join(notes)})" if notes else "")
        + f", {summary['wall_s']:.1f} s -> {summary['db']}"
    )


def _progress(message: str) -> None:
    """One status line on stderr, rewritten after each committed batch."""
    click.echo(f"\r{message}", nl=False, err=True)
    _progress.shown = True


_progress.shown = False

COMMANDS = [intervene]

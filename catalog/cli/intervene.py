"""CLI command `intervene`: causal checks of a run's edges (catalog.jobs.intervene).

torch and transformer_lens are imported inside the command, never here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.option("--db", "db_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The catalog file (DuckDB).")
@click.option("--run", "run_id", type=int, default=None, help="Run id. Default: the latest finished run.")
@click.option("--mode", type=click.Choice(["local", "global"]), default="local", show_default=True,
              help="local: only the downstream head's query/key input; global: the upstream component's output.")
@click.option("--boost", is_flag=True, help="Add the signal once more instead of removing it (ablate).")
@click.option("--top-edges", type=int, default=None, metavar="N", help="The N heaviest edges of each prompt.")
@click.option("--min-weight", type=float, default=None, metavar="W", help="Edges of weight >= W.")
@click.option("--prompt", "prompt_id", type=int, default=None, metavar="P", help="Only prompt P.")
@click.option("--heads", default=None, metavar="L.H,...", help="Only edges into these downstream heads.")
@click.option("--model-path", type=click.Path(path_type=Path), default=None,
              help="The run's checkpoint directory, if not where the run recorded it.")
@click.option("--model", default=None, help="The run's model on the Hugging Face hub (default: the run's).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="Where the model runs (auto: cuda when a GPU is usable).")
@click.option("--batch-size", default=16, show_default=True, type=int, help="Prompts per clean pass and commit.")
def intervene(db_path, run_id, mode, boost, top_edges, min_weight, prompt_id, heads, model_path, model, device,
              batch_size):
    """Remove (or --boost) each selected edge's signal and store what changes in `interventions`.

    One row per edge, mode and direction: the downstream attention before and after, the signal's
    norm, norm_ratio and cos_sim of the patched input, the logit difference (answer - wrong)
    before and after, the KL divergence at the end token, and the largest logit change of the
    batch's other prompts (0). Edges already stored for this mode and direction are skipped.

    Example: circuit-catalog intervene --db ioi.duckdb --heads 9.9 --mode local
    """
    from catalog.jobs.intervene import intervene_run

    try:
        summary = intervene_run(db_path, run_id=run_id, mode=mode, boost=boost, top_edges=top_edges,
                                min_weight=min_weight, prompt_id=prompt_id, heads=heads, model=model,
                                model_path=model_path, device=device, batch_size=batch_size, say=_progress)
        if _progress.shown:
            click.echo(err=True)  # end the progress line
    except KeyboardInterrupt:  # each batch of prompts is committed whole or not at all
        click.echo(f"interrupted: the batches committed so far are kept in {db_path}; run the same command "
                   "again to intervene on the rest", err=True)
        sys.exit(130)
    direction = "boost" if boost else "ablate"
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

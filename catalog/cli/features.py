"""CLI commands `train-sae` and `features` (catalog.jobs.features; docs/features.md).

torch and transformer_lens are imported inside the commands, never here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from catalog.cli.output import format_option
from catalog.formats.table import render

_DB = click.option("--db", "db_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
                   help="The catalog file (DuckDB).")
_RUN = click.option("--run", "run_id", type=int, default=None, help="Run id (default: the latest finished run).")
_MODEL = click.option("--model", default=None, help="Hub name of the run's model (default: the run's own).")
_MODEL_PATH = click.option("--model-path", type=click.Path(path_type=Path), default=None,
                           help="Checkpoint of the run's model (default: the run's own).")
_DEVICE = click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
                       help="Where the model and the SAE run.")
_BATCH = click.option("--batch-size", type=int, default=16, show_default=True, help="Prompts per forward pass.")


@click.command("train-sae")
@_DB
@click.option("--layer", type=int, required=True, help="The layer whose attention output (hook_z, all heads) it reads.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="A new directory for the SAE (SAELens's format: cfg.json, sae_weights.safetensors).")
@click.option("--corpus", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A text file (one text a line) or JSONL of texts (\"text\" or \"prompt\"); default: the run's prompts.")
@_RUN
@click.option("--architecture", type=click.Choice(["topk", "jumprelu"]), default="topk", show_default=True,
              help="TopK (k features a token) or JumpReLU (learned thresholds, an L0 penalty).")
@click.option("--expansion", type=int, default=8, show_default=True, help="Features per input dimension (d_sae / d_in).")
@click.option("--k", type=int, default=16, show_default=True, help="topk: active features per token.")
@click.option("--l0-coefficient", type=float, default=1.0, show_default=True,
              help="jumprelu: weight of the L0 term against the squared error (activations scaled to mean squared norm d_in).")
@click.option("--steps", type=int, default=2000, show_default=True, help="Optimizer steps.")
@click.option("--train-batch", type=int, default=1024, show_default=True, help="Tokens per optimizer step.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initialisation and minibatches.")
@_MODEL
@_MODEL_PATH
@_DEVICE
@_BATCH
def train_sae(db_path, layer, out_dir, corpus, run_id, architecture, expansion, k, l0_coefficient, steps, train_batch,
              lr, seed, model, model_path, device, batch_size):
    """Train an attention-output SAE of one layer of the catalog's model and write it in SAELens's format.

    Prints its figures: fraction of variance explained, L0 (active features per token) and the change
    in the model's next-token loss when the layer's output is replaced by the reconstruction.

    Example: circuit-catalog train-sae --db ioi.duckdb --layer 5 --out saes/L5
    """
    from catalog.features.train import SaeTraining
    from catalog.jobs.features import train_sae_job

    settings = SaeTraining(architecture=architecture, expansion=expansion, k=k, l0_coefficient=l0_coefficient,
                           steps=steps, batch_size=train_batch, lr=lr, seed=seed)
    summary = train_sae_job(db_path, layer, out_dir, corpus=corpus, run_id=run_id, settings=settings, model=model,
                            model_path=model_path, device=device, batch_size=batch_size, say=_progress)
    if _progress.shown:
        click.echo(err=True)
    click.echo(f"layer {summary['layer']}: {summary['d_sae']} features, variance explained "
               f"{summary['fraction_variance_explained']:.3f}, L0 {summary['l0']:.1f}, loss change "
               f"{summary['loss_change']:+.4f} nats on {summary['n_tokens']} tokens (dictionary "
               f"{summary['dictionary_id']}), {summary['wall_s']:.1f} s -> {summary['out']}")


@click.command("features")
@_DB
@_RUN
@click.option("--sae", "sae_dirs", multiple=True, type=click.Path(path_type=Path),
              help="An attention-output SAE directory in SAELens's format (train-sae's, SAELens's, the hub's); "
                   "repeat for more layers.")
@click.option("--qk", "qk_dirs", multiple=True, type=click.Path(path_type=Path),
              help="A head's query/key transcoders (a directory train-qk wrote); repeat for more heads.")
@click.option("--pairs", "n_pairs", type=click.IntRange(min=1), default=10, show_default=True,
              help="--qk: feature pairs kept per firing (the largest by |part|; the others summed in one 'rest' row).")
@_MODEL
@_MODEL_PATH
@_DEVICE
@_BATCH
def features(db_path, run_id, sae_dirs, qk_dirs, n_pairs, model, model_path, device, batch_size):
    """Split every head edge of a run by the features of its upstream layer's SAE (table edge_features).

    Each edge gets one row per feature active at its token (its activation and its part of the
    weight, in total and per singular direction), and rows for the decoder bias, the
    reconstruction error and the appended constant: the parts add up to the edge's weight.

    Example: circuit-catalog features --db ioi.duckdb --sae saes/L5 --sae saes/L6
    """
    from catalog.jobs.features import features_run

    try:
        summary = features_run(db_path, list(sae_dirs), qk_dirs=list(qk_dirs), n_pairs=n_pairs, run_id=run_id,
                               model=model, model_path=model_path,
                               device=device, batch_size=batch_size, say=_progress)
    except KeyboardInterrupt:
        click.echo(f"interrupted: the batches committed so far are kept in {db_path}; run the same command again "
                   "for the rest", err=True)
        sys.exit(130)
    if _progress.shown:
        click.echo(err=True)
    note = f" ({summary['already_stored']} prompt-dictionary pairs already stored)" if summary["already_stored"] else ""
    dictionaries = ", ".join(f"L{layer}: {d}" for layer, d in sorted(summary["dictionaries"].items()))
    if sae_dirs:
        click.echo(f"run {summary['run_id']}: {summary['edges']} head edges split into {summary['rows']} rows by "
                   f"dictionaries {dictionaries}{note}, {summary['wall_s']:.1f} s -> {summary['db']}")
    if qk_dirs:
        qk = summary["qk"]
        again = f" ({qk['already_stored']} prompt-dictionary pairs already stored)" if qk["already_stored"] else ""
        click.echo(f"run {summary['run_id']}: {qk['firings']} firings split into {qk['pair_rows']} feature-pair rows"
                   f"{again}, {summary['wall_s']:.1f} s -> {summary['db']}")


@click.command("train-qk")
@_DB
@click.option("--heads", required=True, metavar="L.H,...", help="The heads whose query and key transcoders to train.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the transcoders: one subdirectory L{l}H{h} per head.")
@click.option("--corpus", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A text file or JSONL of texts; default: the run's prompts.")
@_RUN
@click.option("--expansion", type=int, default=8, show_default=True, help="Features per side per d_model dimension.")
@click.option("--k", type=int, default=8, show_default=True, help="Active features per token and side (TopK).")
@click.option("--steps", type=int, default=2000, show_default=True, help="Optimizer steps per side.")
@click.option("--train-batch", type=int, default=1024, show_default=True, help="Tokens per optimizer step.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initialisation and minibatches.")
@_MODEL
@_MODEL_PATH
@_DEVICE
@_BATCH
def train_qk(db_path, heads, out_dir, corpus, run_id, expansion, k, steps, train_batch, lr, seed, model, model_path,
             device, batch_size):
    """Train query and key transcoders for each head (learned-position models) and print their figures.

    Figures per head: the variance of its causal scores explained by the transcoders' q^ . k^, the
    mean KL divergence of its attention pattern, and L0 per side.

    Example: circuit-catalog train-qk --db ioi.duckdb --heads 9.9,9.6 --out qk/
    """
    from catalog.jobs.features_qk import train_qk_job

    summary = train_qk_job(db_path, heads, out_dir, corpus=corpus, run_id=run_id, expansion=expansion, k=k,
                           steps=steps, train_batch=train_batch, lr=lr, seed=seed, model=model, model_path=model_path,
                           device=device, batch_size=batch_size)
    for head in summary["heads"]:
        click.echo(f"{head['head']}: score variance explained {head['score_variance_explained']:.3f}, pattern KL "
                   f"{head['pattern_kl']:.4f} nats, L0 {head['l0_query']:.1f} (query) {head['l0_key']:.1f} (key) on "
                   f"{head['n_tokens']} tokens (dictionary {head['dictionary_id']}) -> {head['out']}")


@click.command("feature")
@_DB
@click.argument("name", metavar="DICTIONARY:FEATURE")
@_RUN
@click.option("--top", type=click.IntRange(min=1), default=None, help="Keep the first N rows.")
@format_option()
def feature(db_path, name, run_id, top, fmt):
    """Every edge (SAE) or firing (QK transcoders) of a run that one feature carries (d1:f17, or 1:17).

    An SAE feature: one row per downstream head, side, upstream head and token role: the prompts
    and edges, the feature's mean activation there, its part of their weight and its share,
    largest part first. A QK transcoder feature: one row per head, side and firing roles, from
    the kept pairs that use it (their part of the firings' scores).

    Example: circuit-catalog feature --db ioi.duckdb d1:f17
    """
    from catalog.errors import CatalogError
    from catalog.read.features import feature_edges, feature_firings
    from catalog.read.query import resolve_run, result_notes
    from catalog.store import open_readonly

    parts = name.lower().replace("d", "", 1).replace("f", "", 1).split(":")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise CatalogError(f"'{name}' is not a feature name: give DICTIONARY:FEATURE, e.g. d1:f17")
    con = open_readonly(db_path)
    try:
        run = resolve_run(con, run_id)
        kind = con.execute("SELECT kind FROM dictionaries WHERE dictionary_id = ?", [int(parts[0])]).fetchall()
        if not kind:
            raise CatalogError(f"no dictionary {parts[0]} in the catalog (see the dictionaries table)")
        show = feature_firings if kind[0][0] == "qk_transcoder" else feature_edges
        table = show(con, run, int(parts[0]), int(parts[1]), top)
    finally:
        con.close()
    for note in result_notes(table):
        click.echo(f"note: {note}", err=True)
    click.echo(render(table, fmt))


def _progress(message: str) -> None:
    click.echo(f"\r{message}", nl=False, err=True)
    _progress.shown = True


_progress.shown = False

COMMANDS = [train_sae, features, train_qk, feature]

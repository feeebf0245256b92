"""CLI commands that build or maintain a catalog: decompose, ingest, migrate, sql.

torch and transformer_lens are imported inside the commands that run a model, never here.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from catalog.errors import CatalogError
from catalog.cli.output import format_option
from catalog.formats.table import render

_db = click.option("--db", "db_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
                   help="The catalog file (DuckDB); created if missing.")


def _model_options(command):
    command = click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
                           show_default=True,
                           help="The model's weights and activations (bfloat16: see the README's numbers).")(command)
    command = click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu",
                           show_default=True, help="Where the model runs (auto: cuda when a GPU is usable).")(command)
    command = click.option("--model-path", type=click.Path(path_type=Path), default=None,
                           help="A local Hugging Face checkpoint directory (GPT-2, GPT-NeoX/Pythia, Llama, "
                                "Qwen2; no network access).")(command)
    return click.option("--model", default="gpt2", show_default=True,
                        help="Model name on the Hugging Face hub (or in its local cache), e.g. gpt2-medium, "
                             "EleutherAI/pythia-160m, Qwen/Qwen2.5-0.5B.")(command)


@click.command()
@_db
@_model_options
@click.option("--add-model", is_flag=True, help="Allow a second model in a catalog that already holds one.")
def decompose(db_path, model, model_path, device, dtype, add_model):
    """Store all singular triplets of every head's bias-augmented Omega~ (rotary models: their
    family only; their per-offset forms are stored by ingest as firings need them)."""
    from catalog.jobs.ingest import decompose_model
    from catalog.models.loading import check_family, load_model, resolve_device
    from catalog.store import Catalog, check_catalog_file

    started = time.perf_counter()
    check_catalog_file(db_path)
    resolve_device(device)  # a missing GPU, or a family not read, is said before the slow load
    check_family(model, model_path)
    say = lambda text: click.echo(text, err=True)  # status lines for the slow steps
    say(f"loading model {model_path or model} ...")
    lm = load_model(model, model_path, device=device, dtype=dtype)
    with Catalog(db_path) as cat:
        model_id, stored = decompose_model(cat, lm, add_model=add_model, say=say)
    what = "decomposed and stored" if stored else "already in the catalog (same weights), reused"
    if stored and lm.adapter.rotary is not None:
        what = f"stored ({lm.family}, rotary: per-offset forms are stored as ingest's firings need them)"
    click.echo(f"model {model_id} ({lm.name}, {lm.n_layers}x{lm.n_heads} heads, d_model {lm.d_model}): "
               f"{what}; {time.perf_counter() - started:.1f} s")


@click.command()
@click.option("--db", "db_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The catalog file (DuckDB); created if missing. Not with --server.")
@_model_options
@click.option("--dataset", default="ioi", show_default=True, help="Built-in prompt set (ioi).")
@click.option("--n-prompts", default=256, show_default=True, type=int, help="Prompts to generate.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the prompt generator.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help='A JSONL file: {"text": ..., "roles": {"IO": 2, ..., "end": 18}} per line.')
@click.option("--attn-threshold", default=0.5, show_default=True, type=float, help="Pattern weight of a firing.")
@click.option("--sv-threshold", default=1.0, show_default=True, type=float,
              help="Share of the score the sparse signal must exceed.")
@click.option("--edge-threshold", default=0.7, show_default=True, type=float,
              help="Share of a side's total the edges must carry.")
@click.option("--append-constant/--no-append-constant", default=True, show_default=True,
              help="Augment upstream outputs with a constant 1, as the reference implementation does.")
@click.option("--method", type=click.Choice(["sad", "accpp"]), default="sad", show_default=True,
              help="Tracing method: sad (2024, SPEC.md; the options above) or accpp (ACC++, ACCPP.md; the options below).")
@click.option("--threshold", default="dynamic", show_default=True,
              help="accpp: firing and greedy threshold, 'dynamic' = min(1, 2.5/(i+1)) at destination i, or a number.")
@click.option("--ig-steps", default=64, show_default=True, type=int,
              help="accpp: trapezoid intervals of the integrated gradients.")
@click.option("--seeding", type=click.Choice(["linear", "prob", "none"]), default="linear", show_default=True,
              help="accpp: root each prompt's circuit at the logit difference answer - wrong (linear), the "
                   "log-probability of a token (prob), or decompose only --heads (none).")
@click.option("--prob-target", type=click.Choice(["answer", "top1"]), default="answer", show_default=True,
              help="accpp, --seeding prob: the token whose probability is explained.")
@click.option("--tau", default=0.8, show_default=True, type=float,
              help="accpp, --seeding prob: share of the objective the seeds must remove.")
@click.option("--heads", default=None, metavar="L.H,...",
              help="accpp: also decompose every firing of these heads (e.g. 9.9,9.6,10.0).")
@click.option("--dest-roles", default=None, metavar="ROLE,...",
              help="accpp, with --heads: only their firings whose destination token has one of these roles.")
@click.option("--batch-size", default=16, show_default=True, type=int, help="Prompts per committed batch.")
@click.option("--add-model", is_flag=True, help="Allow a second model in a catalog that already holds one.")
@click.option("--new-run", is_flag=True, help="Ingest again even if the same run has already finished.")
@click.option("--server", metavar="URL", default=None,
              help="Submit to the `circuit-catalog serve` at URL and follow its progress (token: $CIRCUIT_CATALOG_TOKEN).")
def ingest(db_path, model, model_path, device, dtype, dataset, n_prompts, seed, prompts_file, attn_threshold, sv_threshold,
           edge_threshold, append_constant, method, threshold, ig_steps, seeding, prob_target, tau, heads,
           dest_roles, batch_size, add_model, new_run, server):
    """Run prompts through the model; store firings, sparse signals and traced edges (resumable)."""
    from catalog.jobs.ingest import Interrupted
    from catalog.jobs.ingest import ingest as run_ingest

    if (db_path is None) == (server is None):
        raise CatalogError("give --db FILE, or --server URL to submit to a running `circuit-catalog serve`")
    _check_method_options(method)
    settings = dict(model=model, model_path=model_path, dataset=dataset, n_prompts=n_prompts, seed=seed,
                    prompts_file=prompts_file, attn_threshold=attn_threshold, sv_threshold=sv_threshold,
                    edge_threshold=edge_threshold, append_constant=append_constant, batch_size=batch_size,
                    add_model=add_model, new_run=new_run)
    if (device, dtype) != ("cpu", "float32"):
        settings.update(device=device, dtype=dtype)
    if method != "sad":  # the 2024 method's calls stay as they were (the service's job settings too)
        settings.update(method=method, threshold=threshold, ig_steps=ig_steps, seeding=seeding,
                        prob_target=prob_target, tau=tau, heads=heads, dest_roles=dest_roles)
    try:
        if server is not None:  # the service holding the catalog runs the job; this only follows it
            from catalog.service.client import submit_and_follow

            summary = submit_and_follow(server, settings)
        else:
            summary = run_ingest(db_path, **settings, show_progress=True)
    except Interrupted as err:
        click.echo(str(err), err=True)
        sys.exit(130)
    except KeyboardInterrupt:  # before the first batch: nothing of this run was saved yet
        click.echo("interrupted before any batch was saved", err=True)
        sys.exit(130)
    if summary["already_finished"]:
        click.echo(f"run {summary['run_id']} with these prompts and settings is already finished "
                   "(--new-run to ingest again)")
    if summary.get("method") == "accpp":
        detail = f"{summary['firings']} firings decomposed, {summary['seeds']} seeds, {summary['edges']} edges"
    else:
        detail = (f"{summary['firings']} firings, mean signal size {summary['mean_signal_size']:.2f} "
                  f"singular vectors, {summary['edges']} edges")
    click.echo(summary_line(summary, detail))


def summary_line(summary: dict, detail: str) -> str:
    """The last line of an ingest. Its counts are always the whole run's; the time is this session's,
    or for a run found already finished, the run's own (finished_at - started_at)."""
    run, prompts, seconds = summary["run_id"], summary["prompts"], summary["wall_s"]
    if summary["already_finished"]:
        return f"run {run}: {prompts} prompts, {detail}; the run took {seconds:.1f} s -> {summary['db']}"
    if summary.get("resumed"):
        return (f"run {run} (resumed; counts are the whole run's): {prompts} prompts, {detail}; this session "
                f"{summary.get('prompts_this_session', 0)} prompts in {seconds:.1f} s -> {summary['db']}")
    return f"run {run}: {prompts} prompts, {detail}, {seconds:.1f} s -> {summary['db']}"


# Options that belong to one method only: given for the other, they would be ignored silently.
METHOD_OPTIONS = {
    "sad": ("attn_threshold", "sv_threshold", "edge_threshold", "append_constant"),
    "accpp": ("threshold", "ig_steps", "seeding", "prob_target", "tau", "heads", "dest_roles"),
}


def _check_method_options(method: str) -> None:
    """One error line for an option of the other method given on the command line."""
    ctx = click.get_current_context()
    for owner, names in METHOD_OPTIONS.items():
        for name in names:
            if owner != method and ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
                flag = "--" + name.replace("_", "-")
                raise CatalogError(f"{flag} applies to --method {owner}, not to --method {method}")


@click.command()
@click.option("--db", "db_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
def migrate(db_path):
    """Upgrade a catalog to the current schema version, in place."""
    from catalog.store import LATEST_VERSION, upgrade

    applied = upgrade(db_path)
    if applied:
        click.echo(f"{db_path}: applied migrations {', '.join(map(str, applied))}; now at version {LATEST_VERSION}")
    else:
        click.echo(f"{db_path}: already at version {LATEST_VERSION}")


@click.command()
@click.option("--db", "db_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.argument("query")
@format_option()
def sql(db_path, query, fmt):
    """Run a read-only SQL query (SELECT, WITH, DESCRIBE, SHOW, EXPLAIN, PRAGMA) against the catalog."""
    from catalog.store import read_only_query

    click.echo(render(read_only_query(db_path, query), fmt))


COMMANDS = [decompose, ingest, migrate, sql]

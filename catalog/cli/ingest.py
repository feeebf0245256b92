"""CLI commands that build or maintain a catalog: decompose, ingest, migrate, sql.

torch and transformer_lens are imported inside the commands that run a model, never here.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from catalog.cli.options import click_options
from catalog.errors import CatalogError
from catalog.cli.output import format_option
from catalog.formats.table import render
from catalog.jobs.settings import METHOD_OPTIONS_AFTER, MODEL_FIELDS, EngineSettings, IngestSettings
from catalog.methods import DEFAULT, REGISTRY, method
from catalog.settings import fields_of, flag_of

_db = click.option("--db", "db_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
                   help="The catalog file (DuckDB); created if missing.")


_model_options = click_options(IngestSettings, MODEL_FIELDS)


def _ingest_options(command):
    """ingest's options in the command line's order: the job's up to the prompts, the default
    method's, --method, every other method's (their help prefixed by the method's name), the rest."""
    names = [f.name for f in fields_of(IngestSettings) if f.name != "method"]
    split = names.index(METHOD_OPTIONS_AFTER) + 1
    groups = [click_options(IngestSettings, names[:split]), click_options(method(DEFAULT).settings),
              click_options(IngestSettings, ("method",))]
    groups += [click_options(m.settings, help_prefix=m.name) for m in REGISTRY.values() if m.name != DEFAULT]
    groups.append(click_options(IngestSettings, names[split:]))
    for group in reversed(groups):
        command = group(command)
    return command


@click.command()
@_db
@_model_options
@click_options(IngestSettings, ("add_model",))
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
@_ingest_options
@click.option("--server", metavar="URL", default=None,
              help="Submit to the `circuit-catalog serve` at URL and follow its progress (token: $CIRCUIT_CATALOG_TOKEN).")
@click_options(EngineSettings)
def ingest(db_path, server, engine, ray_address, workers, gpus_per_worker, **options):
    """Run prompts through the model; store firings, sparse signals and traced edges (resumable)."""
    from catalog.jobs.ingest import Interrupted
    from catalog.jobs.ingest import ingest as run_ingest

    if (db_path is None) == (server is None):
        raise CatalogError("give --db FILE, or --server URL to submit to a running `circuit-catalog serve`")
    chosen = method(options["method"])
    _check_method_options(chosen.name)
    settings = {f.name: options[f.name] for f in fields_of(IngestSettings)
                if f.name not in ("method", "device", "dtype")}
    if (options["device"], options["dtype"]) != ("cpu", "float32"):
        settings.update(device=options["device"], dtype=options["dtype"])
    if chosen.name != DEFAULT:  # the default method's calls stay as they were (the service's job settings too)
        settings.update(method=chosen.name)
    settings.update({f.name: options[f.name] for f in fields_of(chosen.settings)})
    runner = _engine(EngineSettings(engine=engine, ray_address=ray_address, workers=workers,
                                    gpus_per_worker=gpus_per_worker), server)
    try:
        if server is not None:  # the service holding the catalog runs the job; this only follows it
            from catalog.service.client import submit_and_follow

            summary = submit_and_follow(server, settings)
        else:
            summary = run_ingest(db_path, **settings, show_progress=True, engine=runner)
    except Interrupted as err:
        click.echo(str(err), err=True)
        sys.exit(130)
    except KeyboardInterrupt:  # before the first batch: nothing of this run was saved yet
        click.echo("interrupted before this session saved a batch: the catalog holds what it held before; "
                   "run the same command again to resume", err=True)
        sys.exit(130)
    if summary["already_finished"]:
        click.echo(f"run {summary['run_id']} with these prompts and settings is already finished "
                   "(--new-run to ingest again)")
    detail = method(summary.get("method")).summary_detail(summary)
    click.echo(summary_line(summary, detail))


def _engine(settings: EngineSettings, server: str | None):
    """The engine of --engine ray (None: batches run in this process); one error line for the
    Ray options given without it, or with --server (the service runs its jobs itself)."""
    from catalog.settings import check

    check(settings)
    ctx = click.get_current_context()
    given = [flag_of(f) for f in fields_of(EngineSettings)
             if f.name != "engine" and ctx.get_parameter_source(f.name) == click.core.ParameterSource.COMMANDLINE]
    if settings.engine != "ray":
        if given:
            raise CatalogError(f"{given[0]} applies to --engine ray")
        return None
    if server is not None:
        raise CatalogError("--engine ray runs the ingest here; with --server the service runs it")
    from catalog.jobs.ray_engine import RayEngine, import_ray

    import_ray()  # not installed: said before the model loads
    return RayEngine(settings)


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


def _check_method_options(chosen: str) -> None:
    """One error line for an option of another method given on the command line: it would be
    ignored silently."""
    ctx = click.get_current_context()
    own = {f.name for f in fields_of(method(chosen).settings)}
    for other in REGISTRY.values():
        for f in fields_of(other.settings):
            if f.name not in own and ctx.get_parameter_source(f.name) == click.core.ParameterSource.COMMANDLINE:
                raise CatalogError(f"{flag_of(f)} applies to --method {other.name}, not to --method {chosen}")


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

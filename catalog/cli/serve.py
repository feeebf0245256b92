"""CLI command `serve`: the catalog as an HTTP service with the circuit explorer (catalog.service)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import click

from catalog.service import TOKEN_ENV
from catalog.service.validation import DEFAULT_MAX_PROMPTS


@click.command()
@click.option("--db", "db_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The catalog file (DuckDB); created if missing. The service holds it while it runs.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--token", default=None, envvar=TOKEN_ENV, show_envvar=True,
              help="Every request must carry it: `Authorization: Bearer T`, or open /?token=T once in a browser.")
@click.option("--no-token", is_flag=True,
              help="Serve without a token: anyone who can reach the port may read and submit jobs.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Resume the catalog's unfinished runs (an interrupted ingest) at startup.")
@click.option("--sql-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Seconds a POST /api/v1/sql query may run before it is stopped.")
@click.option("--allow-dir", "allowed_dirs", multiple=True, metavar="DIR",
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A directory whose files (checkpoints, prompts files) submitted jobs may name; repeatable. "
                   "Without one, jobs may name no file (hub models and the built-in prompts only).")
@click.option("--max-prompts", default=DEFAULT_MAX_PROMPTS, show_default=True, type=click.IntRange(min=1),
              help="The most prompts one submitted job may ask for.")
def serve(db_path, host, port, token, no_token, resume, sql_timeout, allowed_dirs, max_prompts):
    """Serve the catalog: JSON API under /api/v1/, circuit explorer at /, ingest jobs.

    Reads see committed data while an ingest job writes. Ctrl-C or SIGTERM stops it cleanly:
    the batch being written commits, the run resumes on the next start (exit status 130 after
    Ctrl-C, 0 after SIGTERM).

    Example:

        circuit-catalog serve --db demo.duckdb --port 8000 --token s3cret

        circuit-catalog serve --db demo.duckdb --no-token   # loopback only, on purpose
    """
    from catalog.errors import CatalogError
    from catalog.service.server import serve as run_server

    if token and no_token:
        raise CatalogError("give --token or --no-token, not both")
    if not token and not no_token:
        raise CatalogError(f"serve needs a token: --token T (or ${TOKEN_ENV}), or --no-token to serve "
                           "without one on purpose")
    if no_token:
        click.echo("warning: serving without a token: any local process or user who can reach "
                   f"{host}:{port} can read the catalog and submit ingest jobs", err=True)

    def ready(url):
        where = f"{url}/?token={token}" if token else f"{url}/"
        click.echo(f"serving {db_path} at {url} (explorer: {where}; API: {url}/api/v1/, {url}/openapi.json; "
                   f"pid {os.getpid()})", err=True)

    stopped_by = run_server(db_path, host=host, port=port, token=token, resume=resume,
                            sql_timeout_s=sql_timeout, on_ready=ready, allowed_dirs=list(allowed_dirs),
                            max_prompts=max_prompts)
    names = ", ".join(signal.Signals(s).name for s in stopped_by)
    click.echo(f"stopped{' by ' + names if names else ''}: every committed batch is in {db_path}", err=True)
    # Ctrl-C ends with 130 as every command's Ctrl-C does; SIGTERM is a service manager's normal stop: 0.
    code = 130 if signal.SIGINT in stopped_by else 0
    if any(thread.name == "ingest-worker" and thread.is_alive() for thread in threading.enumerate()):
        # The worker was abandoned (see catalog.service.jobs): end now rather than let interpreter
        # shutdown wait on, or tear down under, a thread still inside a long call.
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        raise SystemExit(code)

COMMANDS = [serve]

"""The command line: argument parsing and output only; every command calls one library function.

Never imports torch or transformer_lens at module level: query commands must start fast.
User mistakes (CatalogError) become one line on stderr and exit status 1.
"""

from __future__ import annotations

import sys

import click

from catalog.errors import CatalogError


class _CatalogGroup(click.Group):
    """Turns CatalogError into one clear line and a non-zero exit, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CatalogError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)


@click.group(cls=_CatalogGroup)
@click.version_option(package_name="circuit-catalog")
def main():
    """circuit-catalog: which attention heads of a transformer talk to which, stored in DuckDB."""


def _add_commands(module_name: str) -> None:
    """Add the commands of a CLI module (each module lists its commands in COMMANDS)."""
    import importlib

    for command in importlib.import_module(module_name).COMMANDS:
        main.add_command(command)


for _module in ("catalog.cli_ingest", "catalog.cli_query", "catalog.cli_serve"):
    _add_commands(_module)


def entry() -> None:
    """Console-script entry point: run the CLI, then leave without a noisy interpreter shutdown.

    After a model has been loaded, DuckDB 2's nanobind bindings print a wall of benign
    "nanobind: leaked instances" lines while Python tears down modules. Everything is
    committed and closed by then, so the commands that ran a model exit directly.
    """
    import os

    try:
        main.main(prog_name="circuit-catalog")
        code = 0
    except SystemExit as stop:
        code = stop.code
    if isinstance(code, str):
        click.echo(code, err=True)
        code = 1
    code = code or 0
    if "torch" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

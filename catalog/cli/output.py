"""The CLI's side of output formats: the --format option (its choices from the registry,
catalog.formats) and the choice of a format from an output file's extension. Click lives here,
never below the CLI."""

from __future__ import annotations

from pathlib import Path

import click

from catalog.formats import GRAPH_FORMATS, TEXT_TABLE_FORMATS

TRACE_FORMATS = TEXT_TABLE_FORMATS + GRAPH_FORMATS


def format_option(choices: tuple[str, ...] = TEXT_TABLE_FORMATS, default: str = "table"):
    return click.option(
        "--format", "fmt", type=click.Choice(choices), default=default, show_default=True,
        help="Output format.",
    )


def format_from_out(fmt: str, out: str | None, formats: tuple[str, ...]) -> str:
    """Without --format, a file name's extension (c.png, c.html, c.graphml, ...) picks the format,
    so that `--out c.png` never writes a text table into a file named .png."""
    source = click.get_current_context().get_parameter_source("fmt")
    suffix = Path(out).suffix.lower().lstrip(".") if out else ""
    if source == click.core.ParameterSource.DEFAULT and suffix in formats and suffix != fmt:
        click.echo(f"note: --format {suffix}, from the extension of --out {out}", err=True)
        return suffix
    return fmt

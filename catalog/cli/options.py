"""Click options made from settings dataclasses (catalog.settings.option fields), so that a flag's
default, help and choices are the ones the library and the service use."""

from __future__ import annotations

from pathlib import Path

import click

from catalog.settings import fields_of, flag_of


def cli_default(default):
    """An empty tuple (nothing chosen) is an option not given: None on the command line."""
    return None if default == () else default


def click_option(field, help_prefix: str | None = None):
    """The click option of one settings field; help_prefix names the method the option belongs to."""
    meta, default = field.metadata, cli_default(field.default)
    help_text = _prefixed(meta["help"], help_prefix) if help_prefix else meta["help"]
    kind = meta.get("kind")
    extra = {"metavar": meta["metavar"]} if meta.get("metavar") else {}
    if isinstance(default, bool):
        if meta.get("negatable"):
            flag = flag_of(field)
            return click.option(f"{flag}/--no-{flag[2:]}", field.name, default=default, show_default=True,
                                help=help_text)
        return click.option(flag_of(field), field.name, is_flag=True, help=help_text)
    if meta.get("choices"):
        extra["type"] = click.Choice(list(meta["choices"]))
    elif kind is Path:
        extra["type"] = click.Path(path_type=Path)
    elif kind is not None:
        extra["type"] = kind
    elif default is not None:
        extra["type"] = type(default)
    if default is not None:
        extra["show_default"] = True
    return click.option(flag_of(field), field.name, default=default, help=help_text, **extra)


def click_options(settings_class, names=None, help_prefix: str | None = None):
    """A decorator adding the options of `settings_class` (only `names`, if given) in field order."""
    chosen = [f for f in fields_of(settings_class) if names is None or f.name in names]

    def decorate(command):
        for f in reversed(chosen):  # click lists the last-applied decorator first
            command = click_option(f, help_prefix)(command)
        return command

    return decorate


def _prefixed(text: str, method: str) -> str:
    """'Trapezoid intervals ...' -> 'accpp: trapezoid intervals ...'; a help that starts with its own
    condition ('--seeding prob: ...', 'With --heads: ...') joins it with a comma."""
    lowered = text[0].lower() + text[1:]
    condition = text.split(": ", 1)[0]
    joint = ", " if ": " in text and (condition.startswith("--") or condition.startswith("With ")) else ": "
    return f"{method}{joint}{lowered}"

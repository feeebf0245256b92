"""Settings stated once: a dataclass field per option, with its default, help, choices and rule.

A job's or a method's settings are a frozen dataclass whose fields are made by `option(...)`. The
command line's click options, the service's pydantic job model and the library's keyword
arguments are all generated from (or checked against) these fields, so a default is written in
one place. `check(settings)` applies every field's rule and raises one `CatalogError` line naming
the command-line flag, the same line from the CLI, the service and the Python API.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from catalog.errors import CatalogError


@dataclass(frozen=True)
class Rule:
    """A check on one value: `test(value)` must hold; `says` completes "--flag must ...". """

    test: Callable[[Any], bool]
    says: str


def in_unit_interval() -> Rule:
    return Rule(lambda v: 0 < v <= 1, "be in (0, 1]")


def positive() -> Rule:
    return Rule(lambda v: v > 0, "be positive")


def at_least(bound: int) -> Rule:
    return Rule(lambda v: v >= bound, f"be at least {bound}")


def option(default, help: str, *, choices: tuple | None = None, rules: tuple[Rule, ...] = (),
           flag: str | None = None, metavar: str | None = None, negatable: bool = False,
           kind: type | None = None):
    """A settings field. `kind` is the value's type where the annotation is not one click knows
    (e.g. a threshold that is a number or 'dynamic': kind=str, parsed by the settings' own check)."""
    return field(default=default, metadata={
        "help": help, "choices": choices, "rules": rules, "flag": flag, "metavar": metavar,
        "negatable": negatable, "kind": kind,
    })


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def fields_of(settings_class) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(settings_class) if "help" in f.metadata]


def defaults(settings_class) -> dict:
    return {f.name: f.default for f in fields_of(settings_class)}


def check(settings) -> None:
    """Every field's choices and rules, in field order; one CatalogError line for the first broken one."""
    for f in fields_of(type(settings)):
        value = getattr(settings, f.name)
        if value is None:
            continue
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise CatalogError(f"{flag_of(f)} must be one of {', '.join(map(str, choices))}, not '{value}'")
        for rule in f.metadata.get("rules") or ():
            try:
                holds = rule.test(value)
            except TypeError:
                holds = False
            if not holds:
                raise CatalogError(f"{flag_of(f)} must {rule.says}, got {value}")


def build(settings_class, values: dict | None = None, **kwargs):
    """A settings object from user values (a dict and/or keywords; unknown names are refused with
    one line), checked."""
    given = {**(values or {}), **kwargs}
    known = {f.name for f in dataclasses.fields(settings_class)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise CatalogError(f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                           f"for {settings_class.__name__} (known: {', '.join(sorted(known))})")
    made = settings_class(**given)
    parse = getattr(made, "parsed", None)
    made = parse() if parse else made
    check(made)
    return made

"""The catalog's schema: the versioned migrations (the source of every table and column type),
the Arrow types a writer uses (`rows`) and the SQLAlchemy descriptions of the metadata rows
(`tables`). Imports neither torch nor any other layer of the package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

_MIGRATION_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def shipped_migrations() -> list[Migration]:
    """Every migration shipped with the package, in version order."""
    found = []
    for entry in resources.files("catalog.schema.migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    # Numbers are unique and start at 1; a gap is allowed while branches that each add one are
    # merged (a missing one is applied when it arrives: catalog.store.apply_migrations).
    if len(set(versions)) != len(versions) or (versions and versions[0] != 1):
        raise RuntimeError(f"migrations are not numbered 1, 2, ... once each: {versions}")
    return found


LATEST_VERSION = max((m.version for m in shipped_migrations()), default=0)

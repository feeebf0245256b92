"""A small JSON file next to a catalog that says a service holds it (its URL and pid).

Another process that finds the catalog locked reads it to say where the service is and how to
submit an ingest to it, instead of DuckDB's lock error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def marker_path(db_path: str | Path) -> Path:
    db_path = Path(db_path)
    return db_path.with_name(db_path.name + ".service.json")


def write_marker(db_path: str | Path, url: str) -> Path:
    path = marker_path(db_path)
    path.write_text(json.dumps({"url": url, "pid": os.getpid()}), encoding="utf-8")
    return path


def remove_marker(db_path: str | Path) -> None:
    path = marker_path(db_path)
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def held_by_service(db_path: str | Path) -> str | None:
    """One line saying which service holds the catalog, or None when no marker can be read."""
    try:
        url = json.loads(marker_path(db_path).read_text(encoding="utf-8"))["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (f"{db_path} is held by the circuit-catalog service at {url}: submit ingests with "
            f"`circuit-catalog ingest --server {url} ...` and query it over HTTP ({url}/api/v1/)")

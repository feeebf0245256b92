"""Output formats, one registry: a format's name -> what it renders (an Arrow table or a traced
circuit), its file extension, its content type and its render function.

The CLI's --format choices and the service's downloads and content types read it, so a format is
added here once (docs/architecture.md). Render functions are named by module, so that importing
the registry imports no writer (networkx and matplotlib are loaded only by the drawings that
use them). Nothing here imports click: the CLI's option lives in catalog.cli.output.

    >>> from catalog import formats
    >>> formats.get("csv").render(table)          # doctest: +SKIP
    >>> formats.names("graph")
    ('graphml', 'dot', 'html', 'png')
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from catalog.errors import CatalogError


@dataclass(frozen=True)
class Format:
    name: str
    kind: str            # what it renders: 'table' (an Arrow table) or 'graph' (a TraceGraph)
    extension: str       # of a file in this format, without the dot
    content_type: str    # of a download in this format
    binary: bool         # renders bytes (False: text)
    writer: str          # "module:function" (thing) -> str | bytes

    def render(self, thing) -> str | bytes:
        """`thing` (an Arrow table or a TraceGraph, as `kind` says) in this format."""
        module, _, function = self.writer.partition(":")
        return getattr(importlib.import_module(module), function)(thing)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("table", "table", "txt", "text/plain; charset=utf-8", False, "catalog.formats.table:render_table"),
    Format("csv", "table", "csv", "text/csv", False, "catalog.formats.table:render_csv"),
    Format("json", "table", "json", "application/json", False, "catalog.formats.table:render_json"),
    Format("parquet", "table", "parquet", "application/vnd.apache.parquet", True, "catalog.formats.files:to_parquet"),
    Format("arrow", "table", "arrow", "application/vnd.apache.arrow.stream", True,
           "catalog.formats.files:to_arrow_stream"),
    Format("graphml", "graph", "graphml", "application/graphml+xml", False, "catalog.formats.graph:to_graphml"),
    Format("dot", "graph", "dot", "text/vnd.graphviz", False, "catalog.formats.graph:to_dot"),
    Format("html", "graph", "html", "text/html; charset=utf-8", False, "catalog.formats.graph:to_html"),
    Format("png", "graph", "png", "image/png", True, "catalog.formats.graph:png_bytes"),
)}


def get(name: str) -> Format:
    """The format of that name; CatalogError naming the formats when there is none."""
    found = FORMATS.get(name)
    if found is None:
        raise CatalogError(f"unknown format '{name}' (formats: {', '.join(FORMATS)})")
    return found


def names(kind: str | None = None, binary: bool | None = None) -> tuple[str, ...]:
    """The formats' names, in registry order, of one kind and/or only text (binary=False) or bytes."""
    return tuple(f.name for f in FORMATS.values()
                 if (kind is None or f.kind == kind) and (binary is None or f.binary == binary))


def content_types(chosen) -> dict[str, str]:
    """name -> content type of the chosen formats, in the order given."""
    return {name: get(name).content_type for name in chosen}


# What a command prints to a terminal: the text formats of a table.
TEXT_TABLE_FORMATS = names("table", binary=False)
GRAPH_FORMATS = names("graph")

"""circuit-catalog: a DuckDB catalog of how the attention heads of a transformer talk to each other.

Stages, one module each, in the order the data flows:
model (with families/, one adapter per model family) -> decompose (per head) or rotary (per head
and offset) -> forms -> prompts -> signals -> edges -> store -> ingest (the job) -> query -> cli.
Only model, decompose, rotary, forms, signals, edges and ingest need torch; query and cli never
import it.
"""

__version__ = "0.1.0"

# The read side's Python API (the query commands' twins, catalog.read.query), loaded when first
# used. Kept apart from the jobs' names so that the two lists merge easily. `heads` is not here:
# catalog.heads is the module of head names (use catalog.read.query.heads).
_READ_API = {name: "catalog.read.query" for name in (
    "edges_into", "edges_from", "head_summary", "head_document", "diff_runs", "trace", "TraceOptions",
    "export_parquet", "sql",
)}


def __getattr__(name: str):
    if name in _READ_API:
        import importlib

        return getattr(importlib.import_module(_READ_API[name]), name)
    raise AttributeError(f"module 'catalog' has no attribute '{name}'")

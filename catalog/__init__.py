"""circuit-catalog: a DuckDB catalog of how the attention heads of a transformer talk to each other.

The library is the command line's twin: `catalog.ingest(db, ...)` is `circuit-catalog ingest`,
`catalog.intervene(db, ...)` is `circuit-catalog intervene`, `catalog.edges_into(con, ...)` and
`catalog.trace(con, ...)` are `edges --into` and `trace`, with the same option names and defaults (or a settings object: IngestSettings, InterveneSettings, and the methods' SadSettings,
AccppSettings). They are imported on first use, so `import catalog` loads no torch.

Layers, from the ground up: errors, heads, settings -> schema -> store -> models, prompts ->
methods (the registry; sad, accpp, shared), interventions -> jobs -> read, formats -> cli, service.
"""

__version__ = "0.1.0"

# The Python API, the commands' twins: name -> "module:attribute", imported when first asked for,
# so that `import catalog` stays light (no torch). `heads` is not here: catalog.heads is the
# module of head names (use catalog.read.query.heads).
_LAZY = {
    "ingest": "catalog.jobs.ingest:ingest",
    "intervene": "catalog.jobs.intervene:intervene_run",
    "IngestSettings": "catalog.jobs.settings:IngestSettings",
    "InterveneSettings": "catalog.jobs.settings:InterveneSettings",
    "SadSettings": "catalog.methods.sad.settings:SadSettings",
    "AccppSettings": "catalog.methods.accpp.settings:AccppSettings",
    # docs/features.md (`features` itself is the package of SAEs and transcoders)
    "train_sae": "catalog.jobs.features:train_sae_job", "SaeTraining": "catalog.features.train:SaeTraining",
    "store_features": "catalog.jobs.features:features_run", "train_qk": "catalog.jobs.features_qk:train_qk_job",
    **{name: f"catalog.read.query:{name}" for name in (
        "edges_into", "edges_from", "head_summary", "head_document", "diff_runs", "trace", "TraceOptions",
        "export_parquet", "sql")},
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'catalog' has no attribute '{name}'")
    import importlib

    module, _, attribute = _LAZY[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

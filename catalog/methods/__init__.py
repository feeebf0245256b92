"""The tracing methods and their registry: a method's name (`runs.method`) -> one `Method`.

Each method is a package here (`sad`: the 2024 method, SPEC.md; `accpp`: ACC++, ACCPP.md) and
`shared` holds the code both use. A `Method` owns its settings dataclass, its batch analysis
(named by module, so that torch is imported only when a job runs it), the tables it writes, what
the read side needs to trace its runs and describe its heads, and its notes. Importing this
module imports no torch: the read side, the CLI and the service ask it what a method is.

Adding a method: a new package with its settings, its analysis (`batch_analysis(context)`, the
context being catalog.methods.context.AnalysisContext) and its `METHOD_FIELDS`, and one line in
`REGISTRY` below (docs/architecture.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from catalog.errors import CatalogError


@dataclass(frozen=True)
class Method:
    name: str                  # runs.method
    title: str                 # one line for choices and help
    settings: type             # a frozen dataclass of catalog.settings options
    analysis: str              # "module:function" making the batch analysis: (job context) -> (prompt ids -> tables)
    tables: tuple[str, ...]    # the tables its batches write beside prompts and tokens
    weight_unit: str           # runs.weight_unit of its edges: 'score' or 'attn_prob'
    form: str                  # singular_vectors.form its directions are read from
    trace: str                 # the read side's tracer: 'heads' (rooted at chosen heads) or 'seeded' (rooted at the output)
    per_firing: str            # how a firing is described: 'signal' (firing_svs) or 'sides' (firing_sides)
    label: str                 # its name in a sentence: '2024 method', 'ACC++'
    upstream_kinds: tuple[str, ...]  # edges.up_kind values its edges come from (only 'head': layer 0 has no upstream)
    partial_firings: str | None      # why a head's firings may be missing though it fires (None: every firing is stored)
    run_settings: str          # where a run's settings are read back: 'thresholds' (runs' threshold columns) or 'settings' (runs.settings)
    summary_detail: Callable[[dict], str]  # the counts of an ingest's last line, from its summary
    # (settings, model, items, answers, wrongs) -> None: what it needs of them, checked before
    # anything is stored (one CatalogError line); None: it takes any model and prompts
    check_inputs: Callable | None = None
    # (settings, config) -> None: the settings a checkpoint cannot take, from its config.json (a
    # dict) before the model is loaded (one CatalogError line); None: nothing to check there
    check_config: Callable | None = None
    notes: tuple[str, ...] = ()

    def load_analysis(self):
        module, _, function = self.analysis.partition(":")
        return getattr(importlib.import_module(module), function)


def _registry() -> dict[str, Method]:
    from catalog.methods import accpp, sad

    methods = [Method(**package.METHOD_FIELDS) for package in (sad, accpp)]  # one line per method
    return {m.name: m for m in methods}


REGISTRY: dict[str, Method] = _registry()
DEFAULT = "sad"
NAMES = tuple(REGISTRY)


def method(name: str | None) -> Method:
    """The method of that name (None: the default, as runs written before methods were recorded)."""
    found = REGISTRY.get(name or DEFAULT)
    if found is None:
        raise CatalogError(f"unknown method '{name}': use " + " or ".join(f"{m.name} ({m.title})" for m in REGISTRY.values()))
    return found

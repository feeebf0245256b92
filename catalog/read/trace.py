"""Tracing a circuit: `trace(con, ...)` reads a run's stored firings and edges into a TraceGraph.

Which tracer reads a run is asked of the registry (`Method.trace`): 'heads' rooted at chosen
heads and token roles (catalog.read.trace_heads, the 2024 method), or 'seeded' rooted at the
model's output (catalog.read.trace_seeded, ACC++). The options are one `TraceOptions`, whose
defaults the `trace` command and the service read too, so that a default is written once.

    >>> from catalog.store import open_readonly
    >>> from catalog.read.trace import trace
    >>> graph = trace(open_readonly("ioi.duckdb"))           # 9.6, 9.9, 10.0 from end to IO
    >>> graph.edges.column_names                              # doctest: +SKIP
    ['source', 'target', 'kind', 'side', 'count', 'n_edges', 'mean_weight', 'top_svs']
    >>> trace(open_readonly("ioi.duckdb"), roots=["9.9"], prompt_id=0).nodes.num_rows   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from catalog.read.graph import PICTURE_EDGES, TraceGraph, prune, prune_for_picture
from catalog.read.runs import HEAD_TABLES, check_effect_mode, resolve_run, run_info
from catalog.read.trace_heads import (DEFAULT_DEST_ROLE, DEFAULT_ROOTS, DEFAULT_SRC_ROLE, resolve_roots, trace_heads,
                                      with_top_svs)
from catalog.read.trace_seeded import trace_seeded

TRACERS = {"heads": trace_heads, "seeded": trace_seeded}  # Method.trace -> (con, run, options) -> TraceGraph
# What a tracer leaves until its graph is pruned (con, run, graph, n_svs) -> TraceGraph: the heads
# tracer's edge directions, summed for the drawn edges only.
AFTER_PRUNING = {"heads": with_top_svs}

__all__ = ["trace", "TraceOptions", "TraceGraph", "prune", "prune_for_picture", "PICTURE_EDGES", "resolve_roots", "DEFAULT_ROOTS", "DEFAULT_DEST_ROLE",
           "DEFAULT_SRC_ROLE", "TRACERS"]


@dataclass(frozen=True)
class TraceOptions:
    """What to trace and how much of it to keep; the `trace` command's options, same names and defaults.

    roots        root heads ("9.9"; None: GPT-2's 9.6, 9.9, 10.0 where the model has them and they fire
                 between the roles, else the 3 heads firing between the roles in most prompts,
                 named in a note; none such is an error); 'heads' runs only
    dest_role    role of the roots' destination token (None: any token); 'heads' runs only
    src_role     role of the roots' source token (None: any token); 'heads' runs only
    prompt_id    trace one prompt (nodes keep positions); None aggregates over every prompt
    run_id       None: the latest finished run
    n_svs        singular directions listed per edge
    kinds        'seeded' runs: only components of these kinds (head, mlp, attn_bias, embed, offset)
    effect       add mean_effect: the mean drop of the downstream attention when the edges are
                 ablated (`interventions`, mode `effect_mode`); implied by `min_effect`
    min_effect   keep the edges whose mean_effect is at least that
    min_count, min_weight, max_depth, top_k   pruning (catalog.read.graph.prune)
    """

    roots: list[str] | None = None
    dest_role: str | None = DEFAULT_DEST_ROLE
    src_role: str | None = DEFAULT_SRC_ROLE
    prompt_id: int | None = None
    run_id: int | None = None
    n_svs: int = 3
    kinds: object = None
    effect: bool = False
    min_effect: float | None = None
    effect_mode: str = "local"
    min_count: int | None = None
    min_weight: float | None = None
    max_depth: int | None = None
    top_k: int | None = None

    @property
    def with_effect(self) -> bool:
        return self.effect or self.min_effect is not None


DEFAULTS = TraceOptions()
OPTION_NAMES = tuple(f.name for f in fields(TraceOptions))


def trace(con, options: TraceOptions | None = None, **keywords) -> TraceGraph:
    """Trace the circuit of a run: `trace(con, roots=["9.9"], top_k=3)` or `trace(con, TraceOptions(...))`
    (keywords override the options' fields; see TraceOptions for each).

    A 2024-method run is traced from the root heads' firings between `dest_role` and `src_role`
    (default: 9.6, 9.9, 10.0 from `end` to `IO`); an ACC++ run draws its stored circuit rooted at
    the output (roots and roles do not apply). The graph is pruned as the options say (see
    `prune`); a note says how many edges each pruning left out.
    """
    options = replace(options or DEFAULTS, **keywords)
    run = resolve_run(con, options.run_id, HEAD_TABLES)
    if options.with_effect:
        check_effect_mode(con, options.effect_mode)
    graph = TRACERS[run.method_spec.trace](con, run, options)
    graph.run = run_info(con, run)
    graph = prune(graph, options.min_count, options.min_weight, options.max_depth, options.top_k)
    finish = AFTER_PRUNING.get(run.method_spec.trace)
    return finish(con, run, graph, options.n_svs) if finish else graph

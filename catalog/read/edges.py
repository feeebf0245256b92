"""Which components feed a head, and which heads a head feeds: `edges_into`, `edges_from`.

Answered as Arrow tables whose schema metadata names the run read and carries the notes (rows
left out, why an answer is empty; catalog.read.runs.result_notes).
"""

from __future__ import annotations

import pyarrow as pa

from catalog.read.fragments import (EFFECT, component_name, edge_token_join, effect_join, firing_offset,
                                    firing_roles_filter, firing_roles_join, head_name_sql, no_svs, top_svs)
from catalog.read.runs import (EDGE_TABLES, Run, check_effect_mode, check_kinds, check_role, check_side, fetch,
                               has_table, head_name, per_offset_forms, resolve_run, rows, run_info, with_notes)


def _edge_table(con, run: Run, fixed: str, layer_head: tuple[int, int], group: list[str], display: str,
                head_column: str, typed: list[str], side: str | None, role: str | None, top: int | None, n_svs: int,
                kinds: list[str] | None = None, effect: bool = False, min_effect: float | None = None,
                effect_mode: str = "local", dest_role: str | None = None,
                src_role: str | None = None) -> pa.Table:
    """Edges with one end fixed (`fixed`: a condition on e.* with $layer, $head), grouped by the other.

    `group` lists the grouping columns of `chosen`; `display` is the SQL (over g.*) of the
    `head_column` output column that names the other end. With `effect` (or `min_effect`) the
    rows also carry the measured effect of the edges (`interventions`, see fragments.EFFECT).
    """
    check_side(side)
    for checked in (role, dest_role, src_role):
        check_role(con, run, checked)
    kinds = check_kinds(kinds)
    effect = effect or min_effect is not None
    if effect:
        check_effect_mode(con, effect_mode)
    # The roles of the firing an edge feeds (its destination and source tokens), not of the
    # token the upstream component writes to (`role`): joined only when asked for.
    firing_roles = dest_role is not None or src_role is not None
    per_offset = per_offset_forms(con, run)  # a rotary form: directions named by (pos_offset, sv)
    sv_list = (top_svs("sv", "sv_weight", "total", "sv_weight DESC, pos_offset, sv", str(int(n_svs)), "pos_offset")
               if per_offset else top_svs("sv", "sv_weight", "total", "sv_weight DESC", str(int(n_svs))))
    group_sql = ", ".join(group)
    extra = [c for c in group if c in ("side", "token_role")]
    sql = f"""
    WITH chosen AS (
        SELECT e.prompt_id, e.edge_id, e.layer, e.head, e.side, e.up_kind, e.up_layer, e.up_head,
               e.weight, t.role AS token_role, {firing_offset("e")} AS pos_offset{", " + EFFECT + " AS effect" if effect else ""}
        FROM edges e
        {edge_token_join("e", "t")}
        {firing_roles_join("e") if firing_roles else ""}
        {effect_join("e") if effect else ""}
        WHERE e.run_id = $run AND {fixed}
          AND ($side IS NULL OR e.side = $side) AND ($role IS NULL OR t.role = $role)
          {firing_roles_filter("fd", "fs") if firing_roles else ""}
          AND ($kinds IS NULL OR list_contains($kinds, e.up_kind))
    ),
    grouped AS (
        SELECT {group_sql}, count(DISTINCT prompt_id) AS n_prompts, count(*) AS n_firings,
               avg(weight) AS mean_weight, sum(weight) AS total_weight
               {", avg(effect) AS mean_effect, count(effect) AS n_tested" if effect else ""}
        FROM chosen GROUP BY {group_sql}
        {"HAVING $min_effect IS NULL OR avg(effect) >= $min_effect" if effect else ""}
    ),
    by_sv AS (
        SELECT {group_sql}, pos_offset, sv, sum(w) AS sv_weight
        FROM (SELECT {", ".join("c." + g for g in group)}, {"c.pos_offset" if per_offset else "NULL"} AS pos_offset,
                     unnest(s.svs) AS sv, unnest(s.weights) AS w
              FROM chosen c
              -- The stored lists (one row per edge), filtered before the join: a plain join would
              -- hash all of the run's edges, whatever the head; the edge_svs view would unnest them all.
              JOIN (SELECT * FROM edge_sv_lists WHERE run_id = $run
                    AND (prompt_id, edge_id) IN (SELECT prompt_id, edge_id FROM chosen)) s
                ON s.prompt_id = c.prompt_id AND s.edge_id = c.edge_id)
        GROUP BY ALL
    ),
    sv_lists AS (
        SELECT {group_sql}, {sv_list} AS top_svs
        FROM (SELECT b.*, sum(sv_weight) OVER (PARTITION BY {group_sql}) AS total FROM by_sv b)
        GROUP BY {group_sql}
    )
    SELECT {display} AS {head_column}, {", ".join(typed)}, {", ".join("g." + c for c in extra)},
           g.n_prompts, g.n_firings, g.mean_weight, g.total_weight,
           coalesce(l.top_svs, {no_svs(per_offset)}) AS top_svs
           {", g.mean_effect, g.n_tested" if effect else ""},
           count(*) OVER () AS _n_kept,
           (SELECT count(*) FROM (SELECT 1 FROM chosen GROUP BY {group_sql})) AS _n_all
    FROM grouped g
    LEFT JOIN sv_lists l ON {" AND ".join(f"g.{c} IS NOT DISTINCT FROM l.{c}" for c in group)}
    ORDER BY g.n_prompts DESC, g.total_weight DESC, {", ".join("g." + c for c in group)}
    {"LIMIT " + str(int(top)) if top is not None else ""}
    """
    params = {"run": run.run_id, "layer": layer_head[0], "head": layer_head[1], "side": side, "role": role,
              "kinds": kinds, "min_effect": min_effect, "effect_mode": effect_mode, "dest_role": dest_role,
              "src_role": src_role}
    table = fetch(con, sql, params)
    n_kept = table.column("_n_kept")[0].as_py() if table.num_rows else 0
    n_all = table.column("_n_all")[0].as_py() if table.num_rows else None
    table = table.drop(["_n_kept", "_n_all"])
    notes = []
    if table.num_rows and n_all is not None and n_kept < n_all:
        notes.append(f"{n_all - n_kept} of {n_all} rows left out: their mean effect is below --min-effect {min_effect:g}"
                     " (or not measured)")
    if table.num_rows and n_kept > table.num_rows:
        notes.append(f"showing the first {table.num_rows} of {n_kept} rows (top {top})")
    if not table.num_rows:
        notes.append(_why_empty(con, run, head_column, layer_head, side, role, kinds, effect, min_effect,
                                dest_role, src_role))
    elif head_column == "upstream":
        notes.extend(head_share_notes(con, run, layer_head, side))
    return with_notes(table, run_info(con, run), notes)


HEAD_SHARE_NOTE = "upstream heads carry a median"


def head_share_notes(con, run: Run, layer_head: tuple[int, int], side: str | None) -> list[str]:
    """How much of the head's sides its upstream heads carry (table side_shares), for a method whose
    edges are heads only: the rest (MLPs, the embedding, biases) is not in its edges, and a reader
    of the edges should know how much that is. Nothing for runs without side_shares rows."""
    if not has_table(con, "side_shares"):
        return []
    found = rows(con, """
        SELECT side, median(head_share), median(mlp_share), count(*) FROM side_shares
        WHERE run_id = ? AND layer = ? AND head = ? AND (? IS NULL OR side = ?) AND head_share IS NOT NULL
        GROUP BY side ORDER BY side DESC""", [run.run_id, *layer_head, side, side])
    if not found:
        return []
    parts = [f"{heads:.0%} of the {name} side (MLPs {mlps:.0%})" for name, heads, mlps, _ in found]
    return [f"{HEAD_SHARE_NOTE} {' and '.join(parts)} of {head_name(*layer_head)}'s sparse signals, "
            f"over {found[0][3]} firings; the rest is the embedding and biases (side_shares)"]


def _why_empty(con, run: Run, direction: str, layer_head: tuple[int, int], side, role, kinds, effect,
               min_effect, dest_role=None, src_role=None) -> str:
    """Why edges_into / edges_from found no rows: the first filter (or fact) that leaves nothing."""
    layer, head = layer_head
    name, where = head_name(layer, head), f"in run {run.run_id}"
    if direction == "upstream":
        n_firings = rows(con, "SELECT count(*) FROM firings WHERE run_id = ? AND layer = ? AND head = ?",
                         [run.run_id, layer, head])[0][0]
        spec = run.method_spec
        if not n_firings and spec.partial_firings:
            return f"no firing of {name} is decomposed {where} ({spec.partial_firings}), so nothing feeds it"
        if not n_firings:
            return f"{name} never fires {where}, so nothing feeds it"
        if layer == 0 and spec.upstream_kinds == ("head",):  # only heads feed a head: none below layer 0
            return f"{name} is in layer 0: no head is upstream of it"
        fixed, params = "e.layer = ? AND e.head = ?", [layer, head]
        what = f"{name}"
        none = (f"fires {n_firings} times {where} but has no edges stored (no upstream component carries enough "
                "of a side's weight to pass the edge threshold)")
    else:
        if layer == run.n_layers - 1:
            return f"{name} is in the last layer: no head is downstream of it"
        fixed, params = "e.up_kind = 'head' AND e.up_layer = ? AND e.up_head = ?", [layer, head]
        what = f"{name}"
        none = (f"feeds no firing of a later head {where} (no edge from it passes the edge threshold; "
                f"it fires {rows(con, 'SELECT count(*) FROM firings WHERE run_id = ? AND layer = ? AND head = ?', [run.run_id, layer, head])[0][0]} times)")
    counted = rows(con, f"""
        SELECT count(*), count(*) FILTER (WHERE ? IS NULL OR e.side = ?),
               count(*) FILTER (WHERE (? IS NULL OR e.side = ?) AND (? IS NULL OR t.role = ?)),
               count(*) FILTER (WHERE (? IS NULL OR e.side = ?) AND (? IS NULL OR t.role = ?)
                                AND (?::VARCHAR[] IS NULL OR list_contains(?::VARCHAR[], e.up_kind)))
        FROM edges e {edge_token_join("e", "t")}
        WHERE e.run_id = ? AND {fixed}""", [side, side, side, side, role, role, side, side, role, role, kinds, kinds,
                                             run.run_id] + params)[0]
    total, on_side, with_role, of_kind = counted
    firing_count = None
    if dest_role is not None or src_role is not None:
        firing_count = rows(con, f"""
            SELECT count(*) FROM edges e {edge_token_join("e", "t")} {firing_roles_join("e")}
            WHERE e.run_id = ? AND {fixed} AND (? IS NULL OR e.side = ?) AND (? IS NULL OR t.role = ?)
              AND (?::VARCHAR[] IS NULL OR list_contains(?::VARCHAR[], e.up_kind))
              AND (?::VARCHAR IS NULL OR fd.role = ?) AND (?::VARCHAR IS NULL OR fs.role = ?)""",
            [run.run_id] + params + [side, side, role, role, kinds, kinds, dest_role, dest_role, src_role,
                                     src_role])[0][0]
    if not total:
        return f"{what} {none}"
    if not on_side:
        return f"{what} has {total} edges {where}, none on the {side} side"
    if not with_role:
        return f"{what} has {on_side} edges {where}{' on the ' + side + ' side' if side else ''}, none whose token has role {role}"
    if not of_kind:
        return f"{what} has {with_role} edges with these filters, none from a component of kind {', '.join(kinds)}"
    if firing_count == 0:
        firing = f"{dest_role or 'any token'} -> {src_role or 'any token'}"
        return f"{what} has {of_kind} edges with these filters, none into a firing {firing} (--dest-role/--src-role)"
    if min_effect is not None:
        return f"no row's mean effect (attention drop when ablated) reaches --min-effect {min_effect:g}, or none was measured"
    return f"{what} has no edges with these filters"


def edges_into(con, head: str, side: str | None = None, role: str | None = None,
               run_id: int | None = None, top: int | None = None, n_svs: int = 3, kind=None,
               effect: bool = False, min_effect: float | None = None, effect_mode: str = "local",
               dest_role: str | None = None, src_role: str | None = None) -> pa.Table:
    """The upstream components that feed `head`: one row per (component, side).

    Columns: upstream (the component's display name: "L6H10" for a head; "MLP 3", "b_O 3",
    "embed", "offset" in ACC++ runs), up_kind, up_layer and up_head (integers; NULL where the
    kind has none), side, n_prompts and n_firings it is an edge of, mean_weight and total_weight
    of those edges (in the run's weight_unit), top_svs (the head's singular directions it writes
    through: a list of {sv, share}, largest first; see SHARE_MEANING; on a rotary model
    {pos_offset, sv, share}: a direction is named by its form's offset and index, and the same sv at
    two offsets is two directions, never summed).
    `role` keeps edges whose token (the one the upstream component writes to) has that role;
    `kind` keeps components of these kinds (head, mlp, attn_bias, embed, offset).
    `dest_role` / `src_role` keep edges into the firings of `head` whose own destination / source
    token has that role (as trace's: "what feeds 9.9's end -> IO firings").
    With `effect` (implied by `min_effect`) two more columns: mean_effect, the mean drop of the
    downstream attention when one of those edges is ablated (`interventions`, mode
    `effect_mode`), over the n_tested edges that have been intervened on; `min_effect` keeps
    rows whose mean_effect is at least that.
    Ordered by n_prompts, then total_weight, descending. The result's schema metadata names
    the run (`result_run`) and holds notes (`result_notes`): rows left out by `top` or
    `min_effect`, and why an empty result is empty.

        >>> edges_into(con, "9.9", side="query", role="end", top=5)   # doctest: +SKIP
    """
    run = resolve_run(con, run_id, EDGE_TABLES)
    return _edge_table(con, run, "e.layer = $layer AND e.head = $head", run.head(head),
                       ["up_kind", "up_layer", "up_head", "side"], component_name("g."), "upstream",
                       ["g.up_kind", "g.up_layer", "g.up_head"],
                       side, role, top, n_svs, kind, effect, min_effect, effect_mode, dest_role, src_role)


def edges_from(con, head: str, side: str | None = None, role: str | None = None,
               run_id: int | None = None, top: int | None = None, n_svs: int = 3,
               effect: bool = False, min_effect: float | None = None, effect_mode: str = "local",
               dest_role: str | None = None, src_role: str | None = None) -> pa.Table:
    """The downstream heads that `head` feeds: one row per (downstream head, side, token_role).

    Columns: downstream (display name "L9H9"), down_layer, down_head (integers), side, token_role,
    then as `edges_into`.

    Same counts, weights and effects as `edges_into`; top_svs are the downstream head's directions.
    `dest_role` / `src_role` keep edges into downstream firings between these roles.

        >>> edges_from(con, "7.3", side="key", top=5)   # doctest: +SKIP
    """
    run = resolve_run(con, run_id, EDGE_TABLES)
    return _edge_table(con, run, "e.up_kind = 'head' AND e.up_layer = $layer AND e.up_head = $head",
                       run.head(head), ["layer", "head", "side", "token_role"], head_name_sql("g.layer", "g.head"),
                       "downstream", ["g.layer AS down_layer", "g.head AS down_head"],
                       side, role, top, n_svs, None, effect, min_effect, effect_mode, dest_role, src_role)

"""Features on the read side (docs/features.md): the SAE features that carry a head's edges.

Reads `edge_features` (written by `circuit-catalog features`) and `dictionaries`; imports no
torch. A feature is named `(dictionary, feature)`, shown `d1:f17`. A feature's **share** of some
edges is the sum of its parts of their weights over the sum of their weights, so the shares of
all features, the decoder bias, the reconstruction error and the constant of those edges add up
to one (a feature that writes against the edges has a negative share).
"""

from __future__ import annotations

import pyarrow as pa

from catalog.read.fragments import edge_token_join, firing_roles_filter, firing_roles_join
from catalog.read.runs import Run, fetch, has_table, head_name, rows, with_notes

# The other end of an edge, as edges_into / edges_from group their rows.
_INTO_KEYS = ("up_kind", "up_layer", "up_head", "side")
_FROM_KEYS = ("down_layer", "down_head", "side", "token_role")
_FROM_SQL = {"down_layer": "e.layer", "down_head": "e.head", "side": "e.side", "token_role": "t.role"}


def has_features(con, run: Run) -> bool:
    return has_table(con, "edge_features") and bool(
        rows(con, "SELECT count(*) FROM (SELECT 1 FROM edge_features WHERE run_id = ? LIMIT 1)", [run.run_id])[0][0])


def _share_lists(con, run: Run, fixed: str, keys: dict[str, str], params: dict, n: int) -> pa.Table:
    """Per group of edges (keys: output name -> SQL over e, t): the top n features by share and
    the error's share, over the edges that have feature rows."""
    key_sql = ", ".join(f"{sql} AS {name}" for name, sql in keys.items())
    names = ", ".join(keys)
    return fetch(con, f"""
        WITH chosen AS (
            SELECT {key_sql}, e.prompt_id, e.edge_id, e.weight
            FROM edges e {edge_token_join("e", "t")} {firing_roles_join("e")}
            WHERE e.run_id = $run AND e.up_kind = 'head' AND {fixed}
              AND ($side IS NULL OR e.side = $side) AND ($role IS NULL OR t.role = $role)
              {firing_roles_filter("fd", "fs")}
        ),
        parts AS (
            SELECT c.*, f.dictionary_id, f.part, f.feature, f.weight AS part_weight
            FROM chosen c JOIN edge_features f ON f.run_id = $run AND f.prompt_id = c.prompt_id
                                              AND f.edge_id = c.edge_id
        ),
        totals AS (
            SELECT {names}, sum(weight) AS total FROM chosen
            WHERE (prompt_id, edge_id) IN (SELECT prompt_id, edge_id FROM parts) GROUP BY ALL
        ),
        by_feature AS (
            SELECT {names}, dictionary_id, feature, sum(part_weight) AS part_weight
            FROM parts WHERE part = 'feature' GROUP BY ALL
        ),
        errors AS (SELECT {names}, sum(part_weight) AS error FROM parts WHERE part = 'error' GROUP BY ALL)
        SELECT {", ".join("x." + k for k in keys)},
               (SELECT list({{'dictionary': b.dictionary_id, 'feature': b.feature,
                             'share': CAST(b.part_weight / nullif(x.total, 0) AS FLOAT)}}
                            ORDER BY b.part_weight DESC, b.dictionary_id, b.feature)[1:$n]
                FROM by_feature b WHERE {" AND ".join(f"b.{k} IS NOT DISTINCT FROM x.{k}" for k in keys)})
                   AS top_features,
               CAST(r.error / nullif(x.total, 0) AS FLOAT) AS error_share
        FROM totals x LEFT JOIN errors r ON {" AND ".join(f"r.{k} IS NOT DISTINCT FROM x.{k}" for k in keys)}
    """, dict(params, run=run.run_id, n=int(n)))


def with_top_features(con, table: pa.Table, run: Run, head: str, direction: str, side=None, role=None,
                      dest_role=None, src_role=None, n: int = 3) -> pa.Table:
    """edges_into's / edges_from's table with two more columns: top_features (the n features that
    carry most of the row's edges, {dictionary, feature, share}) and error_share (the SAE's
    reconstruction error's share); NULL for rows with no feature rows (not a head, or its layer
    has no SAE applied)."""
    layer, head_index = run.head(head)
    if direction == "into":
        keys = {k: f"e.{k}" for k in _INTO_KEYS}
        fixed = "e.layer = $layer AND e.head = $head"
    else:
        keys = {k: _FROM_SQL[k] for k in _FROM_KEYS}
        fixed = "e.up_layer = $layer AND e.up_head = $head"
    params = {"layer": layer, "head": head_index, "side": side, "role": role, "dest_role": dest_role,
              "src_role": src_role}
    found = _share_lists(con, run, fixed, keys, params, n).to_pylist()
    by_key = {tuple(r[k] for k in keys): r for r in found}
    matched = [by_key.get(tuple(row[k] for k in keys), {}) for row in table.select(list(keys)).to_pylist()]
    feature_type = pa.list_(pa.struct([("dictionary", pa.int32()), ("feature", pa.int32()), ("share", pa.float32())]))
    metadata = table.schema.metadata
    table = table.append_column("top_features", pa.array([m.get("top_features") for m in matched], feature_type))
    table = table.append_column("error_share", pa.array([m.get("error_share") for m in matched], pa.float32()))
    return table.replace_schema_metadata(metadata)


def head_features(con, run: Run, head: str, top: int = 10) -> pa.Table:
    """The features that carry the edges into `head`: one row per (upstream head, side, dictionary,
    feature), with the edges it is part of, its mean activation there and its share of those
    sides' feature-split weight, largest first."""
    layer, head_index = run.head(head)
    table = fetch(con, """
        WITH chosen AS (
            SELECT e.prompt_id, e.edge_id, e.up_layer, e.up_head, e.side, e.weight FROM edges e
            WHERE e.run_id = $run AND e.layer = $layer AND e.head = $head AND e.up_kind = 'head'
              AND (e.prompt_id, e.edge_id) IN (SELECT prompt_id, edge_id FROM edge_features WHERE run_id = $run)
        ),
        totals AS (SELECT up_layer, up_head, side, sum(weight) AS total FROM chosen GROUP BY ALL)
        SELECT 'L' || c.up_layer || 'H' || c.up_head AS upstream, c.side,
               'd' || f.dictionary_id || ':f' || f.feature AS name, f.dictionary_id AS dictionary, f.feature,
               count(*) AS n_edges, avg(f.activation) AS mean_activation, sum(f.weight) AS total_weight,
               CAST(sum(f.weight) / nullif(any_value(x.total), 0) AS FLOAT) AS share
        FROM chosen c
        JOIN edge_features f ON f.run_id = $run AND f.prompt_id = c.prompt_id AND f.edge_id = c.edge_id
        JOIN totals x ON x.up_layer = c.up_layer AND x.up_head = c.up_head AND x.side = c.side
        WHERE f.part = 'feature'
        GROUP BY ALL
        ORDER BY total_weight DESC, upstream, c.side, dictionary, f.feature
        LIMIT $top
    """, {"run": run.run_id, "layer": layer, "head": head_index, "top": int(top)})
    notes = [] if table.num_rows else [
        f"no edge into {head_name(layer, head_index)} is split by features in run {run.run_id}: run "
        "`circuit-catalog features --sae DIR` with an SAE of an upstream layer"]
    return with_notes(table, {}, notes)


def feature_edges(con, run: Run, dictionary: int, feature: int, top: int | None = None) -> pa.Table:
    """Every edge of the run that the feature carries (one row per downstream head, side, upstream
    head and token role), with its edges, mean activation, its part of their weight and its share."""
    table = fetch(con, f"""
        SELECT 'L' || e.layer || 'H' || e.head AS downstream, e.side, 'L' || e.up_layer || 'H' || e.up_head AS upstream,
               t.role AS token_role, count(DISTINCT e.prompt_id) AS n_prompts, count(*) AS n_edges,
               avg(f.activation) AS mean_activation, sum(f.weight) AS feature_weight, sum(e.weight) AS edge_weight,
               CAST(sum(f.weight) / nullif(sum(e.weight), 0) AS FLOAT) AS share
        FROM edge_features f
        JOIN edges e USING (run_id, prompt_id, edge_id)
        {edge_token_join("e", "t")}
        WHERE f.run_id = $run AND f.dictionary_id = $dictionary AND f.feature = $feature
        GROUP BY ALL
        ORDER BY feature_weight DESC, downstream, e.side, upstream
        {"LIMIT " + str(int(top)) if top is not None else ""}
    """, {"run": run.run_id, "dictionary": int(dictionary), "feature": int(feature)})
    notes = [] if table.num_rows else [f"feature d{dictionary}:f{feature} carries no stored edge of run {run.run_id}"]
    return with_notes(table, {}, notes)


def has_pairs(con, run: Run) -> bool:
    return has_table(con, "firing_feature_pairs") and bool(rows(
        con, "SELECT count(*) FROM (SELECT 1 FROM firing_feature_pairs WHERE run_id = ? LIMIT 1)", [run.run_id])[0][0])


def head_pairs(con, run: Run, head: str, top: int = 10) -> pa.Table:
    """The query/key feature pairs that carry the head's firings (`features --qk`): one row per
    (dictionary, query feature, key feature) among the pairs kept, with the firings it is kept for,
    its mean part of the score and its share of those firings' summed score; the bias of a side
    is shown as `bias`."""
    layer, head_index = run.head(head)
    table = fetch(con, """
        WITH firing_totals AS (
            SELECT sum(f.score) AS total FROM firings f
            WHERE f.run_id = $run AND f.layer = $layer AND f.head = $head
              AND (f.prompt_id, f.dest_pos, f.src_pos) IN (
                  SELECT prompt_id, dest_pos, src_pos FROM firing_feature_pairs
                  WHERE run_id = $run AND layer = $layer AND head = $head)
        )
        SELECT 'd' || dictionary_id || ':' || coalesce('f' || query_feature, 'bias') || ' x '
                   || coalesce('f' || key_feature, 'bias') AS pair,
               dictionary_id AS dictionary, query_feature, key_feature, count(*) AS n_firings,
               avg(weight) AS mean_weight, sum(weight) AS total_weight,
               CAST(sum(weight) / nullif(any_value(t.total), 0) AS FLOAT) AS share
        FROM firing_feature_pairs, firing_totals t
        WHERE run_id = $run AND layer = $layer AND head = $head AND part = 'pair'
        GROUP BY ALL
        ORDER BY total_weight DESC, dictionary, query_feature NULLS FIRST, key_feature NULLS FIRST
        LIMIT $top
    """, {"run": run.run_id, "layer": layer, "head": head_index, "top": int(top)})
    notes = [] if table.num_rows else [
        f"no firing of {head_name(layer, head_index)} is split into QK feature pairs in run {run.run_id}: run "
        "`circuit-catalog features --qk DIR` with its transcoders (train-qk)"]
    return with_notes(table, {}, notes)


def feature_firings(con, run: Run, dictionary: int, feature: int, top: int | None = None) -> pa.Table:
    """Every firing of the run whose kept QK pairs use the feature (a `qk_transcoder` dictionary's
    query or key feature): one row per head, side and token roles, with the firings, the feature's
    mean activation, its pairs' part of those firings' scores and their share."""
    table = fetch(con, f"""
        WITH used AS (
            SELECT p.*, CASE WHEN p.query_feature = $feature THEN 'query' ELSE 'key' END AS side,
                   CASE WHEN p.query_feature = $feature THEN p.query_activation ELSE p.key_activation END AS activation
            FROM firing_feature_pairs p
            WHERE p.run_id = $run AND p.dictionary_id = $dictionary AND p.part = 'pair'
              AND (p.query_feature = $feature OR p.key_feature = $feature)
        ),
        per_firing AS (
            SELECT run_id, prompt_id, layer, head, dest_pos, src_pos, side, avg(activation) AS activation,
                   sum(weight) AS part FROM used GROUP BY ALL
        )
        SELECT 'L' || u.layer || 'H' || u.head AS head_name, u.side, fd.role AS dest_role, fs.role AS src_role,
               count(*) AS n_firings, avg(u.activation) AS mean_activation, sum(u.part) AS pair_weight,
               sum(f.score) AS score, CAST(sum(u.part) / nullif(sum(f.score), 0) AS FLOAT) AS share
        FROM per_firing u JOIN firings f USING (run_id, prompt_id, layer, head, dest_pos, src_pos)
        {firing_roles_join("u")}
        GROUP BY ALL ORDER BY pair_weight DESC, head_name, u.side
        {"LIMIT " + str(int(top)) if top is not None else ""}
    """, {"run": run.run_id, "dictionary": int(dictionary), "feature": int(feature)})
    notes = [] if table.num_rows else [f"feature d{dictionary}:f{feature} is in no kept QK pair of run {run.run_id}"]
    return with_notes(table, {}, notes)

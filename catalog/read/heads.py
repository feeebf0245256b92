"""Everything about one head: `head_summary` (named Arrow tables), `head_document` (one
JSON-ready object), and their notes.

What a firing is described by (a sparse signal, or atoms per side) is asked of the run's method
in the registry (`per_firing`).
"""

from __future__ import annotations

import pyarrow as pa

from catalog.read.edges import HEAD_SHARE_NOTE, edges_from, edges_into
from catalog.read.fragments import SIGMA_OVER_FORMS, firing_offset, same_form, sigma_over_forms
from catalog.read.shares import share_notes, share_table
from catalog.read.runs import (HEAD_TABLES, Run, fetch, head_name, per_offset_forms, resolve_run, result_notes,
                               result_run, run_info, with_notes)


def head_summary(con, head: str, run_id: int | None = None, top: int = 10, effect: bool = False,
                 min_effect: float | None = None, effect_mode: str = "local") -> dict[str, pa.Table]:
    """Everything about one head, as named tables (in display order).

    spectrum     its top singular values (sv, sigma, pos_offset) in the run's model (rotary models:
                 the spectrum at the offset the head fires at most, every sv up to the last shown,
                 with `stored`: false (sigma NULL) for the directions the catalog does not keep)
    activity     n_firings, n_prompts (of n_prompts_run), mean attention, score and signal size
    role_pairs   dest_role -> src_role of its firings, with counts
    signal_size  histogram of n_svs (the sparse signal's size); ACC++: of atoms zeroed per side
    top_svs      its singular vectors by the number of firings whose signal uses them (ACC++: whose
                 edges go through them, with their total attention drop); rotary models: by
                 (pos_offset, sv), each with its own form's sigma, never pooled over offsets
    side_shares  2024 method: median share of each side's sparse signal that upstream heads, MLPs,
                 biases and the embedding write, over all its firings and its commonest role
                 pairs (catalog.read.shares); absent for methods that record none
    upstream     its main upstream heads (edges_into; with their measured effect if `effect`)
    downstream   the heads it feeds most (edges_from; the same)

        >>> head_summary(con, "9.9")["role_pairs"]   # doctest: +SKIP
    """
    run = resolve_run(con, run_id, HEAD_TABLES)
    layer, head_index = run.head(head)
    p = {"run": run.run_id, "model": run.model_id, "layer": layer, "head": head_index, "top": int(top),
         "form": run.sv_form}
    this_head = "run_id = $run AND layer = $layer AND head = $head"
    per_offset = per_offset_forms(con, run)
    tables = {
        "spectrum": _spectrum(con, p, this_head, per_offset),
        "activity": fetch(con, f"""
            SELECT count(*) AS n_firings, count(DISTINCT prompt_id) AS n_prompts,
                   (SELECT count(*) FROM prompts WHERE run_id = $run) AS n_prompts_run,
                   avg(attn_weight) AS mean_attn, avg(score) AS mean_score, avg(n_svs) AS mean_n_svs
            FROM firings WHERE {this_head}""", p),
        "role_pairs": fetch(con, f"""
            SELECT dest_role, src_role, count(*) AS n_firings, count(DISTINCT prompt_id) AS n_prompts
            FROM firing_roles WHERE {this_head}
            GROUP BY ALL ORDER BY n_firings DESC, dest_role NULLS LAST, src_role NULLS LAST LIMIT $top""", p),
        "signal_size": fetch(con, f"""
            SELECT n_svs, count(*) AS n_firings, count(*) / sum(count(*)) OVER () AS share
            FROM firings WHERE {this_head} GROUP BY n_svs ORDER BY n_svs""", p),
        "top_svs": fetch(con, f"""
            SELECT f.sv, {SIGMA_OVER_FORMS} AS sigma, count(*) AS n_firings,
                   count(*) / (SELECT count(*) FROM firings WHERE {this_head}) AS share_of_firings,
                   avg(f.contribution) AS mean_contribution
            FROM firing_svs f
            LEFT JOIN singular_vectors s ON s.model_id = $model AND s.form = $form AND s.layer = f.layer
                 AND s.head = f.head AND s.sv = f.sv AND {same_form("s", "f")}
            WHERE f.run_id = $run AND f.layer = $layer AND f.head = $head
            GROUP BY f.sv ORDER BY n_firings DESC, f.sv LIMIT $top""", p),
    }
    if per_offset:  # one form per offset: a direction is (pos_offset, sv), its sigma that form's own
        tables["top_svs"] = fetch(con, f"""
            SELECT f.pos_offset, f.sv, any_value(s.sigma) AS sigma, count(*) AS n_firings,
                   count(*) / (SELECT count(*) FROM firings WHERE {this_head}) AS share_of_firings,
                   avg(f.contribution) AS mean_contribution
            FROM (SELECT *, {firing_offset("x")} AS pos_offset FROM firing_svs x
                  WHERE x.run_id = $run AND x.layer = $layer AND x.head = $head) f
            LEFT JOIN singular_vectors s ON s.model_id = $model AND s.form = $form AND s.layer = f.layer
                 AND s.head = f.head AND s.sv = f.sv AND s.pos_offset = f.pos_offset
            GROUP BY f.pos_offset, f.sv ORDER BY n_firings DESC, f.pos_offset, f.sv LIMIT $top""", p)
    tables["spectrum"] = with_notes(tables["spectrum"], run_info(con, run), _spectrum_notes(con, p, tables["spectrum"]))
    if run.method_spec.per_firing == "sides":  # no sparse signal per firing: atoms per side, and the edges' directions
        tables["signal_size"] = fetch(con, f"""
            SELECT side, n_atoms, count(*) AS n_firings, count(*) / sum(count(*)) OVER (PARTITION BY side) AS share
            FROM firing_sides WHERE {this_head} GROUP BY side, n_atoms ORDER BY side, n_atoms""", p)
        tables["top_svs"] = fetch(con, f"""
            SELECT s.sv, {sigma_over_forms("v")} AS sigma, count(DISTINCT (e.prompt_id, e.dest_pos, e.src_pos)) AS n_firings,
                   count(DISTINCT (e.prompt_id, e.dest_pos, e.src_pos)) / (SELECT count(*) FROM firings WHERE {this_head})
                       AS share_of_firings,
                   sum(s.weight) AS total_drop
            FROM edges e JOIN (SELECT run_id, prompt_id, edge_id, unnest(svs) AS sv, unnest(weights) AS weight
                               FROM edge_sv_lists WHERE run_id = $run) s USING (run_id, prompt_id, edge_id)
            LEFT JOIN singular_vectors v ON v.model_id = $model AND v.form = $form AND v.layer = e.layer
                 AND v.head = e.head AND v.sv = s.sv AND {same_form("v", "e")}
            WHERE e.run_id = $run AND e.layer = $layer AND e.head = $head
            GROUP BY s.sv ORDER BY n_firings DESC, s.sv LIMIT $top""", p)
    shares = share_table(con, run, layer, head_index)
    if shares is not None:
        tables["side_shares"] = shares
    tables["upstream"] = edges_into(con, head, run_id=run.run_id, top=5, effect=effect, min_effect=min_effect,
                                    effect_mode=effect_mode)
    tables["downstream"] = edges_from(con, head, run_id=run.run_id, top=5, effect=effect, min_effect=min_effect,
                                      effect_mode=effect_mode)
    return tables


def _spectrum(con, p: dict, this_head: str, per_offset: bool) -> pa.Table:
    """The head's top singular values. A rotary model has one spectrum per offset: the one of the
    offset this head fires at most, where only the directions some stored signal uses are kept;
    there every sv from 0 to the last shown is a row, and `stored` says which are in the catalog
    (sigma NULL where not), so that the gaps are not read as a continuous spectrum."""
    if not per_offset:
        return fetch(con, """
            SELECT sv, sigma, pos_offset FROM singular_vectors
            WHERE model_id = $model AND form = $form AND layer = $layer AND head = $head AND pos_offset IS NULL
            ORDER BY sv LIMIT $top""", p)
    return fetch(con, f"""
        WITH offset_used AS (SELECT mode(pos_offset) AS pos_offset FROM firings WHERE {this_head}),
        shown AS (
            SELECT v.sv, v.sigma, v.pos_offset FROM singular_vectors v
            WHERE v.model_id = $model AND v.form = $form AND v.layer = $layer AND v.head = $head
              AND v.pos_offset = (SELECT pos_offset FROM offset_used)
            ORDER BY v.sv LIMIT $top
        )
        SELECT CAST(r.sv AS SMALLINT) AS sv, s.sigma, (SELECT pos_offset FROM offset_used) AS pos_offset,
               s.sv IS NOT NULL AS stored
        FROM range(0, (SELECT coalesce(max(sv) + 1, 0) FROM shown)) r(sv) LEFT JOIN shown s ON s.sv = r.sv
        ORDER BY r.sv""", p)


def _spectrum_notes(con, p: dict, spectrum: pa.Table) -> list[str]:
    """What a rotary head's spectrum is (one form per offset; only the directions some stored
    signal uses are kept), so that its gaps in sv are not read as missing data. The offset is
    the one `spectrum` (head_summary's) was read at."""
    offsets = {o for o in spectrum.column("pos_offset").to_pylist() if o is not None}
    if not offsets:  # learned positions: the head's one spectrum, every direction stored
        return []
    (offset,) = offsets
    n_stored, d_head = fetch(con, """
        SELECT count(*) AS n_stored, (SELECT d_head FROM models WHERE model_id = $model) AS d_head
        FROM singular_vectors
        WHERE model_id = $model AND form = $form AND layer = $layer AND head = $head AND pos_offset = $offset""",
        dict(p, offset=offset)).to_pylist()[0].values()
    shown = min(n_stored, p["top"])
    kept = (f"only the {n_stored} of its {d_head} singular vectors that stored sparse signals use are kept "
            "(rows with stored = false: not in the catalog, sigma unknown)"
            if n_stored < d_head else f"stored sparse signals use all {d_head} of its singular vectors")
    return [f"rotary model: the spectrum of the form at offset {offset}, the offset this head fires at most; "
            + kept + (f" (showing the first {shown} stored)" if shown < n_stored else "")]


def head_notes(run: "Run", name: str, tables: dict) -> list[str]:
    """The notes of a head's summary (head_summary's tables): why a part is empty, rows left out,
    what a rotary spectrum holds, the sides its upstream heads explain little of."""
    notes = [] if tables["activity"].column("n_firings")[0].as_py() else [never_fires(run, name)]
    notes += share_notes(name, tables.get("side_shares"))
    for key in ("spectrum", "upstream", "downstream"):
        # the upstream table's share note says again what side_shares and its notes say
        notes += [f"{key}: {note}" for note in result_notes(tables[key])
                  if not ("side_shares" in tables and note.startswith(HEAD_SHARE_NOTE))]
    return notes


def never_fires(run: Run, name: str) -> str:
    """Why a head's summary has no firings."""
    if run.method_spec.partial_firings:
        return f"no firing of {name} is decomposed in run {run.run_id} ({run.method_spec.partial_firings})"
    return f"{name} never fires in run {run.run_id}"


def head_document(con, head: str, run_id: int | None = None, top: int = 10, rows_of=None, **effects) -> dict:
    """Everything about one head as one JSON-ready object (`head --format json`, the service's
    /heads/{head}): name ("L9H9"), layer, head (integers), run_id, run (run_info), notes (why a
    part is empty, rows left out), then one list of rows per head_summary table.

    `rows_of` turns an Arrow table into row dicts (default: Table.to_pylist)."""
    rows_of = rows_of or (lambda table: table.to_pylist())
    run = resolve_run(con, run_id)
    layer, index = run.head(head)
    tables = head_summary(con, head, run_id=run.run_id, top=top, **effects)
    name = head_name(layer, index)
    notes = head_notes(run, name, tables)
    document = {"name": name, "layer": layer, "head": index, "run_id": run.run_id,
                "run": result_run(tables["upstream"]), "notes": notes}
    document.update({key: rows_of(table) for key, table in tables.items()})
    return document

"""SQL text that several read-side questions share, written once.

Each fragment is a constant or a small function of the table aliases it reads, so that a query
says `edge_token_join("e", "t")` rather than repeating the join (and drifting from the others).
"""

from __future__ import annotations


def token_pos(edge: str = "e") -> str:
    """The token an upstream component writes to: the destination on the query side, the source
    on the key side."""
    return f"CASE WHEN {edge}.side = 'query' THEN {edge}.dest_pos ELSE {edge}.src_pos END"


def edge_token_join(edge: str = "e", token: str = "t", how: str = "LEFT JOIN") -> str:
    """Join each edge to the token its upstream component writes to (for its role)."""
    return (f"{how} tokens {token} ON {token}.run_id = {edge}.run_id AND {token}.prompt_id = {edge}.prompt_id "
            f"AND {token}.pos = {token_pos(edge)}")


def edges_of_firing(edge: str, firing: str) -> str:
    """The join condition of a run's edges (`edge`, run $run) to the firing (`firing`) they feed."""
    return (f"{edge}.run_id = $run AND {edge}.prompt_id = {firing}.prompt_id AND {edge}.layer = {firing}.layer "
            f"AND {edge}.head = {firing}.head AND {edge}.dest_pos = {firing}.dest_pos "
            f"AND {edge}.src_pos = {firing}.src_pos")


def head_name_sql(layer: str, head: str) -> str:
    """SQL for a head's display name ("L9H9") over two integer expressions."""
    return f"('L' || {layer} || 'H' || {head})"


def component_name(prefix: str = "") -> str:
    """SQL for a component's display name from {prefix}up_kind, up_layer, up_head: "L9H9" for a head,
    "MLP 3", "b_O 3", "embed", "offset"."""
    p = prefix
    return (f"CASE {p}up_kind WHEN 'head' THEN {head_name_sql(p + 'up_layer', p + 'up_head')} "
            f"WHEN 'mlp' THEN 'MLP ' || {p}up_layer WHEN 'attn_bias' THEN 'b_O ' || {p}up_layer "
            f"ELSE {p}up_kind END")


# The singular directions of the downstream head an edge writes through, largest first: a list of
# {sv, share} structs, share = that direction's part of the edge weight (signed; can exceed 1 when
# other directions' parts are negative).
SHARE_MEANING = ("share = that singular direction's part of the edge weight (its term divided by the "
                 "whole weight); signed, and above 1 when other directions' terms are negative")
SVS_TYPE = "STRUCT(sv INTEGER, share FLOAT)[]"
NO_SVS = f"[]::{SVS_TYPE}"


def top_svs(sv: str, weight: str, total: str, order: str, n: str) -> str:
    """SQL aggregating directions `sv` with weights `weight` (of the edge's `total`) into the first
    `n` {sv, share} structs, ordered by `order`."""
    return (f"list({{'sv': CAST({sv} AS INTEGER), 'share': CAST({weight} / nullif({total}, 0) AS FLOAT)}} "
            f"ORDER BY {order})[1:{n}]")


# The measured effect of an edge (issue 9): how much the downstream attention drops when the
# edge's signal is ablated (`circuit-catalog intervene`, mode $effect_mode); NULL if not measured.
EFFECT = "(iv.attn_before - iv.attn_after)"


def effect_match(edge: str = "e", run: str | None = None) -> str:
    """The condition matching interventions `iv` to the edge `edge` (run: `run`, default the edge's)."""
    return (f"iv.run_id = {run or edge + '.run_id'} AND iv.prompt_id = {edge}.prompt_id "
            f"AND iv.edge_id = {edge}.edge_id AND iv.mode = $effect_mode AND NOT iv.boost")


def effect_join(edge: str = "e", run: str | None = None) -> str:
    return f"LEFT JOIN interventions iv ON {effect_match(edge, run)}"


def same_form(vectors: str, firing: str) -> str:
    """The join condition of singular_vectors rows to the form of a firing (or of an edge's firing)
    that has dest_pos and src_pos: position-free forms (pos_offset NULL) serve every firing;
    a rotary model's serve the firings at their offset."""
    return (f"({vectors}.pos_offset IS NULL OR {vectors}.pos_offset = {firing}.dest_pos - {firing}.src_pos)")


def sigma_over_forms(vectors: str = "s") -> str:
    """A sv's sigma over the forms of a head's firings: the head's one value (learned positions), or
    the mean over the firings' offsets (rotary: each offset has its own spectrum)."""
    return (f"CASE WHEN count({vectors}.pos_offset) = 0 THEN any_value({vectors}.sigma) "
            f"ELSE avg({vectors}.sigma) END")


SIGMA_OVER_FORMS = sigma_over_forms("s")

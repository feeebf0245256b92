"""SQL text that several read-side questions share, written once.

Each fragment is a constant or a small function of the table aliases it reads, so that a query
says `edge_token_join("e", "t")` rather than repeating the join (and drifting from the others).
"""

from __future__ import annotations


def token_pos(edge: str = "e") -> str:
    """The token an upstream component writes to: the destination on the query side, the source
    on the key side."""
    return f"CASE WHEN {edge}.side = 'query' THEN {edge}.dest_pos ELSE {edge}.src_pos END"


# How a token without a role is written where prompts are aggregated (trace over all prompts, the
# heads overview): one group for them all. Their positions are never matched across prompts,
# since the same position is a different word in each template.
NO_ROLE = "other"


def aggregated_token(token: str = "t") -> str:
    """SQL for a token's label over all prompts: its role, or NO_ROLE for a token without one."""
    return f"coalesce({token}.role, '{NO_ROLE}')"


def edge_token_join(edge: str = "e", token: str = "t", how: str = "LEFT JOIN") -> str:
    """Join each edge to the token its upstream component writes to (for its role)."""
    return (f"{how} tokens {token} ON {token}.run_id = {edge}.run_id AND {token}.prompt_id = {edge}.prompt_id "
            f"AND {token}.pos = {token_pos(edge)}")


def firing_roles_join(edge: str = "e", dest: str = "fd", src: str = "fs") -> str:
    """Join each edge to the destination (`dest`) and source (`src`) tokens of the firing it feeds,
    for that firing's own roles (as firing_roles' dest_role and src_role)."""
    return (f"LEFT JOIN tokens {dest} ON {dest}.run_id = {edge}.run_id AND {dest}.prompt_id = {edge}.prompt_id "
            f"AND {dest}.pos = {edge}.dest_pos "
            f"LEFT JOIN tokens {src} ON {src}.run_id = {edge}.run_id AND {src}.prompt_id = {edge}.prompt_id "
            f"AND {src}.pos = {edge}.src_pos")


def firing_roles_filter(dest: str = "fd", src: str = "fs") -> str:
    """The condition keeping edges whose firing goes from role $dest_role to $src_role (NULL: any)."""
    return (f"AND ($dest_role IS NULL OR {dest}.role = $dest_role) "
            f"AND ($src_role IS NULL OR {src}.role = $src_role)")


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
# A rotary model's direction is named by its form's offset too: sv 0 at offset 3 and sv 0 at
# offset 5 are different directions (docs/rotary.md), so they are never summed together.
OFFSET_SVS_TYPE = "STRUCT(pos_offset INTEGER, sv INTEGER, share FLOAT)[]"
NO_OFFSET_SVS = f"[]::{OFFSET_SVS_TYPE}"


def no_svs(per_offset: bool) -> str:
    """SQL for an empty direction list of the run's kind (with pos_offset for a rotary form)."""
    return NO_OFFSET_SVS if per_offset else NO_SVS


def top_svs(sv: str, weight: str, total: str, order: str, n: str, offset: str | None = None) -> str:
    """SQL aggregating directions `sv` (of the form at `offset`, for a rotary run) with weights
    `weight` (of the edge's `total`) into the first `n` {[pos_offset,] sv, share} structs, ordered
    by `order`."""
    named = f"'pos_offset': CAST({offset} AS INTEGER), " if offset is not None else ""
    return (f"list({{{named}'sv': CAST({sv} AS INTEGER), 'share': CAST({weight} / nullif({total}, 0) AS FLOAT)}} "
            f"ORDER BY {order})[1:{n}]")


def firing_offset(firing: str) -> str:
    """SQL for the offset of a firing (or of an edge's firing): the form its directions belong to."""
    return f"({firing}.dest_pos - {firing}.src_pos)"


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

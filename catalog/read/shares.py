"""What the heads' edges leave out: of each side of a head's firings, the share of the sparse
signal's projection that each kind of component writes (table side_shares, the 2024 method).

The 2024 method's edges are upstream heads only. When MLPs write most of a side, its edges
explain only the heads' part of it, and `head` (CLI, API, explorer) says so: `share_table`
gives the medians per side, over all the head's firings and over its commonest role pairs;
`share_notes` turns a side the heads carry less than half of into one sentence.
"""

from __future__ import annotations

import pyarrow as pa

from catalog.read.runs import Run, fetch, has_table

SHARE_COLUMNS = ("head_share", "mlp_share", "attn_bias_share", "embed_share", "offset_share")
# Below this median share of a side, a note says that the side's edges explain little of it.
LOW_HEAD_SHARE = 0.5
ROLE_PAIRS_SHOWN = 3


def share_table(con, run: Run, layer: int, head: int) -> pa.Table | None:
    """Median shares of each side of the head's firings (None: the run's method records none).

    One row per (firings, side): `firings` is 'all' or a role pair 'end -> IO' (role-less
    tokens are 'other'; the head's ROLE_PAIRS_SHOWN commonest pairs), then n_firings and the
    median of each kind's share over those firings whose projection is not 0. Medians of
    shares need not sum to one (each share of one firing does)."""
    if "side_shares" not in run.method_spec.tables or not has_table(con, "side_shares"):
        return None
    medians = ", ".join(f"median(s.{c}) AS {c}" for c in SHARE_COLUMNS)
    return fetch(con, f"""
        WITH shares AS (
            SELECT s.*, coalesce(f.dest_role, 'other') || ' -> ' || coalesce(f.src_role, 'other') AS pair
            FROM side_shares s
            JOIN firing_roles f USING (run_id, prompt_id, layer, head, dest_pos, src_pos)
            WHERE s.run_id = $run AND s.layer = $layer AND s.head = $head AND s.head_share IS NOT NULL
        ),
        top_pairs AS (
            SELECT pair, count(*) AS n FROM shares WHERE side = 'query' GROUP BY pair
            ORDER BY n DESC, pair LIMIT $pairs
        ),
        grouped AS (
            SELECT 'all' AS firings, side, count(*) AS n_firings, {medians}, 0 AS n_order FROM shares s GROUP BY side
            UNION ALL
            SELECT s.pair, s.side, count(*), {medians}, any_value(t.n) FROM shares s JOIN top_pairs t USING (pair)
            GROUP BY s.pair, s.side
        )
        SELECT firings, side, n_firings, {", ".join(SHARE_COLUMNS)} FROM grouped
        ORDER BY n_order = 0 DESC, n_order DESC, firings, side DESC""",
        {"run": run.run_id, "layer": layer, "head": head, "pairs": ROLE_PAIRS_SHOWN})


def share_notes(name: str, table: pa.Table | None) -> list[str]:
    """One sentence for all the head's firings and one for its commonest role pair, where a side's
    upstream heads carry less than LOW_HEAD_SHARE of it (median): the edges of that side explain
    only that part. The other pairs are in the table."""
    if table is None:
        return []
    low: dict[str, list[str]] = {}
    pairs = [f for f in dict.fromkeys(table.column("firings").to_pylist()) if f != "all"]
    for row in table.to_pylist():
        if row["firings"] not in ("all", *pairs[:1]):
            continue
        if row["head_share"] is not None and row["head_share"] < LOW_HEAD_SHARE:
            low.setdefault(row["firings"], []).append(
                f"{row['head_share']:.0%} of the {row['side']} side (MLPs {row['mlp_share']:.0%})")
    return [f"heads carry a median {' and '.join(parts)} of {name}'s "
            + ("firings" if firings == "all" else f"{firings} firings")
            + "; its edges (upstream heads only) explain no more than that part (side shares)"
            for firings, parts in low.items()]

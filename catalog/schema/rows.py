"""Catalog rows as Arrow tables, shared by the methods: column types and edge numbering.

A method builds its rows as dicts of numpy columns (one dict per layer or side), and turns
them into one Arrow table per catalog table here, so that both methods write the same types.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# Arrow type of every column a method writes (DuckDB casts on insert; these keep files small).
TYPES = {
    "prompt_id": pa.int32(), "layer": pa.int16(), "head": pa.int16(), "dest_pos": pa.int16(),
    "src_pos": pa.int16(), "attn_weight": pa.float32(), "score": pa.float32(), "n_svs": pa.int16(),
    "rank": pa.int16(), "sv": pa.int16(), "contribution": pa.float32(), "dest_proj": pa.float32(),
    "src_proj": pa.float32(), "side": pa.string(), "up_layer": pa.int16(), "up_head": pa.int16(),
    "weight": pa.float32(), "edge_id": pa.int32(), "up_kind": pa.string(), "up_src_pos": pa.int16(),
    "up_attn": pa.float32(), "threshold": pa.float32(), "n_atoms": pa.int32(), "attn_after": pa.float32(),
    "capped": pa.bool_(), "root_id": pa.int16(), "seeding": pa.string(), "objective": pa.string(),
    "pos": pa.int16(), "total": pa.float64(), "n_seeds": pa.int32(), "seed_rank": pa.int16(),
    "logit_diff": pa.float32(), "answer_prob": pa.float32(),
    "top_token_id": pa.int32(), "top_token": pa.string(), "pos_offset": pa.int16(),
    "projection": pa.float32(), "head_share": pa.float32(), "mlp_share": pa.float32(),
    "attn_bias_share": pa.float32(), "embed_share": pa.float32(), "offset_share": pa.float32(),
    "to_sink": pa.bool_(), "is_sink": pa.bool_(),
}

# The order edges are numbered in within a prompt (the order migration 004 gave older catalogs).
EDGE_ORDER = ("layer", "head", "dest_pos", "src_pos", "side", "up_kind", "up_layer", "up_head", "up_src_pos")


def table(columns: list[str], parts: list[dict], types: dict | None = None) -> pa.Table:
    """One Arrow table from dicts of numpy columns (missing optional columns are NULL in DuckDB)."""
    types = {**TYPES, **(types or {})}
    return pa.table({c: _array(np.concatenate([p[c] for p in parts]) if parts else [], types[c]) for c in columns})


def _array(values, type_: pa.DataType) -> pa.Array:
    """NaN in a float column means NULL (an integer column with NULLs arrives as float)."""
    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        return pa.array(values, pa.float64(), from_pandas=True).cast(type_)
    return pa.array(values, type_)


def concat(parts: list[dict]) -> dict:
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]} if parts else {}


def take(columns: dict, index) -> dict:
    index = np.asarray(index)
    return {name: values[index] for name, values in columns.items()}


def number_edges(edges: dict, edge_svs: dict) -> tuple[dict, dict]:
    """Give each edge its edge_id (0-based within its prompt, in EDGE_ORDER, NULLs first) and
    each edge_svs row, which names its edge by row (`edge_row`), the edge's prompt_id and edge_id."""
    n = len(edges["prompt_id"])
    keys = [_sortable(edges[c]) for c in ("prompt_id",) + EDGE_ORDER if c in edges]
    order = np.lexsort(keys[::-1])
    prompt_sorted = edges["prompt_id"][order]
    starts = np.r_[0, np.flatnonzero(np.diff(prompt_sorted)) + 1] if n else np.zeros(0, int)
    position = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    edge_id = np.empty(n, dtype=np.int64)
    edge_id[order] = position
    rows = edge_svs.pop("edge_row")
    return dict(edges, edge_id=edge_id), dict(edge_svs, prompt_id=edges["prompt_id"][rows], edge_id=edge_id[rows])


def _sortable(values: np.ndarray) -> np.ndarray:
    """NULLs (NaN in a float column, None in an object column) sort first."""
    if values.dtype == object:
        return np.array(["" if v is None else str(v) for v in values])
    if values.dtype.kind == "f":
        return np.nan_to_num(values, nan=-1.0)
    return values


def edge_sv_lists(edge_svs: pa.Table) -> pa.Table:
    """edge_svs rows (prompt_id, edge_id, rank, sv, weight) as the stored form, one row per edge
    (table edge_sv_lists, migration 010): its directions and weights as lists in rank order, and
    its ranks only where they are not 0, 1, ..., n - 1 (else NULL). Other columns are dropped."""
    columns = {c: edge_svs.column(c).to_numpy() for c in ("prompt_id", "edge_id", "rank", "sv", "weight")}
    order = np.lexsort((columns["rank"], columns["edge_id"], columns["prompt_id"]))
    prompt, edge, rank = columns["prompt_id"][order], columns["edge_id"][order], columns["rank"][order]
    n = len(order)
    new_edge = np.ones(n, dtype=bool)
    new_edge[1:] = (prompt[1:] != prompt[:-1]) | (edge[1:] != edge[:-1])
    starts = np.flatnonzero(new_edge)
    offsets = np.r_[starts, n].astype(np.int32)
    position = np.arange(n) - np.repeat(starts, np.diff(offsets))
    plain = np.logical_and.reduceat(rank == position, starts) if n else np.zeros(0, dtype=bool)
    def lists(values, type_, mask=None):
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type_), mask=mask)

    return pa.table({
        "prompt_id": pa.array(prompt[starts], pa.int32()),
        "edge_id": pa.array(edge[starts], pa.int32()),
        "svs": lists(columns["sv"][order], pa.int16()),
        "weights": lists(columns["weight"][order], pa.float32()),
        "ranks": lists(rank, pa.int16(), mask=pa.array(plain, pa.bool_())),
    })

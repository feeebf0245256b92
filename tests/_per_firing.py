"""SPEC.md for one prompt, one firing at a time, written out independently of catalog/ (numpy,
float64, no batching, no padding): the recomputation that test_ingest and test_families hold
every stored firing, signal and edge to. The caller supplies the forms, so that GPT-2's (one
dense SVD per head) and a rotary model's (one per head and offset) are checked the same way."""

from __future__ import annotations

import numpy as np
import torch

ATTN, SV, EDGE = 0.5, 1.0, 0.7


def select_edges(weights: dict) -> set:
    """The upstream heads that carry EDGE of the total: largest first, up to the first running sum
    past EDGE * total, and every head as large as that one."""
    order = sorted(weights, key=lambda k: -weights[k])
    total, running = sum(weights.values()), 0.0
    for key in order:
        running += weights[key]
        if running > EDGE * total:
            return {k for k, w in weights.items() if w >= weights[key]}
    return set()


def per_firing(lm, token_ids, end_pos: int, svd_of, W_O: np.ndarray) -> dict:
    """{(layer, head, i, j): {"score", "c" (every c_k), "svs" (the signal, in order), "edges"}} for
    one prompt; edges[side] = {(up_layer, up_head): (weight, {k: term})}.

    svd_of(layer, head, offset) -> U, S, V (columns: singular vectors) of the firing's Omega~;
    W_O [layer, head, d_head, d_model]."""
    _, cache = lm.bridge.run_with_cache(torch.tensor([token_ids]))
    get = lambda name: cache[name][0].double().numpy()  # noqa: E731
    result = {}
    for layer in range(lm.n_layers):
        pattern, scores = get(f"blocks.{layer}.attn.hook_pattern"), get(f"blocks.{layer}.attn.hook_attn_scores")
        x = get(f"blocks.{layer}.ln1.hook_normalized")
        scale = get(f"blocks.{layer}.ln1.hook_scale")[:, 0]
        z = {up: get(f"blocks.{up}.attn.hook_z") for up in range(layer)}
        for head in range(lm.n_heads):
            for i in range(end_pos + 1):
                for j in range(1, i + 1):
                    if pattern[head, i, j] < ATTN or scores[head, i, j] <= 0:
                        continue
                    U, S, V = svd_of(layer, head, i - j)
                    xi, xj = np.append(x[i], 1.0), np.append(x[j], 1.0)
                    c = [S[k] * (xi @ U[:, k]) * (V[:, k] @ xj) for k in range(len(S))]
                    svs = _signal(c)
                    edges = {}
                    for side, t in (("query", i), ("key", j)):
                        weights, terms = {}, {}
                        for up_layer in range(layer):
                            for up_head in range(lm.n_heads):
                                o = np.append(z[up_layer][t, up_head] @ W_O[up_layer, up_head], 1.0)
                                per_sv = {}
                                for k in svs:
                                    sign, magnitude = np.sign(xi @ U[:, k]), np.sqrt(S[k])
                                    direction = U[:, k] if side == "query" else V[:, k]
                                    per_sv[k] = (o @ (sign * magnitude * direction)) / scale[t]
                                weights[up_layer, up_head] = sum(per_sv.values())
                                terms[up_layer, up_head] = per_sv
                        edges[side] = {u: (weights[u], terms[u]) for u in select_edges(weights)} if layer else {}
                    result[layer, head, i, j] = {"score": scores[head, i, j] * np.sqrt(lm.d_head), "c": c,
                                                 "svs": svs, "edges": edges}
    return result


def _signal(c: list[float]) -> list[int]:
    """The sparse signal: the shortest largest-first prefix whose running sum exceeds SV times
    the total; else (no negative c_k) every positive c_k."""
    ranked = sorted(range(len(c)), key=lambda k: -c[k])
    running = 0.0
    for n, k in enumerate(ranked):
        running += c[k]
        if running / sum(c) > SV:
            return ranked[: n + 1]
    return [k for k in ranked if c[k] > 0]


def compare(con, run_id: int, prompt_id: int, expected: dict) -> int:
    """Assert the stored firings, signals, edges and per-direction edge terms of a prompt equal
    `expected` (per_firing's); return how many edges were checked."""
    import pytest

    stored = {tuple(r[:4]): r[4:] for r in con.execute(
        "SELECT layer, head, dest_pos, src_pos, score, n_svs FROM firings WHERE run_id = ? AND prompt_id = ?",
        [run_id, prompt_id]).fetchall()}
    assert set(stored) == set(expected), f"prompt {prompt_id}: firing sets differ"
    svs = {tuple(r[:4]): (r[4], r[5]) for r in con.execute(
        "SELECT layer, head, dest_pos, src_pos, list(sv ORDER BY rank), list(contribution ORDER BY rank) "
        "FROM firing_svs WHERE run_id = ? AND prompt_id = ? GROUP BY ALL", [run_id, prompt_id]).fetchall()}
    edges = {}
    for row in con.execute(
            "SELECT e.layer, e.head, e.dest_pos, e.src_pos, e.side, e.up_layer, e.up_head, e.weight, "
            "       (SELECT map(list(s.sv), list(s.weight)) FROM edge_svs s WHERE s.run_id = e.run_id "
            "        AND s.prompt_id = e.prompt_id AND s.edge_id = e.edge_id) "
            "FROM edges e WHERE e.run_id = ? AND e.prompt_id = ?", [run_id, prompt_id]).fetchall():
        edges.setdefault(tuple(row[:5]), {})[row[5], row[6]] = (row[7], row[8])
    checked = 0
    for key, want in expected.items():
        score, n_svs = stored[key]
        assert score == pytest.approx(want["score"], rel=1e-4, abs=1e-5)
        assert svs[key][0] == want["svs"], f"prompt {prompt_id} firing {key}: signal differs"
        assert n_svs == len(want["svs"])
        np.testing.assert_allclose(svs[key][1], [want["c"][k] for k in want["svs"]], rtol=1e-4, atol=1e-5)
        for side, want_edges in want["edges"].items():
            got = edges.get(key + (side,), {})
            assert set(got) == set(want_edges), f"prompt {prompt_id} firing {key} {side}: edge sets differ"
            # float32 error follows the magnitudes summed, not the net result: an edge's weight is the
            # sum of its per-direction terms, which can cancel (terms -8.58, 0.081 and 7.80 make a
            # weight of 0.70), so every value is compared at the scale of the largest term summed.
            scale = max([abs(w) for w, _ in want_edges.values()]
                        + [abs(term) for _, per_sv in want_edges.values() for term in per_sv.values()],
                        default=1.0)
            for up, (weight, per_sv) in want_edges.items():
                assert got[up][0] == pytest.approx(weight, rel=1e-4, abs=1e-5 * scale)
                assert set(got[up][1]) == set(per_sv)
                for k, term in per_sv.items():
                    assert got[up][1][k] == pytest.approx(term, rel=1e-4, abs=1e-5 * scale)
                # the per-direction terms sum to the edge weight
                magnitude = scale + sum(abs(t) for t in got[up][1].values())
                assert sum(got[up][1].values()) == pytest.approx(got[up][0], rel=1e-5, abs=1e-6 * magnitude)
                checked += 1
    return checked

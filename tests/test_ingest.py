"""Every stored number against a plain, per-firing computation of SPEC.md written independently.

The independent version runs each prompt alone (no batching, no padding), decomposes each
head with numpy's dense SVD of Omega~ in float64, and loops over token pairs, singular vectors
and upstream heads one at a time.
"""

import duckdb
import numpy as np
import pytest
import torch

from catalog.ingest import ingest

ATTN, SV, EDGE = 0.5, 1.0, 0.7


@pytest.fixture(scope="module")
def catalog_db(tiny_checkpoint, tiny_model, tmp_path_factory):
    db = tmp_path_factory.mktemp("ingest") / "catalog.duckdb"
    # batch_size 4 over 6 prompts: a full and a partial batch, both padded
    summary = ingest(db, model_path=tiny_checkpoint, n_prompts=6, seed=3, batch_size=4, loaded_model=tiny_model)
    return db, summary["run_id"]


def _dense_svd(lm):
    W_Q, b_Q, W_K, b_K, _ = (t.double().numpy() for t in lm.attention_weights())
    out = {}
    for layer in range(lm.n_layers):
        for head in range(lm.n_heads):
            A = np.vstack([W_Q[layer, head], b_Q[layer, head][None]])
            B = np.vstack([W_K[layer, head], b_K[layer, head][None]])
            U, S, Vt = np.linalg.svd(A @ B.T)
            r = lm.d_head
            out[layer, head] = (U[:, :r], S[:r], Vt[:r].T)
    return out


def _select_edges(weights):
    order = sorted(weights, key=lambda k: -weights[k])
    total, running = sum(weights.values()), 0.0
    for key in order:
        running += weights[key]
        if running > EDGE * total:
            return {k for k, w in weights.items() if w >= weights[key]}
    return set()


def _independent(lm, token_ids, end_pos):
    """Firings, signals and edges of one prompt, one firing at a time."""
    svd = _dense_svd(lm)
    W_O = lm.attention_weights()[4].double().numpy()
    _, cache = lm.bridge.run_with_cache(torch.tensor([token_ids]))
    get = lambda name: cache[name][0].double().numpy()  # noqa: E731
    result = {}
    for layer in range(lm.n_layers):
        pattern, scores = get(f"blocks.{layer}.attn.hook_pattern"), get(f"blocks.{layer}.attn.hook_attn_scores")
        x = get(f"blocks.{layer}.ln1.hook_normalized")
        scale = get(f"blocks.{layer}.ln1.hook_scale")[:, 0]
        for head in range(lm.n_heads):
            U, S, V = svd[layer, head]
            for i in range(end_pos + 1):
                for j in range(1, i + 1):
                    if pattern[head, i, j] < ATTN or scores[head, i, j] <= 0:
                        continue
                    xi, xj = np.append(x[i], 1.0), np.append(x[j], 1.0)
                    c = [S[k] * (xi @ U[:, k]) * (V[:, k] @ xj) for k in range(len(S))]
                    ranked = sorted(range(len(c)), key=lambda k: -c[k])
                    total, running, svs = sum(c), 0.0, None
                    for n, k in enumerate(ranked):
                        running += c[k]
                        if running / total > SV:
                            svs = ranked[: n + 1]
                            break
                    if svs is None:
                        svs = [k for k in ranked if c[k] > 0]
                    edges = {}
                    for side, t in (("query", i), ("key", j)):
                        weights, terms = {}, {}
                        for up_layer in range(layer):
                            z = get(f"blocks.{up_layer}.attn.hook_z")
                            for up_head in range(lm.n_heads):
                                o = np.append(z[t, up_head] @ W_O[up_layer, up_head], 1.0)
                                per_sv = {}
                                for k in svs:
                                    sign, mag = np.sign(xi @ U[:, k]), np.sqrt(S[k])
                                    direction = U[:, k] if side == "query" else V[:, k]
                                    per_sv[k] = (o @ (sign * mag * direction)) / scale[t]
                                weights[up_layer, up_head] = sum(per_sv.values())
                                terms[up_layer, up_head] = per_sv
                        edges[side] = {u: (weights[u], terms[u]) for u in _select_edges(weights)} if layer else {}
                    result[layer, head, i, j] = {"score": scores[head, i, j] * lm.d_head**0.5, "c": c,
                                                 "svs": svs, "edges": edges}
    return result


def test_stored_numbers_match_independent_computation(catalog_db, tiny_model):
    db, run_id = catalog_db
    con = duckdb.connect(str(db), read_only=True)
    prompts = con.execute("SELECT prompt_id, end_pos FROM prompts WHERE run_id = ? ORDER BY prompt_id",
                          [run_id]).fetchall()
    checked_edges = 0
    for prompt_id, end_pos in prompts[:3]:
        ids = [r[0] for r in con.execute("SELECT token_id FROM tokens WHERE run_id = ? AND prompt_id = ? ORDER BY pos",
                                         [run_id, prompt_id]).fetchall()]
        expected = _independent(tiny_model, ids, end_pos)
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
        for key, want in expected.items():
            score, n_svs = stored[key]
            assert score == pytest.approx(want["score"], rel=1e-4, abs=1e-5)
            assert svs[key][0] == want["svs"], f"prompt {prompt_id} firing {key}: signal differs"
            assert n_svs == len(want["svs"])
            np.testing.assert_allclose(svs[key][1], [want["c"][k] for k in want["svs"]], rtol=1e-4, atol=1e-5)
            for side, want_edges in want["edges"].items():
                got = edges.get(key + (side,), {})
                assert set(got) == set(want_edges), f"prompt {prompt_id} firing {key} {side}: edge sets differ"
                for up, (weight, per_sv) in want_edges.items():
                    scale = max(abs(w) for w, _ in want_edges.values())
                    assert got[up][0] == pytest.approx(weight, rel=1e-4, abs=1e-5 * scale)
                    assert set(got[up][1]) == set(per_sv)
                    for k, term in per_sv.items():
                        assert got[up][1][k] == pytest.approx(term, rel=1e-4, abs=1e-5 * scale)
                    # the per-direction terms sum to the edge weight
                    magnitude = scale + sum(abs(t) for t in got[up][1].values())
                    assert sum(got[up][1].values()) == pytest.approx(got[up][0], rel=1e-5, abs=1e-6 * magnitude)
                    checked_edges += 1
    con.close()
    assert checked_edges > 50  # the comparison really covered edges


def test_rerunning_a_finished_ingest_adds_nothing(catalog_db, tiny_checkpoint, tiny_model):
    db, run_id = catalog_db
    before = _snapshot(db)
    summary = ingest(db, model_path=tiny_checkpoint, n_prompts=6, seed=3, batch_size=4, loaded_model=tiny_model)
    assert summary["already_finished"] and summary["run_id"] == run_id
    assert _snapshot(db) == before


TABLES = ["models", "singular_vectors", "prompts", "tokens", "firings", "firing_svs", "edges", "edge_svs"]


def _snapshot(db):
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = {t: sorted(map(repr, con.execute(f"SELECT * EXCLUDE (created_at) FROM {t}" if t == "models"
                                                 else f"SELECT * FROM {t}").fetchall())) for t in TABLES}
        rows["runs"] = con.execute("SELECT run_id, model_id, status, params FROM runs ORDER BY run_id").fetchall()
        rows["run_batches"] = con.execute(
            "SELECT run_id, batch, first_prompt, last_prompt, n_firings, n_edges FROM run_batches ORDER BY ALL"
        ).fetchall()
        return rows
    finally:
        con.close()


def test_interrupted_ingest_resumes_to_identical_catalog(tmp_path, tiny_checkpoint, tiny_model):
    from catalog.ingest import Interrupted

    args = dict(model_path=tiny_checkpoint, n_prompts=10, seed=5, batch_size=3, loaded_model=tiny_model)
    whole = tmp_path / "whole.duckdb"
    ingest(whole, **args)

    parted = tmp_path / "parted.duckdb"

    def interrupt_after_second_batch(batch):
        if batch == 1:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="6 of 10 prompts"):
        ingest(parted, on_batch=interrupt_after_second_batch, **args)
    con = duckdb.connect(str(parted), read_only=True)
    assert con.execute("SELECT status FROM runs").fetchall() == [("running",)]
    assert con.execute("SELECT count(DISTINCT prompt_id) FROM firings").fetchall()[0][0] <= 6
    con.close()
    summary = ingest(parted, **args)
    assert summary["resumed"] and summary["prompts"] == 10
    assert _snapshot(parted) == _snapshot(whole)

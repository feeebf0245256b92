"""Every stored number against a plain, per-firing computation of SPEC.md written independently.

The independent version (tests/_per_firing.py) runs each prompt alone (no batching, no
padding), with each head decomposed here by numpy's dense SVD of Omega~ in float64, and loops
over token pairs, singular vectors and upstream heads one at a time.
"""

import duckdb
import numpy as np
import pytest
from _per_firing import compare, per_firing

from catalog.jobs.ingest import ingest


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


def test_stored_numbers_match_independent_computation(catalog_db, tiny_model):
    db, run_id = catalog_db
    con = duckdb.connect(str(db), read_only=True)
    prompts = con.execute("SELECT prompt_id, end_pos FROM prompts WHERE run_id = ? ORDER BY prompt_id",
                          [run_id]).fetchall()
    svd = _dense_svd(tiny_model)
    W_O = tiny_model.attention_weights()[4].double().numpy()
    checked_edges = 0
    for prompt_id, end_pos in prompts[:3]:
        ids = [r[0] for r in con.execute("SELECT token_id FROM tokens WHERE run_id = ? AND prompt_id = ? ORDER BY pos",
                                         [run_id, prompt_id]).fetchall()]
        expected = per_firing(tiny_model, ids, end_pos, lambda layer, head, _: svd[layer, head], W_O)
        checked_edges += compare(con, run_id, prompt_id, expected)
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
    from catalog.jobs.ingest import Interrupted

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

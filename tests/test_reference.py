"""The paper's own implementation on 16 IOI prompts (../shared/reference), reproduced by the catalog.

Per firing: the same firing set, the same singular-vector set (in the same order wherever the
contributions are not tied to float32 precision), the same edges, and edge weights equal to
1e-4 relative.
"""

import json

import duckdb
import numpy as np
import pytest

from catalog.jobs.ingest import ingest

pytestmark = pytest.mark.slow


def _edge_set(weights, threshold=0.7):
    """SPEC.md's rule applied to the reference's raw per-head weights, written out plainly."""
    ordered = sorted(weights, reverse=True)
    running, total = 0.0, sum(weights)
    for w in ordered:
        running += w
        if running > threshold * total:
            return {i for i, x in enumerate(weights) if x >= w}
    return set()


@pytest.fixture(scope="module")
def reference_run(attn_real_checkpoint, attn_real_model, tmp_path_factory):
    from conftest import REFERENCE

    db = tmp_path_factory.mktemp("reference") / "ref.duckdb"
    ingest(db, model_path=attn_real_checkpoint, prompts_file=REFERENCE / "prompts.jsonl", batch_size=16,
           loaded_model=attn_real_model)
    expected = json.loads((REFERENCE / "firings.json").read_text())
    con = duckdb.connect(str(db), read_only=True)
    yield con, expected
    con.close()


def test_same_firings(reference_run):
    con, expected = reference_run
    ours = set(con.execute("SELECT prompt_id, layer, head, dest_pos, src_pos FROM firings WHERE layer >= 1").fetchall())
    theirs = {(f["prompt_id"], f["layer"], f["head"], f["dest_pos"], f["src_pos"]) for f in expected["firings"]}
    assert len(theirs) == 424
    assert ours == theirs


def test_same_singular_vectors_per_firing(reference_run):
    con, expected = reference_run
    rows = con.execute(
        "SELECT prompt_id, layer, head, dest_pos, src_pos, list(sv ORDER BY rank), list(contribution ORDER BY rank) "
        "FROM firing_svs WHERE layer >= 1 GROUP BY ALL").fetchall()
    ours = {tuple(r[:5]): (r[5], r[6]) for r in rows}
    for f in expected["firings"]:
        svs, contributions = ours[(f["prompt_id"], f["layer"], f["head"], f["dest_pos"], f["src_pos"])]
        assert set(svs) == set(f["svs"])
        for rank, (a, b) in enumerate(zip(svs, f["svs"])):
            if a != b:  # only a float32 tie may swap neighbours
                tied = [c for sv, c in zip(svs, contributions) if sv in (a, b)]
                assert abs(tied[0] - tied[1]) <= 1e-4 * abs(tied[0]), (f, rank)


def test_same_edges_and_weights(reference_run):
    con, expected = reference_run
    stored = {}
    for *key, side, up_layer, up_head, weight in con.execute(
            "SELECT prompt_id, layer, head, dest_pos, src_pos, side, up_layer, up_head, weight FROM edges").fetchall():
        stored.setdefault((*key, side), {})[up_layer * 12 + up_head] = weight
    n_edges = 0
    for f in expected["firings"]:
        key = (f["prompt_id"], f["layer"], f["head"], f["dest_pos"], f["src_pos"])
        for side in ("query", "key"):
            theirs = f[side]
            ours = stored.get((*key, side), {})
            assert set(ours) == _edge_set(theirs), (key, side)
            scale = max(abs(w) for w in theirs)
            for head, weight in ours.items():
                np.testing.assert_allclose(weight, theirs[head], rtol=1e-4, atol=1e-6 * scale)
                n_edges += 1
    assert n_edges > 1000

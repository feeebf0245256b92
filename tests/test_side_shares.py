"""The parts of a firing side's signal projection (catalog.methods.sad.shares) sum to the projection
read from the model's own normalised residual, on every family: heads, MLPs, attention biases, the
embedding and the bias row are all there is in x~ (table side_shares, docs/schema.md)."""

import pytest
import torch

from catalog.methods.sad import shares
from catalog.methods.sad.edges import upstream_outputs
from catalog.methods.sad.forms import HeadForms
from catalog.methods.sad.rotary import RotaryForms
from catalog.methods.sad.signals import find_firings, sparse_signals
from catalog.methods.shared.svd import decompose
from catalog.methods.shared.tensors import pad_tokens
from catalog.models.loading import load_model
from catalog.prompts import ioi_prompts, tokenize_prompts
from catalog.testing.families import FAMILY_NAMES, save_random_family


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family_model(request, tmp_path_factory):
    path = save_random_family(request.param, tmp_path_factory.mktemp(f"shares-{request.param}"))
    return load_model(path=path)


def test_parts_of_every_side_sum_to_its_signal_projection(family_model):
    lm = family_model
    items = ioi_prompts(4, 0, lm.tokenizer)
    token_lists = tokenize_prompts(items, lm.tokenizer)
    cache = lm.run(pad_tokens(token_lists, 0), hooks=lm.adapter.hooks + shares.HOOKS)
    W_Q, b_Q, W_K, b_K, W_O = lm.attention_weights()
    qk = (RotaryForms(W_Q, b_Q, W_K, b_K, lm.adapter.rotary) if lm.adapter.rotary is not None
          else HeadForms(decompose(W_Q, b_Q, W_K, b_K)))
    z = [cache[f"blocks.{layer}.attn.hook_z"].float() for layer in range(lm.n_layers - 1)]
    residual = shares.residual_by_kind(cache, lm.n_layers, upstream_outputs(z, W_O.float()), lm.n_heads,
                                       lm.output_weights()[0])
    end_pos = torch.tensor([len(ids) - 1 for ids in token_lists])
    checked = 0
    for layer in range(lm.n_layers):
        firings = find_firings(cache[f"blocks.{layer}.attn.hook_pattern"].float(),
                               cache[f"blocks.{layer}.attn.hook_attn_scores"].float(), end_pos, 0.3,
                               lm.adapter.score_scale)
        forms, firings.form = qk.layer_forms(layer, firings.head, firings.dest - firings.src)
        signals = sparse_signals(firings, cache[f"blocks.{layer}.ln1.hook_normalized"], forms, 1.0)
        scale = cache[f"blocks.{layer}.ln1.hook_scale"][..., 0].float()
        weights = shares.signal_weights(firings, signals, forms)
        for side in ("query", "key"):
            parts = shares.side_parts(side, firings, weights, forms, residual[layer], scale)
            projection = shares.signal_projection(side, signals, weights)
            # float32: the error follows the magnitudes of the parts summed, not their net sum
            magnitude = parts.abs().sum(1)
            assert torch.all((parts.sum(1) - projection).abs() <= 1e-5 * magnitude + 1e-6)
            if layer == 0:  # nothing is written before layer 0 but the embedding (and the bias row)
                assert torch.all(parts[:, :3] == 0)
            checked += len(firings)
    assert checked > 100


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_stored_side_shares_sum_to_one_and_project_the_stored_signal(family, tmp_path):
    """Ingest writes two side_shares rows per firing; their shares sum to one, and the stored
    projection equals sum_k s_k sqrt(sigma_k) (x~ . u_k) recomputed in SQL from firing_svs and the
    stored singular values (joined on pos_offset for a rotary model)."""
    import duckdb

    from catalog.jobs.ingest import ingest

    path = save_random_family(family, tmp_path / "model")
    db = tmp_path / "c.duckdb"
    ingest(db, model_path=path, n_prompts=6, batch_size=3)
    con = duckdb.connect(str(db), read_only=True)
    n_firings = con.execute("SELECT count(*) FROM firings").fetchone()[0]
    rows = con.execute("""
        SELECT s.side, s.projection, s.head_share + s.mlp_share + s.attn_bias_share + s.embed_share + s.offset_share,
               (SELECT sum(sign(fs.dest_proj) * sqrt(sv.sigma)
                           * CASE WHEN s.side = 'query' THEN fs.dest_proj ELSE fs.src_proj END)
                FROM firing_svs fs JOIN firings f USING (run_id, prompt_id, layer, head, dest_pos, src_pos)
                JOIN runs r USING (run_id)
                JOIN singular_vectors sv ON sv.model_id = r.model_id AND sv.form = 'augmented'
                     AND sv.layer = fs.layer AND sv.head = fs.head AND sv.sv = fs.sv
                     AND sv.pos_offset IS NOT DISTINCT FROM f.pos_offset
                WHERE fs.run_id = s.run_id AND fs.prompt_id = s.prompt_id AND fs.layer = s.layer
                  AND fs.head = s.head AND fs.dest_pos = s.dest_pos AND fs.src_pos = s.src_pos)
        FROM side_shares s""").fetchall()
    busiest = con.execute("SELECT layer, head FROM firings WHERE layer > 0 GROUP BY ALL ORDER BY count(*) DESC, layer, head "
                          "LIMIT 1").fetchone()
    medians = dict(con.execute("SELECT side, median(head_share) FROM side_shares WHERE layer = ? AND head = ? "
                               "GROUP BY side", list(busiest)).fetchall())
    con.close()
    assert n_firings > 20 and len(rows) == 2 * n_firings
    for side, projection, share_sum, recomputed in rows:
        assert share_sum == pytest.approx(1.0, abs=1e-4)
        assert projection == pytest.approx(recomputed, rel=1e-4, abs=1e-5)

    # `edges --into` says what the heads carry of each side (independent medians above)
    from catalog.read import query
    from catalog.store import open_readonly

    with open_readonly(db) as con:
        notes = query.result_notes(query.edges_into(con, f"{busiest[0]}.{busiest[1]}"))
    note = [n for n in notes if "(side_shares)" in n]
    assert len(note) == 1
    assert f"{medians['query']:.0%} of the query side" in note[0] and f"{medians['key']:.0%} of the key side" in note[0]

    # `head` (CLI, API, explorer) shows the medians per side, over all firings and per role pair,
    # and a note for a side the heads carry less than half of: checked against plain medians of the
    # stored rows, grouped here in Python
    import statistics

    con = duckdb.connect(str(db), read_only=True)
    stored = con.execute("""
        SELECT coalesce(d.role, 'other') || ' -> ' || coalesce(t.role, 'other'), s.side, s.head_share, s.mlp_share
        FROM side_shares s
        JOIN tokens d ON d.run_id = s.run_id AND d.prompt_id = s.prompt_id AND d.pos = s.dest_pos
        JOIN tokens t ON t.run_id = s.run_id AND t.prompt_id = s.prompt_id AND t.pos = s.src_pos
        WHERE s.layer = ? AND s.head = ? AND s.head_share IS NOT NULL""", list(busiest)).fetchall()
    con.close()
    groups = {}
    for pair, side, head_share, mlp_share in stored:
        for firings in ("all", pair):
            groups.setdefault((firings, side), []).append((head_share, mlp_share))
    name = f"{busiest[0]}.{busiest[1]}"
    with open_readonly(db) as con:
        document = query.head_document(con, name)
    shown = document["side_shares"]
    assert {(r["firings"], r["side"]) for r in shown} >= {("all", "query"), ("all", "key")}
    assert len({r["firings"] for r in shown}) <= 4  # all, and at most three role pairs
    for row in shown:
        values = groups[(row["firings"], row["side"])]
        assert row["n_firings"] == len(values)
        assert row["head_share"] == pytest.approx(statistics.median(v[0] for v in values), abs=1e-6)
        assert row["mlp_share"] == pytest.approx(statistics.median(v[1] for v in values), abs=1e-6)
    low = [side for side in ("query", "key") if statistics.median(v[0] for v in groups[("all", side)]) < 0.5]
    note = [n for n in document["notes"] if n.startswith("heads carry") and "'s firings" in n]
    assert len(note) == (1 if low else 0)
    for side in low:
        assert f"{statistics.median(v[0] for v in groups[('all', side)]):.0%} of the {side} side" in note[0]
    # the upstream table's share note is not repeated in the head's notes
    assert not [n for n in document["notes"] if "(side_shares)" in n]
